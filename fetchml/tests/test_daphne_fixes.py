"""What daphne puts on the wire: status lines with their reason phrases, close codes with their reasons."""

import http.client
import json
import socket
from http import HTTPStatus

import pytest
from django.db import connection

from fetchml.testing import LiveServer, database_url_for

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


def _raw_answer(server: LiveServer, request: bytes) -> tuple[str, dict]:
    with socket.create_connection((server.host, server.port), timeout=15) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0].decode(), json.loads(body)


def test_a_request_line_over_16_kib_is_answered_414_in_the_error_format():
    with LiveServer(database_url=database_url_for(connection)) as server:
        status, body = _raw_answer(server, b"GET /v1/tasks?user_id=" + b"a" * 17_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")

    assert status == f"HTTP/1.1 414 {HTTPStatus(414).phrase}"
    assert (body["code"], body["error"]) == ("BAD_REQUEST", "The request line is longer than 16384 bytes")
    assert body["trace_id"]


def test_a_header_line_over_16_kib_is_answered_431_in_the_error_format():
    with LiveServer(database_url=database_url_for(connection)) as server:
        status, body = _raw_answer(server, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Note: " + b"a" * 17_000 + b"\r\n\r\n")

    assert status == f"HTTP/1.1 431 {HTTPStatus(431).phrase}"
    assert (body["code"], body["error"]) == ("BAD_REQUEST", "A header line is longer than 16384 bytes")
