"""A snapshot id, dataset name or artifact path in a read's URL that could never name a stored file is
a 422 naming it, checked as its upload checks it, before anything is looked up: whatever it holds (a
NUL byte, which PostgreSQL cannot even compare), on every database."""

import pytest

from artifacts.tests.factories import live_run, put, worker_key_pair
from conftest import KeyClient
from tasks.tests.factories import TaskFactory

pytestmark = pytest.mark.django_db

STANDARD_FIELDS = {"error", "code", "trace_id", "details"}


@pytest.fixture
def task(user):
    return TaskFactory(owner=user)


@pytest.mark.parametrize(
    ("method", "url", "field"),
    [
        ("get", "/v1/snapshots/%00", "snapshot_id"),
        ("get", "/v1/snapshots/a%00b/meta", "snapshot_id"),
        ("get", "/v1/datasets/x%00", "name"),
        ("delete", "/v1/datasets/x%00", "name"),
        ("get", "/v1/datasets/x%00/content", "name"),
        ("get", "/v1/tasks/{task}/artifacts/a%00b", "path"),
    ],
)
def test_a_nul_byte_in_a_reads_url_is_422_naming_it(user_client, task, method, url, field):
    response = getattr(user_client, method)(url.format(task=task.id))

    assert response.status_code == 422
    body = response.json()
    assert set(body) == STANDARD_FIELDS
    assert body["code"] == "VALIDATION_ERROR"
    assert [detail["field"] for detail in body["details"]] == [field]


def test_head_of_an_artifact_path_with_a_nul_byte_is_422_as_its_get(user_client, task):
    assert user_client.head(f"/v1/tasks/{task.id}/artifacts/a%00b").status_code == 422


@pytest.mark.parametrize("quoted_path", ["a%00b", "new%0Aline.txt", "../up.txt", "dir//model.bin"])
def test_a_download_refuses_an_artifact_path_as_its_upload_does(user, user_client, quoted_path):
    key, raw = worker_key_pair()
    run = live_run(key=key, owner=user)

    uploaded = put(KeyClient(raw), run, quoted_path, b"output")
    downloaded = user_client.get(f"/v1/tasks/{run.task_id}/artifacts/{quoted_path}")

    assert (uploaded.status_code, downloaded.status_code) == (422, 422)
    assert downloaded.json()["details"] == uploaded.json()["details"]


@pytest.mark.parametrize(
    ("url", "field"),
    [
        ("/v1/snapshots/not-a-digest", "snapshot_id"),
        ("/v1/snapshots/not-a-digest/meta", "snapshot_id"),
        ("/v1/datasets/bad%20name", "name"),
        ("/v1/datasets/bad%20name/content", "name"),
    ],
)
def test_an_id_or_name_that_could_never_be_stored_is_422_naming_it(user_client, url, field):
    response = user_client.get(url)

    assert response.status_code == 422
    assert [detail["field"] for detail in response.json()["details"]] == [field]


def test_a_well_formed_snapshot_id_nobody_uploaded_is_still_404(user_client):
    assert user_client.get(f"/v1/snapshots/{'0' * 64}/meta").status_code == 404
