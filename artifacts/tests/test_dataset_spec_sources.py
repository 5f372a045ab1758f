"""A `dataset_specs` entry without a source reads the owner's dataset of its name, for every reader."""

import pytest

from artifacts.models import Dataset
from artifacts.selectors import spec_dataset_name
from artifacts.tests.factories import download, live_run, worker_key_pair
from conftest import KeyClient
from scheduler.dispatch import dispatch_round
from scheduler.tests.factories import assignments_of
from tasks.models import Task
from tasks.tests.factories import WorkerFactory

pytestmark = pytest.mark.django_db

DATA = b"label,pixels\n" + b"7,0 0 0 255\n" * 100


def upload(client: KeyClient, name: str = "mnist") -> None:
    response = client.post(f"/v1/datasets?name={name}", data=DATA, content_type="application/octet-stream")
    assert response.status_code == 201, response.json()


def submitted_and_placed(client: KeyClient, worker_key) -> Task:
    WorkerFactory(api_key=worker_key)
    response = client.post(
        "/v1/tasks",
        {"job_name": "job", "entrypoint": "true", "dataset_specs": [{"name": "mnist", "mount_path": "data/m"}]},
        format="json",
    )
    assert response.status_code == 201, response.json()
    task = Task.objects.get(id=response.json()["id"])
    dispatch_round()
    assert assignments_of(task), "the task was not placed on the worker"
    return task


def test_the_worker_of_a_task_submitted_with_a_spec_without_source_downloads_the_dataset(user_client):
    upload(user_client)
    key, raw = worker_key_pair()
    task = submitted_and_placed(user_client, key)

    response = download(KeyClient(raw), f"/v1/datasets/mnist/content?task_id={task.id}")

    assert response.status_code == 200
    assert response.content_bytes == DATA


def test_the_worker_of_a_task_submitted_with_a_spec_without_source_reads_the_datasets_digest(user_client):
    upload(user_client)
    key, raw = worker_key_pair()
    task = submitted_and_placed(user_client, key)

    response = KeyClient(raw).get(f"/v1/datasets/mnist?task_id={task.id}")

    assert response.status_code == 200
    assert response.json()["sha256"] == Dataset.objects.get(name="mnist").sha256


def test_a_stored_task_whose_spec_has_an_empty_source_lets_its_worker_download_the_dataset(user, user_client):
    upload(user_client)
    key, raw = worker_key_pair()
    run = live_run(key=key, owner=user, status="preparing", dataset_specs=[{"name": "mnist", "source": ""}])

    assert download(KeyClient(raw), f"/v1/datasets/mnist/content?task_id={run.task_id}").status_code == 200


def test_a_spec_without_source_does_not_open_a_dataset_of_another_name(user, user_client):
    upload(user_client)
    key, raw = worker_key_pair()
    run = live_run(key=key, owner=user, status="preparing", dataset_specs=[{"name": "cifar"}])

    assert download(KeyClient(raw), f"/v1/datasets/mnist/content?task_id={run.task_id}").status_code == 404


@pytest.mark.parametrize(
    ("spec", "name"),
    [
        ({"name": "mnist"}, "mnist"),
        ({"name": "mnist", "source": ""}, "mnist"),
        ({"name": "m", "source": "fetchml://datasets/mnist"}, "mnist"),
        ({"name": "mnist", "source": "https://data.example/mnist"}, None),
        ({"name": "mnist", "source": "file:///data/mnist"}, None),
    ],
)
def test_a_spec_reads_the_server_dataset_its_source_names_or_its_own_name_without_one(spec, name):
    assert spec_dataset_name(spec) == name
