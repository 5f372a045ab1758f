"""GET /v1/tasks/{taskId}/logs without follow: stored lines as JSON, auth, params, errors."""

import json
import uuid

import pytest
from django.test import override_settings

from conftest import KeyClient
from tasks.logs import append_lines
from tasks.services import task_submit


@pytest.fixture
def task(user):
    task = task_submit(owner=user, job_name="train")
    append_lines(task_id=task.id, attempt=1, lines=[{"stream": "stdout", "line": f"line {n}"} for n in range(5)])
    return task


def _url(task_id) -> str:
    return f"/v1/tasks/{task_id}/logs"


def test_owner_gets_all_stored_lines_in_order(user_client, task):
    response = user_client.get(_url(task.id))

    assert response.status_code == 200
    body = response.json()
    assert [line["line"] for line in body["lines"]] == [f"line {n}" for n in range(5)]
    assert set(body["lines"][0]) == {"id", "stream", "line", "attempt", "node", "seq", "created_at"}
    assert body["task_id"] == str(task.id)
    assert body["status"] == "queued"
    assert body["has_more"] is False
    assert body["next_after_id"] == body["lines"][-1]["id"]


def test_log_page_and_its_error_bodies_are_compact_json(user_client, task):
    page = user_client.get(_url(task.id))
    missing = user_client.get(_url(uuid.uuid4()))

    assert (page.status_code, missing.status_code) == (200, 404)
    for response in (page, missing):
        assert response.content == json.dumps(response.json(), separators=(",", ":")).encode()


def test_tail_returns_only_the_last_lines(user_client, task):
    body = user_client.get(_url(task.id), {"tail": 2}).json()
    assert [line["line"] for line in body["lines"]] == ["line 3", "line 4"]


def test_after_id_pages_forward(user_client, task):
    first = user_client.get(_url(task.id), {"tail": 5}).json()["lines"]
    body = user_client.get(_url(task.id), {"after_id": first[2]["id"]}).json()
    assert [line["line"] for line in body["lines"]] == ["line 3", "line 4"]


def test_tail_and_after_id_together_are_a_bad_request(user_client, task):
    response = user_client.get(_url(task.id), {"tail": 5, "after_id": 1})

    assert response.status_code == 400
    assert response.json()["details"][0]["field"] == "tail"


def test_admin_may_read_anyones_logs(admin_client_key, task):
    assert admin_client_key.get(_url(task.id)).status_code == 200


def test_another_user_gets_not_found(other_client, task):
    response = other_client.get(_url(task.id))
    assert response.status_code == 404
    assert response.json()["code"] == "NOT_FOUND"


def test_unknown_task_is_not_found(user_client):
    assert user_client.get(_url(uuid.uuid4())).status_code == 404


def test_missing_key_is_unauthorized(anon_client, task):
    response = anon_client.get(_url(task.id))
    assert response.status_code == 401
    assert response.json()["code"] == "UNAUTHORIZED"
    assert "trace_id" in response.json()


def test_invalid_key_is_unauthorized(task):
    assert KeyClient("fml_nope_nope").get(_url(task.id)).status_code == 401


def test_worker_key_is_forbidden(worker_key, task):
    response = KeyClient(worker_key).get(_url(task.id))
    assert response.status_code == 403
    assert response.json()["code"] == "FORBIDDEN"


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"tail": 0}, "tail"),
        ({"tail": 10_001}, "tail"),
        ({"tail": "ten"}, "tail"),
        ({"after_id": -1}, "after_id"),
        ({"follow": "maybe"}, "follow"),
    ],
)
def test_bad_parameters_are_a_400_naming_the_field(user_client, task, params, field):
    response = user_client.get(_url(task.id), params)
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "BAD_REQUEST"
    assert body["details"][0]["field"] == field


def test_only_get_is_allowed(user_client, task):
    response = user_client.post(_url(task.id))
    assert response.status_code == 405
    assert response.json()["code"] == "BAD_REQUEST"


def test_response_carries_rate_limit_headers(user_client, task):
    response = user_client.get(_url(task.id))
    assert int(response["X-RateLimit-Remaining"]) < int(response["X-RateLimit-Limit"])


@override_settings(FETCHML_RATE_LIMIT_GET="2/m")
def test_requests_over_the_rate_limit_are_refused(user_client, task):
    assert [user_client.get(_url(task.id)).status_code for _ in range(3)] == [200, 200, 429]
