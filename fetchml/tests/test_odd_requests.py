"""Requests no client should send, but any may: each is refused in the standard error format,
saying what is wrong, never answered 500."""

import uuid

import pytest
from django.test import Client

from artifacts.tests.factories import tar_gz
from tasks.services import task_submit

pytestmark = pytest.mark.django_db


def _error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.content[:300]
    body = response.json()
    assert (body["code"], bool(body["trace_id"])) == (code, True)
    return body


def test_more_query_parameters_than_django_reads_is_a_400_saying_so_even_without_a_key(anon_client, settings):
    query = "&".join(f"a{index}=1" for index in range(settings.DATA_UPLOAD_MAX_NUMBER_FIELDS + 1))

    body = _error(anon_client.get(f"/v1/tasks?{query}"), 400, "BAD_REQUEST")

    assert body["error"] == "Too many query parameters or form fields (at most 1000)"


def test_more_query_parameters_than_django_reads_is_one_warning_line_not_a_traceback(anon_client, settings, caplog):
    query = "&".join(f"a{index}=1" for index in range(settings.DATA_UPLOAD_MAX_NUMBER_FIELDS + 1))

    anon_client.get(f"/v1/tasks?{query}")

    assert [
        (record.levelname, record.exc_info) for record in caplog.records if "suspicious" in record.getMessage()
    ] == [("WARNING", None)]


def test_a_host_the_server_does_not_serve_is_told_so(db):
    response = Client(HTTP_HOST="elsewhere.example").get("/health")

    body = _error(response, 400, "BAD_REQUEST")
    assert body["error"] == "The Host header names no host this server answers for (ALLOWED_HOSTS)"
    assert "elsewhere" not in body["error"]


def test_an_unknown_field_named_by_a_lone_surrogate_is_a_422_with_the_name_escaped(user_client):
    raw = b'{"\\ud800": 1, "job_name": "x", "entrypoint": "true"}'

    response = user_client.generic("POST", "/v1/tasks", raw, content_type="application/json")

    body = _error(response, 422, "VALIDATION_ERROR")
    assert body["details"] == [{"field": "\ud800", "message": "Unknown field."}]
    assert b"\\ud800" in response.content


def test_an_unknown_field_named_by_the_empty_string_is_named(user_client):
    response = user_client.post("/v1/tasks", {"": 1, "job_name": "x", "entrypoint": "true"}, format="json")

    body = _error(response, 422, "VALIDATION_ERROR")
    assert body["details"] == [{"field": "", "message": "Unknown field."}]
    assert body["error"] == 'Validation failed: ""'


def test_a_body_wide_error_still_names_no_field(user_client):
    body = _error(user_client.post("/v1/tasks", [1], format="json"), 422, "VALIDATION_ERROR")

    assert [detail["field"] for detail in body["details"]] == [None]


def test_an_operation_that_takes_a_body_refuses_none_at_all(user_client):
    body = _error(user_client.generic("POST", "/v1/tasks", b"", content_type="application/json"), 400, "BAD_REQUEST")

    assert body["error"] == "Malformed request body: the body is empty; this operation takes a JSON object"


def test_a_task_id_in_upper_case_is_the_same_task(user_client, user):
    task = task_submit(owner=user, job_name="train", entrypoint="true")

    response = user_client.get(f"/v1/tasks/{str(task.id).upper()}")

    assert (response.status_code, response.json()["id"]) == (200, str(task.id))


def test_an_unknown_format_is_a_400_naming_the_formats_there_are(user_client):
    body = _error(user_client.get("/v1/queue", {"format": "xml"}), 400, "BAD_REQUEST")

    assert body["details"] == [{"field": "format", "message": "Must be one of: json, api."}]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("post", "/v1/tasks", {"job_name": "x", "entrypoint": "true"}),
        ("patch", f"/v1/scheduler/jobs/{uuid.uuid4()}/priority", {"priority": 5}),
        ("delete", f"/v1/tasks/{uuid.uuid4()}", None),
    ],
)
def test_a_write_refuses_query_parameters_it_does_not_take(user_client, method, path, body):
    response = getattr(user_client, method)(f"{path}?dry_run=1", body, format="json")

    assert _error(response, 400, "BAD_REQUEST")["details"] == [
        {"field": "dry_run", "message": "Unknown query parameter."}
    ]


def test_an_error_asked_for_as_html_keeps_its_message_and_details(user_client):
    response = user_client.post("/v1/tasks", {"job_name": "x"}, format="json", HTTP_ACCEPT="text/html")

    body = _error(response, 422, "VALIDATION_ERROR")
    assert body["error"] == "Validation failed: entrypoint"
    assert body["details"][0]["field"] == "entrypoint"


def test_a_snapshot_id_in_upper_case_names_the_snapshot(user_client):
    uploaded = user_client.post(
        "/v1/snapshots", data=tar_gz({"train.py": b"print(1)"}), content_type="application/octet-stream"
    )
    snapshot_id = uploaded.json()["id"]

    response = user_client.post(
        "/v1/tasks",
        {"job_name": "x", "entrypoint": "python train.py", "snapshot_id": snapshot_id.upper()},
        format="json",
    )

    assert (response.status_code, response.json()["snapshot_id"]) == (201, snapshot_id)


def test_a_console_request_refused_as_malformed_is_a_page(console, settings):
    query = "&".join(f"a{index}=1" for index in range(settings.DATA_UPLOAD_MAX_NUMBER_FIELDS + 1))

    response = console.get(f"/admin/tasks/task/?{query}")

    assert response.status_code == 400
    assert response["Content-Type"].startswith("text/html")


def test_a_nested_field_named_by_the_empty_string_is_named_in_quotes(user_client):
    body = {"job_name": "x", "entrypoint": "true", "dataset_specs": [{"": 1}]}

    details = _error(user_client.post("/v1/tasks", body, format="json"), 422, "VALIDATION_ERROR")["details"]

    assert [detail["field"] for detail in details] == ['dataset_specs.0.""']
