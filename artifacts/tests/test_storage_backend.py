from artifacts.storage import file_storage
from artifacts.tests.factories import download, sha256, stored_files, tar_gz

CODE = tar_gz({"train.py": b"print('elsewhere')\n"})


def test_a_fetchml_storages_alias_replaces_the_file_system(settings, user_client, storage_dir):
    # Stands in for an S3-compatible backend: nothing may rely on local paths.
    settings.STORAGES = {**settings.STORAGES, "fetchml": {"BACKEND": "django.core.files.storage.InMemoryStorage"}}

    snapshot_id = user_client.post("/v1/snapshots", data=CODE, content_type="application/octet-stream").json()["id"]
    response = download(user_client, f"/v1/snapshots/{snapshot_id}", HTTP_RANGE="bytes=5-")

    assert snapshot_id == sha256(CODE)
    assert response.status_code == 206
    assert response.content_bytes == CODE[5:]
    assert stored_files(storage_dir) == []
    assert type(file_storage()).__name__ == "InMemoryStorage"
