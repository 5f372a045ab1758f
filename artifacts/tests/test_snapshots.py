import gzip
import io
import os

import pytest
from asgiref.sync import async_to_sync
from django.test import AsyncClient

from artifacts import storage
from artifacts.models import Snapshot
from artifacts.tests.factories import download, live_run, sha256, stored_files, tar_gz, worker_key_pair
from audit.models import AuditEvent
from conftest import KeyClient
from fetchml.errors import PayloadTooLarge

CODE = tar_gz({"train.py": b"print('hello')\n", "lib/util.py": b"X = 1\n"})


def upload(client: KeyClient, data: bytes = CODE):
    return client.post("/v1/snapshots", data=data, content_type="application/octet-stream")


def test_upload_returns_the_sha256_of_the_bytes_as_id(user_client):
    response = upload(user_client)

    assert response.status_code == 201
    assert response.json()["id"] == sha256(CODE)
    assert response.json()["size"] == len(CODE)


def test_uploading_the_same_bytes_again_returns_the_same_id_with_200(user_client, storage_dir):
    first = upload(user_client)
    second = upload(user_client)

    assert second.status_code == 200
    assert second.json()["id"] == first.json()["id"]
    assert len(stored_files(storage_dir)) == 1


def test_same_bytes_from_another_user_are_stored_once_and_new_to_that_user(user_client, other_client, storage_dir):
    upload(user_client)
    response = upload(other_client)

    assert response.status_code == 201
    assert len(stored_files(storage_dir)) == 1
    assert download(other_client, f"/v1/snapshots/{sha256(CODE)}").status_code == 200


def test_owner_downloads_the_snapshot(user_client):
    snapshot_id = upload(user_client).json()["id"]

    response = download(user_client, f"/v1/snapshots/{snapshot_id}")

    assert response.status_code == 200
    assert response["Content-Type"] == "application/gzip"
    assert response["Content-Length"] == str(len(CODE))
    assert response.content_bytes == CODE


def test_admin_downloads_any_snapshot(user_client, admin_client_key):
    snapshot_id = upload(user_client).json()["id"]

    response = download(admin_client_key, f"/v1/snapshots/{snapshot_id}")

    assert response.status_code == 200
    assert response.content_bytes == CODE


def test_other_user_cannot_download_a_snapshot(user_client, other_client):
    snapshot_id = upload(user_client).json()["id"]

    response = download(other_client, f"/v1/snapshots/{snapshot_id}")

    assert response.status_code == 404
    assert response.json()["code"] == "NOT_FOUND"


def test_unrelated_worker_cannot_download_a_snapshot(user, user_client):
    snapshot_id = upload(user_client).json()["id"]
    key, raw = worker_key_pair()
    live_run(key=key, owner=user, snapshot_id="")  # a live run, but not of this snapshot

    response = download(KeyClient(raw), f"/v1/snapshots/{snapshot_id}")

    assert response.status_code == 404


def test_worker_assigned_a_task_using_the_snapshot_downloads_it(user, user_client):
    snapshot_id = upload(user_client).json()["id"]
    key, raw = worker_key_pair()
    live_run(key=key, owner=user, snapshot_id=snapshot_id, status="preparing")

    response = download(KeyClient(raw), f"/v1/snapshots/{snapshot_id}")

    assert response.status_code == 200
    assert response.content_bytes == CODE


def test_worker_cannot_download_once_the_assignment_no_longer_holds_capacity(user, user_client):
    snapshot_id = upload(user_client).json()["id"]
    key, raw = worker_key_pair()
    assignment = live_run(key=key, owner=user, snapshot_id=snapshot_id)
    assignment.holds_capacity = False
    assignment.save()

    assert download(KeyClient(raw), f"/v1/snapshots/{snapshot_id}").status_code == 404


def test_a_task_naming_someone_elses_snapshot_does_not_open_it_to_the_worker(user_client, other_user):
    snapshot_id = upload(user_client).json()["id"]
    key, raw = worker_key_pair()
    live_run(key=key, owner=other_user, snapshot_id=snapshot_id)

    assert download(KeyClient(raw), f"/v1/snapshots/{snapshot_id}").status_code == 404


def test_worker_keys_cannot_upload_snapshots(worker_key):
    assert upload(KeyClient(worker_key)).status_code == 403


def test_upload_over_the_declared_limit_is_413_and_leaves_nothing(user_client, settings, storage_dir, spool_dir):
    settings.FETCHML_MAX_SNAPSHOT_BYTES = len(CODE) - 1

    response = upload(user_client)

    assert response.status_code == 413
    assert set(response.json()) == {"error", "code", "trace_id", "details"}
    assert stored_files(storage_dir) == [] and stored_files(spool_dir) == []
    assert not Snapshot.objects.exists()


def test_body_growing_past_the_limit_is_refused_while_streaming_and_its_spool_removed(spool_dir):
    # No Content-Length to trust: the limit is enforced on the bytes as they come.
    with pytest.raises(PayloadTooLarge):
        storage.receive(io.BytesIO(b"x" * 200_000), limit=100_000, declared_length=None, what="Snapshot")

    assert stored_files(spool_dir) == []


def test_upload_that_is_not_gzip_is_422_and_leaves_nothing(user_client, storage_dir, spool_dir):
    response = upload(user_client, b"just some bytes, not an archive")

    assert response.status_code == 422
    assert response.json()["code"] == "VALIDATION_ERROR"
    assert stored_files(storage_dir) == [] and stored_files(spool_dir) == []


def test_gzip_that_is_not_a_tar_is_422(user_client):
    response = upload(user_client, gzip.compress(b"plain text, no tar headers here" * 100))

    assert response.status_code == 422


def test_upload_bigger_than_the_in_memory_request_limit_is_streamed(user_client, settings):
    payload = tar_gz({"weights.bin": os.urandom(3 * 1024 * 1024)})  # random: gzip cannot shrink it
    assert len(payload) > 3 * settings.DATA_UPLOAD_MAX_MEMORY_SIZE

    response = upload(user_client, payload)

    assert response.status_code == 201
    assert response.json()["id"] == sha256(payload)
    assert download(user_client, f"/v1/snapshots/{sha256(payload)}").content_bytes == payload


def test_meta_gives_size_and_sha256_without_the_bytes(user_client):
    snapshot_id = upload(user_client).json()["id"]

    response = user_client.get(f"/v1/snapshots/{snapshot_id}/meta")

    assert response.status_code == 200
    assert response.json() | {"created_at": None} == {
        "id": snapshot_id,
        "sha256": snapshot_id,
        "size": len(CODE),
        "created_at": None,
    }


def test_download_is_audited_as_file_access(user_client):
    snapshot_id = upload(user_client).json()["id"]

    download(user_client, f"/v1/snapshots/{snapshot_id}")

    event = AuditEvent.objects.filter(event_type="file_access", action="download").get()
    assert (event.user_id, event.resource, event.ip_address) == ("alice", f"snapshot:{snapshot_id}", "127.0.0.1")


def test_refused_download_is_not_audited_as_a_read(user_client, other_client):
    snapshot_id = upload(user_client).json()["id"]

    download(other_client, f"/v1/snapshots/{snapshot_id}")

    assert not AuditEvent.objects.filter(event_type="file_access", action="download").exists()


def test_download_serves_a_single_range(user_client):
    snapshot_id = upload(user_client).json()["id"]

    response = download(user_client, f"/v1/snapshots/{snapshot_id}", HTTP_RANGE="bytes=10-19")

    assert response.status_code == 206
    assert response["Content-Range"] == f"bytes 10-19/{len(CODE)}"
    assert response.content_bytes == CODE[10:20]


def test_download_under_asgi_streams_from_an_async_iterator(user_client):
    # Django would collect a sync iterator into a list under ASGI (and warn,
    # which this suite turns into an error): the download must not do that.
    snapshot_id = upload(user_client).json()["id"]
    client = AsyncClient()

    async def fetch():
        response = await client.get(f"/v1/snapshots/{snapshot_id}", headers={"X-API-Key": user_client.raw_key})
        assert response.status_code == 200, response.content
        return response, b"".join([chunk async for chunk in response.streaming_content])

    response, content = async_to_sync(fetch)()

    assert response.status_code == 200
    assert response.is_async
    assert content == CODE


def test_upload_with_another_content_type_is_415(user_client):
    response = user_client.post("/v1/snapshots", data=CODE, content_type="application/gzip")

    assert response.status_code == 415
    assert not Snapshot.objects.exists()
