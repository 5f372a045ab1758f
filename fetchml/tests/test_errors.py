"""Every error, from every layer, has the body {"error", "code", "trace_id"} and an X-Request-ID."""

import json
import logging

import pytest
from django.conf import settings
from django.test import Client

from fetchml.tests.urls import SECRET_MESSAGE

pytestmark = [pytest.mark.urls("fetchml.tests.urls"), pytest.mark.django_db]


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.content
    assert response["Content-Type"].startswith("application/json")
    body = response.json()
    assert {"error", "code", "trace_id"} <= body.keys()
    assert body["code"] == code
    assert body["error"]
    assert body["trace_id"] == response["X-Request-ID"]
    return body


def test_unknown_url_is_not_found_in_the_standard_format(user_client):
    assert_error(user_client.get("/v1/no-such-thing"), 404, "NOT_FOUND")


def test_unknown_url_without_a_key_is_also_not_found_in_the_standard_format(anon_client):
    assert_error(anon_client.get("/nowhere"), 404, "NOT_FOUND")


def compact(response) -> bytes:
    """The body as DRF's JSONRenderer renders it: no spaces after separators."""
    return json.dumps(response.json(), separators=(",", ":"), ensure_ascii=False).encode()


def test_error_bodies_made_outside_drf_are_compact_as_drf_renders_them(user_client, settings):
    not_found = user_client.get("/v1/no-such-thing")
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 2048
    too_large = user_client.generic("POST", "/v1/test/echo", "a" * 4096, content_type="application/json")

    assert (not_found.status_code, too_large.status_code) == (404, 413)
    assert not_found.content == compact(not_found)
    assert too_large.content == compact(too_large)


def test_method_not_allowed_on_an_api_view_is_bad_request_with_allow(user_client):
    response = user_client.put("/v1/test/echo", {"name": "x"}, format="json")
    assert_error(response, 405, "BAD_REQUEST")
    assert "POST" in response["Allow"]


def test_method_not_allowed_on_a_plain_view_is_bad_request_in_the_standard_format(anon_client):
    response = anon_client.post("/health")
    assert_error(response, 405, "BAD_REQUEST")
    assert "GET" in response["Allow"]


@pytest.mark.parametrize(
    "path",
    [
        "/health",
        "/v1/scheduler/status/stream",
        "/v1/scheduler/jobs/6f1c0000-0000-4000-8000-000000000000/stream",
        "/v1/tasks/6f1c0000-0000-4000-8000-000000000000/logs",
        f"{settings.STATIC_URL}admin/css/base.css",
    ],
)
@pytest.mark.parametrize("method", ["post", "put", "patch", "delete"])
def test_another_method_on_a_read_only_plain_view_is_405_not_a_csrf_refusal(path, method):
    # As a real client sends it: with no CSRF cookie, which a browser form would carry.
    response = getattr(Client(enforce_csrf_checks=True), method)(path)
    assert_error(response, 405, "BAD_REQUEST")
    assert response["Allow"] == "GET, HEAD"


def test_malformed_json_is_bad_request(user_client):
    response = user_client.generic("POST", "/v1/test/echo", b'{"name": ', content_type="application/json")
    assert_error(response, 400, "BAD_REQUEST")


def test_unsupported_media_type_is_bad_request_with_status_415(user_client):
    response = user_client.generic("POST", "/v1/test/echo", b"name=x", content_type="text/plain")
    assert_error(response, 415, "BAD_REQUEST")


def test_validation_error_names_each_bad_field(user_client):
    response = user_client.post(
        "/v1/test/echo", {"name": "far-too-long", "items": [{"size": 1}, {"size": 0}]}, format="json"
    )
    body = assert_error(response, 422, "VALIDATION_ERROR")
    fields = {detail["field"] for detail in body["details"]}
    assert fields == {"name", "items[1].size"}
    assert all(detail["message"] for detail in body["details"])


def test_missing_required_field_is_named_in_details(user_client):
    body = assert_error(user_client.post("/v1/test/echo", {}, format="json"), 422, "VALIDATION_ERROR")
    assert [detail["field"] for detail in body["details"]] == ["name"]


def test_oversized_json_body_is_413_before_the_view_reads_it(user_client):
    big = json.dumps({"name": "x", "pad": "a" * settings.DATA_UPLOAD_MAX_MEMORY_SIZE})
    response = user_client.generic("POST", "/v1/test/echo", big, content_type="application/json")
    body = assert_error(response, 413, "BAD_REQUEST")
    assert "too large" in body["error"]


def test_body_limit_follows_the_setting(user_client, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 2048
    body = json.dumps({"name": "x", "pad": "a" * 2048})
    response = user_client.generic("POST", "/v1/test/echo", body, content_type="application/json")
    assert_error(response, 413, "BAD_REQUEST")
    small = user_client.post("/v1/test/echo", {"name": "x"}, format="json")
    assert small.status_code == 201


def test_oversized_body_without_a_key_is_refused_before_authentication(anon_client):
    big = "a" * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 1)
    response = anon_client.generic("POST", "/v1/test/echo", big, content_type="application/json")
    assert_error(response, 413, "BAD_REQUEST")


def test_unhandled_error_in_an_api_view_is_internal_error_without_details(user_client, caplog):
    client = Client(raise_request_exception=False, HTTP_X_API_KEY=user_client.raw_key)
    with caplog.at_level(logging.ERROR, logger="fetchml.errors"):
        response = client.get("/v1/test/boom")
    body = assert_error(response, 500, "INTERNAL_ERROR")
    assert SECRET_MESSAGE not in response.content.decode()
    assert "Traceback" not in response.content.decode()
    assert body["error"] == "An internal error occurred"
    # The details are in the log, under the same trace id.
    logged = [r for r in caplog.records if r.name == "fetchml.errors"]
    assert logged and logged[0].exc_info is not None
    assert logged[0].trace_id == body["trace_id"]


def test_a_database_out_of_reach_is_service_unavailable_with_retry_after_and_no_details(user_client):
    client = Client(raise_request_exception=False, HTTP_X_API_KEY=user_client.raw_key)
    response = client.get("/v1/test/database-down")
    body = assert_error(response, 503, "SERVICE_UNAVAILABLE")
    assert response["Retry-After"] == "1"
    assert "10.0.0.5" not in body["error"] and SECRET_MESSAGE not in response.content.decode()


def test_a_session_the_database_ended_while_idle_in_a_transaction_is_service_unavailable(user_client):
    client = Client(raise_request_exception=False, HTTP_X_API_KEY=user_client.raw_key)

    response = client.get("/v1/test/session-ended")

    assert_error(response, 503, "SERVICE_UNAVAILABLE")
    assert response["Retry-After"] == "1"


def test_unhandled_error_in_a_plain_view_is_internal_error_without_details(db):
    client = Client(raise_request_exception=False)
    response = client.get("/test/plain-boom")
    assert_error(response, 500, "INTERNAL_ERROR")
    assert SECRET_MESSAGE not in response.content.decode()


def test_unhandled_error_stays_hidden_with_debug_on(db, settings):
    settings.DEBUG = True
    client = Client(raise_request_exception=False)
    response = client.get("/test/plain-boom")
    assert_error(response, 500, "INTERNAL_ERROR")
    assert SECRET_MESSAGE not in response.content.decode()


def test_every_response_has_a_request_id_also_success(anon_client):
    response = anon_client.get("/health")
    assert response["X-Request-ID"]


def test_each_request_gets_its_own_trace_id(anon_client):
    first = anon_client.get("/nowhere").json()["trace_id"]
    second = anon_client.get("/nowhere").json()["trace_id"]
    assert first != second


def test_a_well_formed_incoming_request_id_is_kept(anon_client):
    response = anon_client.get("/nowhere", HTTP_X_REQUEST_ID="proxy-1234abcd")
    assert response["X-Request-ID"] == "proxy-1234abcd"
    assert response.json()["trace_id"] == "proxy-1234abcd"


def test_a_malformed_incoming_request_id_is_replaced(anon_client):
    response = anon_client.get("/nowhere", HTTP_X_REQUEST_ID="evil\nlog line injected")
    assert response["X-Request-ID"] != "evil\nlog line injected"
    assert "\n" not in response["X-Request-ID"]


def test_the_access_log_line_carries_the_trace_id(user_client, caplog):
    with caplog.at_level(logging.INFO, logger="fetchml.request"):
        response = user_client.get("/v1/test/echo")
    assert response.status_code == 200
    records = [r for r in caplog.records if r.name == "fetchml.request"]
    assert len(records) == 1
    assert records[0].trace_id == response["X-Request-ID"]
    line = logging.Formatter(settings.LOGGING["formatters"]["plain"]["format"]).format(records[0])
    assert f"trace_id={response['X-Request-ID']}" in line
    assert "GET /v1/test/echo 200" in line
