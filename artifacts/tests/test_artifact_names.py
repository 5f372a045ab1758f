"""Artifact paths with characters the server refuses reach the upload view, which answers 422 for them."""

import pytest

from artifacts.models import Artifact
from artifacts.tests.factories import live_run, put, worker_key_pair
from conftest import KeyClient

BODY = b"output"


@pytest.fixture
def worker(db):
    return worker_key_pair()


@pytest.mark.parametrize("quoted_path", ["new%0Aline.txt", "dir%0A/model.bin", "cr%0Dhere.txt", "tab%09name.txt"])
def test_upload_of_a_name_with_a_control_character_is_422_in_the_standard_error_format(user, worker, quoted_path):
    run = live_run(key=worker[0], owner=user)

    response = put(KeyClient(worker[1]), run, quoted_path, BODY)

    assert response.status_code == 422
    body = response.json()
    assert set(body) == {"error", "code", "trace_id", "details"}
    assert body["details"] == [{"field": "path", "message": "must not contain NUL or other control characters"}]
    assert not Artifact.objects.exists()
