"""POST /v1/tasks refuses a dataset spec whose sha256 contradicts the dataset it reads."""

import pytest

from artifacts.tests.factories import DatasetFactory
from tasks.models import Task

pytestmark = pytest.mark.django_db

UPLOADED = "a" * 64
OTHER = "b" * 64


def submit(client, **fields):
    return client.post("/v1/tasks", {"job_name": "job", "entrypoint": "true", **fields}, format="json")


def test_a_dataset_spec_sha256_other_than_the_datasets_is_refused_naming_the_entry(user_client, user):
    DatasetFactory(owner=user, name="mnist", sha256=UPLOADED)
    specs = [
        {"name": "web", "source": "https://data.example/web.csv", "sha256": OTHER},
        {"name": "m", "source": "fetchml://datasets/mnist", "sha256": OTHER},
    ]

    response = submit(user_client, dataset_specs=specs)

    assert response.status_code == 422, response.json()
    assert [detail["field"] for detail in response.json()["details"]] == ["dataset_specs.1.sha256"]
    assert UPLOADED in response.json()["details"][0]["message"]
    assert not Task.objects.exists()


def test_a_sha256_in_a_spec_without_source_is_checked_against_the_dataset_of_its_name(user_client, user):
    DatasetFactory(owner=user, name="mnist", sha256=UPLOADED)

    response = submit(user_client, dataset_specs=[{"name": "mnist", "sha256": OTHER}])

    assert response.status_code == 422, response.json()
    assert response.json()["details"][0]["field"] == "dataset_specs.0.sha256"


def test_a_dataset_spec_sha256_equal_to_the_datasets_is_accepted(user_client, user):
    DatasetFactory(owner=user, name="mnist", sha256=UPLOADED)
    spec = {"name": "m", "source": "fetchml://datasets/mnist", "sha256": UPLOADED}

    response = submit(user_client, dataset_specs=[spec])

    assert response.status_code == 201, response.json()
    assert response.json()["dataset_specs"] == [spec]


def test_a_spec_without_source_is_stored_as_submitted(user_client, user):
    DatasetFactory(owner=user, name="mnist", sha256=UPLOADED)

    response = submit(user_client, dataset_specs=[{"name": "mnist"}])

    assert response.status_code == 201, response.json()
    assert response.json()["dataset_specs"] == [{"name": "mnist"}]
    assert Task.objects.get().dataset_digests == {"mnist": UPLOADED}
