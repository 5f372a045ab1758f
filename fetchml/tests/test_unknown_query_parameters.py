"""A read refuses a query parameter it does not know, or one of one value given twice, with a 400
naming it: a mistyped or unsupported filter must not be ignored and the answer read as if it had
applied."""

import pytest

from tasks.services import task_submit

pytestmark = pytest.mark.django_db


def _assert_refused(response, *names: str) -> None:
    assert response.status_code == 400, response.content[:300]
    body = response.json()
    assert (body["code"], bool(body["trace_id"])) == ("BAD_REQUEST", True)
    assert body["error"] == "Invalid query parameters: " + ", ".join(names)
    assert [(detail["field"], detail["message"]) for detail in body["details"]] == [
        (name, "Unknown query parameter.") for name in names
    ]


@pytest.mark.parametrize("params", [{"stauts": "failed"}, {"order_by": "priority"}, {"metadata.lr": "0.1"}])
def test_an_unknown_task_filter_is_refused(user_client, params):
    _assert_refused(user_client.get("/v1/tasks", params), *params)


def test_every_unknown_parameter_is_named_beside_a_bad_known_one(user_client):
    response = user_client.get("/v1/tasks", {"status": "bogus", "lr": "0.1", "sort": "x"})

    assert response.status_code == 400
    assert [detail["field"] for detail in response.json()["details"]] == ["status", "lr", "sort"]


def test_the_contracts_plugin_configs_parameter_and_drfs_format_are_taken(user_client):
    assert user_client.get("/v1/tasks", {"plugin_configs": "x", "format": "json"}).status_code == 200


def test_an_unknown_log_parameter_is_refused(user_client, user):
    task = task_submit(owner=user, job_name="train")

    _assert_refused(user_client.get(f"/v1/tasks/{task.id}/logs", {"limit": "5"}), "limit")


def test_an_unknown_audit_filter_is_refused(admin_client_key):
    _assert_refused(admin_client_key.get("/v1/audit/events", {"actor": "alice"}), "actor")


@pytest.mark.parametrize(
    "path",
    [
        "/v1/",
        "/v1/queue",
        "/v1/plugins",
        "/v1/plugins/tensorboard",
        "/v1/plugins/tensorboard/config",
        "/v1/scheduler/status",
        "/v1/scheduler/workers",
        "/v1/jupyter/services",
    ],
)
def test_a_read_without_parameters_refuses_any_but_format(user_client, path):
    assert user_client.get(path, {"format": "json"}).status_code == 200
    _assert_refused(user_client.get(path, {"limit": "5"}), "limit")


def test_a_tasks_own_read_refuses_unknown_parameters(user_client, user):
    task = task_submit(owner=user, job_name="train")

    _assert_refused(user_client.get(f"/v1/tasks/{task.id}", {"fields": "status"}), "fields")


def test_the_audit_chain_root_refuses_unknown_parameters(admin_client_key):
    _assert_refused(admin_client_key.get("/v1/audit/chain-root", {"at": "5"}), "at")


def test_an_unknown_parameter_without_a_key_is_still_a_401(anon_client):
    assert anon_client.get("/v1/queue", {"limit": "5"}).status_code == 401


def test_a_filter_of_one_value_given_twice_is_refused(user_client):
    response = user_client.get("/v1/tasks?status=failed&status=running")

    assert response.status_code == 400
    assert response.json()["details"] == [
        {"field": "status", "message": "Given more than once; this parameter takes one value."}
    ]


def test_a_log_parameter_given_twice_is_refused(user_client, user):
    task = task_submit(owner=user, job_name="train")

    response = user_client.get(f"/v1/tasks/{task.id}/logs", {"tail": ["5", "6"]})

    assert response.status_code == 400
    assert response.json()["details"] == [
        {"field": "tail", "message": "Given more than once; this parameter takes one value."}
    ]


def test_an_unknown_parameter_of_the_artifact_list_is_refused(user_client, user):
    task = task_submit(owner=user, job_name="train")

    _assert_refused(user_client.get(f"/v1/tasks/{task.id}/artifacts", {"bogus": "1"}), "bogus")


def test_an_unknown_parameter_of_a_snapshot_upload_is_refused(user_client):
    response = user_client.post("/v1/snapshots?dry_run=1", data=b"x", content_type="application/octet-stream")

    _assert_refused(response, "dry_run")


def test_an_unknown_parameter_of_a_verification_is_refused(admin_client_key):
    _assert_refused(admin_client_key.post("/v1/audit/verify?dry_run=1", {}, format="json"), "dry_run")


def test_an_unknown_parameter_of_the_status_stream_is_refused(user_client):
    _assert_refused(user_client.get("/v1/scheduler/status/stream", {"foo": "1"}), "foo")


def test_more_parameters_than_django_reads_on_a_stream_is_a_400(user_client, settings):
    query = "&".join(f"a{index}=1" for index in range(settings.DATA_UPLOAD_MAX_NUMBER_FIELDS + 1))

    response = user_client.get(f"/v1/scheduler/status/stream?{query}")

    assert (response.status_code, response.json()["code"]) == (400, "BAD_REQUEST")
