"""What daphne puts on the wire: status lines with their reason phrases, close codes with their reasons."""

import http.client
import json
from http import HTTPStatus

import pytest
from django.db import connection

from fetchml.testing import LiveServer, database_url_for, raw_http_answer

pytestmark = pytest.mark.django_db(transaction=True)


def test_rate_limited_answer_through_daphne_reads_429_too_many_requests():
    with LiveServer(
        database_url=database_url_for(connection), env={"FETCHML_RATE_LIMIT_AUTH_FAILURES": "1/m"}
    ) as server:
        client = http.client.HTTPConnection(server.host, server.port, timeout=15)
        try:
            answers = []
            for _ in range(2):
                client.request("GET", "/v1/queue", headers={"X-API-Key": "fml_wrong"})
                response = client.getresponse()
                response.read()
                answers.append((response.status, response.reason))
        finally:
            client.close()

    assert answers == [(401, "Unauthorized"), (429, "Too Many Requests")]


def test_a_request_line_over_16_kib_is_answered_414_in_the_error_format():
    with LiveServer(database_url=database_url_for(connection)) as server:
        status, _, body = raw_http_answer(
            server, b"GET /v1/tasks?user_id=" + b"a" * 17_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        )

    assert status == f"HTTP/1.1 414 {HTTPStatus(414).phrase}"
    assert (body["code"], body["error"]) == ("BAD_REQUEST", "The request line is longer than 16384 bytes")
    assert body["trace_id"]


def test_a_header_line_over_16_kib_is_answered_431_in_the_error_format():
    with LiveServer(database_url=database_url_for(connection)) as server:
        status, _, body = raw_http_answer(
            server, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Note: " + b"a" * 17_000 + b"\r\n\r\n"
        )

    assert status == f"HTTP/1.1 431 {HTTPStatus(431).phrase}"
    assert (body["code"], body["error"]) == ("BAD_REQUEST", "A header line is longer than 16384 bytes")


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n{}",
        b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}",
        b"GET /v1/tasks?user_id=\xff HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    ],
    ids=["negative-content-length", "content-length-not-a-number", "raw-non-ascii-byte"],
)
def test_a_request_twisted_cannot_read_is_answered_400_in_the_error_format(request_bytes):
    with LiveServer(database_url=database_url_for(connection)) as server:
        status, _, body = raw_http_answer(server, request_bytes)

    assert status == "HTTP/1.1 400 Bad Request"
    assert (body["code"], body["error"]) == ("BAD_REQUEST", "The request is malformed")
    assert body["trace_id"]


def test_daphnes_own_error_answers_are_in_the_error_format():
    from daphne.http_protocol import WebRequest

    import fetchml.asgi  # noqa: F401  (installs the fixes, as serving does)

    class Replies:
        def __init__(self) -> None:
            self.sent: list[dict] = []

        def handle_reply(self, message: dict) -> None:
            self.sent.append(message)

    request = Replies()
    WebRequest.basic_error(request, 503, b"Service Unavailable", "Application failed to respond within time limit.")

    start, body = request.sent
    headers = dict(start["headers"])
    assert (start["status"], headers[b"Content-Type"]) == (503, b"application/json")
    said = json.loads(body["body"])
    assert (said["code"], said["error"]) == ("SERVICE_UNAVAILABLE", "Application failed to respond within time limit")
    assert headers[b"X-Request-ID"].decode() == said["trace_id"]
    assert int(headers[b"Content-Length"]) == len(body["body"])
