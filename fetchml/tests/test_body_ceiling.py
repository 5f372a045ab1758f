"""The ceiling of a request body is its route's: an upload route's own limit for the raw bytes it
streams, DATA_UPLOAD_MAX_MEMORY_SIZE for every other body (daphne's reading and the middleware both
ask `body_ceiling`)."""

import pytest

from fetchml.conf import app_settings
from fetchml.middleware import body_ceiling

TASK_ID = "0F8FAD5B-D9CB-469F-A165-70867728950E"
RAW = "application/octet-stream"


@pytest.mark.parametrize(
    ("method", "path", "limit"),
    [
        ("POST", "/v1/snapshots", "MAX_SNAPSHOT_BYTES"),
        ("POST", "/v1/datasets", "MAX_DATASET_BYTES"),
        ("PUT", f"/v1/tasks/{TASK_ID}/artifacts/out/model.bin", "MAX_ARTIFACT_BYTES_PER_TASK"),
        ("put", f"/v1/tasks/{TASK_ID.lower()}/artifacts/commit", "MAX_ARTIFACT_BYTES_PER_TASK"),
        ("PUT", f"/v1/tasks/{TASK_ID}/artifacts/dir/", "MAX_ARTIFACT_BYTES_PER_TASK"),  # the view says 422
    ],
)
def test_an_upload_route_streams_raw_bytes_up_to_its_own_limit(method, path, limit):
    assert body_ceiling(RAW, method=method, path=path) == getattr(app_settings, limit)
    assert body_ceiling(f"{RAW.upper()}; charset=binary", method=method, path=path) == getattr(app_settings, limit)


@pytest.mark.parametrize(
    ("content_type", "method", "path"),
    [
        (RAW, "POST", "/v1/tasks"),
        (RAW, "POST", "/v1/tasks/"),
        (RAW, "GET", "/v1/snapshots"),
        (RAW, "PUT", "/v1/snapshots"),
        (RAW, "POST", "/v1/snapshots/"),
        (RAW, "POST", "/v1/datasets/mnist"),
        (RAW, "POST", f"/v1/tasks/{TASK_ID}/artifacts/out.bin"),
        (RAW, "PUT", f"/v1/tasks/{TASK_ID}/artifacts"),
        (RAW, "PUT", "/v1/tasks/not-a-uuid/artifacts/out.bin"),
        (RAW, "POST", "/admin/login/"),
        (RAW, "POST", "/nowhere"),
        (RAW, "POST", ""),
        (RAW, "POST", "http://127.0.0.1/v1/snapshots"),  # not a path Django resolves
        (f"{RAW}-ish", "POST", "/v1/snapshots"),
        ("multipart/form-data; boundary=x", "POST", "/v1/datasets"),  # the upload views take raw bytes only
        ("application/json", "POST", "/v1/snapshots"),
    ],
)
def test_every_other_body_is_held_to_the_request_limit(settings, content_type, method, path):
    assert body_ceiling(content_type, method=method, path=path) == settings.DATA_UPLOAD_MAX_MEMORY_SIZE


@pytest.mark.django_db
def test_raw_bytes_over_the_request_limit_off_the_upload_routes_are_refused_413(settings, user_client):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 2048
    response = user_client.post("/v1/tasks", data=b"x" * 2049, content_type=RAW)

    assert response.status_code == 413
    body = response.json()
    assert (body["code"], body["error"]) == ("BAD_REQUEST", "Request body too large (limit 2048 bytes)")
    assert body["trace_id"]


@pytest.mark.django_db
def test_an_upload_over_the_request_limit_reaches_its_view(settings, user_client):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 2048
    response = user_client.post("/v1/datasets?name=big", data=b"7,0\n" * 1024, content_type=RAW)

    assert response.status_code == 201, response.content
