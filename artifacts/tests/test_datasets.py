import pytest

from artifacts.models import Dataset
from artifacts.tests.factories import download, live_run, sha256, stored_files, worker_key_pair
from audit.models import AuditEvent
from conftest import KeyClient

DATA = b"label,pixels\n" + b"7,0 0 0 255\n" * 1000


def upload(client: KeyClient, name: str = "mnist", data: bytes = DATA, description: str = ""):
    query = f"name={name}" + (f"&description={description}" if description else "")
    return client.post(f"/v1/datasets?{query}", data=data, content_type="application/octet-stream")


def test_upload_records_size_and_sha256(user_client):
    response = upload(user_client, description="digits")

    assert response.status_code == 201
    assert response.json() | {"created_at": None} == {
        "name": "mnist",
        "uri": "fetchml://datasets/mnist",
        "description": "digits",
        "size": len(DATA),
        "sha256": sha256(DATA),
        "created_at": None,
        "user_id": "alice",
    }


@pytest.mark.parametrize("name", ["has space", "a/b", "..", "x" * 129, ""])
def test_invalid_name_is_422_before_the_body_is_stored(user_client, storage_dir, name):
    response = user_client.post(f"/v1/datasets?name={name}", data=DATA, content_type="application/octet-stream")

    assert response.status_code == 422
    assert stored_files(storage_dir) == []


def test_same_name_again_is_409_and_leaves_the_first_intact(user_client, storage_dir):
    upload(user_client)

    response = upload(user_client, data=b"other bytes")

    assert response.status_code == 409
    assert response.json()["code"] == "CONFLICT"
    assert len(stored_files(storage_dir)) == 1
    assert Dataset.objects.get().sha256 == sha256(DATA)


def test_same_name_is_free_for_another_user(user_client, other_client):
    upload(user_client)

    assert upload(other_client).status_code == 201


def test_upload_over_the_limit_is_413_and_leaves_nothing(user_client, settings, storage_dir, spool_dir):
    settings.FETCHML_MAX_DATASET_BYTES = 100

    response = upload(user_client)

    assert response.status_code == 413
    assert stored_files(storage_dir) == [] and stored_files(spool_dir) == []


def test_empty_dataset_is_422(user_client):
    assert upload(user_client, data=b"").status_code == 422


def test_list_shows_only_the_callers_datasets(user_client, other_client):
    upload(user_client, name="mine")
    upload(other_client, name="theirs")

    response = user_client.get("/v1/datasets")

    assert [d["name"] for d in response.json()] == ["mine"]


def test_admin_lists_every_dataset(user_client, other_client, admin_client_key):
    upload(user_client, name="mine")
    upload(other_client, name="theirs")

    response = admin_client_key.get("/v1/datasets")

    assert [(d["name"], d["user_id"]) for d in response.json()] == [("mine", "alice"), ("theirs", "bob")]


def test_metadata_of_a_dataset(user_client):
    upload(user_client)

    response = user_client.get("/v1/datasets/mnist")

    assert response.status_code == 200
    assert response.json()["sha256"] == sha256(DATA)


def test_owner_downloads_the_content_and_the_read_is_audited(user_client):
    upload(user_client)

    response = download(user_client, "/v1/datasets/mnist/content")

    assert response.status_code == 200
    assert response.content_bytes == DATA
    assert response["ETag"] == f'"{sha256(DATA)}"'
    event = AuditEvent.objects.get(event_type="file_access", action="download")
    assert (event.user_id, event.resource) == ("alice", "dataset:mnist")


def test_other_user_cannot_read_a_dataset(user_client, other_client):
    upload(user_client)

    assert other_client.get("/v1/datasets/mnist").status_code == 404
    assert download(other_client, "/v1/datasets/mnist/content").status_code == 404
    assert download(other_client, "/v1/datasets/mnist/content?owner=alice").status_code == 404


def test_admin_reads_a_users_dataset_by_owner(user_client, admin_client_key):
    upload(user_client)

    response = download(admin_client_key, "/v1/datasets/mnist/content?owner=alice")

    assert response.status_code == 200
    assert response.content_bytes == DATA


def test_worker_downloads_a_dataset_its_live_task_lists(user, user_client):
    upload(user_client)
    key, raw = worker_key_pair()
    run = live_run(key=key, owner=user, status="preparing", datasets=["fetchml://datasets/mnist"])

    response = download(KeyClient(raw), f"/v1/datasets/mnist/content?task_id={run.task_id}")

    assert response.status_code == 200
    assert response.content_bytes == DATA


def test_worker_downloads_a_dataset_its_live_task_lists_by_bare_name(user, user_client):
    upload(user_client)
    key, raw = worker_key_pair()
    run = live_run(key=key, owner=user, status="preparing", datasets=["mnist"])

    response = download(KeyClient(raw), f"/v1/datasets/mnist/content?task_id={run.task_id}")

    assert response.status_code == 200
    assert response.content_bytes == DATA


def test_worker_downloads_a_dataset_named_as_a_dataset_spec_source(user, user_client):
    upload(user_client)
    key, raw = worker_key_pair()
    specs = [{"name": "digits", "source": "fetchml://datasets/mnist", "mount_path": "data"}]
    run = live_run(key=key, owner=user, status="preparing", dataset_specs=specs)

    response = download(KeyClient(raw), f"/v1/datasets/mnist/content?task_id={run.task_id}")

    assert response.status_code == 200


def test_worker_cannot_download_a_dataset_its_task_does_not_reference(user, user_client):
    upload(user_client)
    key, raw = worker_key_pair()
    run = live_run(key=key, owner=user, status="preparing", datasets=["fetchml://datasets/cifar"])

    assert download(KeyClient(raw), f"/v1/datasets/mnist/content?task_id={run.task_id}").status_code == 404


def test_worker_cannot_download_through_a_task_live_on_another_worker(user, user_client):
    upload(user_client)
    key, _ = worker_key_pair("agent-one")
    _, other_raw = worker_key_pair("agent-two")
    run = live_run(key=key, owner=user, datasets=["fetchml://datasets/mnist"])

    assert download(KeyClient(other_raw), f"/v1/datasets/mnist/content?task_id={run.task_id}").status_code == 404


def test_worker_must_name_the_task_it_prepares(user, user_client):
    upload(user_client)
    key, raw = worker_key_pair()
    live_run(key=key, owner=user, datasets=["fetchml://datasets/mnist"])

    response = download(KeyClient(raw), "/v1/datasets/mnist/content")

    assert response.status_code == 422
    assert response.json()["details"][0]["field"] == "task_id"


def test_delete_removes_the_row_and_the_stored_file(user_client, storage_dir, django_capture_on_commit_callbacks):
    upload(user_client)

    with django_capture_on_commit_callbacks(execute=True):
        response = user_client.delete("/v1/datasets/mnist")

    assert response.status_code == 204
    assert not Dataset.objects.exists()
    assert stored_files(storage_dir) == []
    assert upload(user_client).status_code == 201


def test_other_user_cannot_delete_a_dataset(user_client, other_client):
    upload(user_client)

    assert other_client.delete("/v1/datasets/mnist?owner=alice").status_code == 404
    assert Dataset.objects.exists()


def test_a_mistyped_parameter_of_a_delete_is_refused_and_deletes_nothing(user_client):
    upload(user_client, name="mine")

    response = user_client.delete("/v1/datasets/mine?onwer=alice")

    assert (response.status_code, response.json()["details"][0]["field"]) == (400, "onwer")
    assert user_client.get("/v1/datasets/mine").status_code == 200


def test_a_parameter_of_an_upload_given_twice_is_refused(user_client):
    response = user_client.post(
        "/v1/datasets?name=first&name=second", data=DATA, content_type="application/octet-stream"
    )

    assert (response.status_code, response.json()["details"][0]["field"]) == (400, "name")
