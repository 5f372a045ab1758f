"""Artifact paths with characters the server refuses reach the upload view, which answers 422 for them."""

import pytest

from artifacts.models import Artifact
from artifacts.tests.factories import live_run, sha256, worker_key_pair
from conftest import KeyClient
from scheduler.models import NodeAssignment

BODY = b"output"


@pytest.fixture
def worker(db):
    return worker_key_pair()


def put(client: KeyClient, run: NodeAssignment, quoted_path: str):
    return client.put(
        f"/v1/tasks/{run.task_id}/artifacts/{quoted_path}",
        data=BODY,
        content_type="application/octet-stream",
        HTTP_X_FETCHML_TOKEN=str(run.token),
        HTTP_X_CONTENT_SHA256=sha256(BODY),
    )


@pytest.mark.parametrize("quoted_path", ["new%0Aline.txt", "dir%0A/model.bin", "cr%0Dhere.txt", "tab%09name.txt"])
def test_upload_of_a_name_with_a_control_character_is_422_in_the_standard_error_format(user, worker, quoted_path):
    run = live_run(key=worker[0], owner=user)

    response = put(KeyClient(worker[1]), run, quoted_path)

    assert response.status_code == 422
    body = response.json()
    assert set(body) == {"error", "code", "trace_id", "details"}
    assert body["details"] == [{"field": "path", "message": "must not contain NUL or other control characters"}]
    assert not Artifact.objects.exists()
