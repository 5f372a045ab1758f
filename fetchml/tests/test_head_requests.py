"""HEAD on the views outside DRF (the SSE streams, the log page): the GET's status and headers, no
body, and the response over at once, over real HTTP against a live daphne and through the ASGI
application."""

import asyncio
import http.client
import socket
import time

import pytest
from django.db import connection

from fetchml.asgi import application
from fetchml.testing import LiveServer, database_url_for, http_scope, request_then_stay, run_async
from fetchml.tests.factories import ApiKeyFactory
from tasks.logs import append_lines
from tasks.services import task_submit

pytestmark = pytest.mark.django_db(transaction=True)

# Short heartbeats: a stream that kept running would write one to the connection at once.
ENV = {"FETCHML_SSE_HEARTBEAT_SECONDS": "0.2"}
STREAMS = ["/v1/scheduler/status/stream", "/v1/scheduler/jobs/{task}/stream", "/v1/tasks/{task}/logs?follow=true"]
# Headers whose values differ from one answer to the next, and how a GET's body is framed.
VARYING = {"date", "x-request-id", "x-ratelimit-remaining", "x-ratelimit-reset", "transfer-encoding"}


@pytest.fixture
def key(user) -> str:
    return ApiKeyFactory.raw(user=user)


@pytest.fixture
def task(user):
    return task_submit(owner=user, job_name="train")


def _request(method: str, path: str, key: str) -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {key}\r\nConnection: close\r\n\r\n".encode()


def _until_closed(server: LiveServer, request: bytes, *, seconds: float = 5.0) -> bytes:
    """Every byte the server sends in answer, up to its closing the connection within `seconds`."""
    received = b""
    deadline = time.monotonic() + seconds
    with socket.create_connection((server.host, server.port), timeout=seconds) as sock:
        sock.sendall(request)
        while True:
            sock.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                chunk = None
            if chunk == b"":
                return received
            assert chunk is not None and time.monotonic() < deadline, (
                f"the connection is still open after {seconds}s; the last bytes: {received[-200:]!r}"
            )
            received += chunk


def _header_block(server: LiveServer, request: bytes) -> bytes:
    """The status line and headers of the answer (the connection is closed after them)."""
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(request)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            assert chunk, f"closed before the headers ended: {received!r}"
            received += chunk
    return received.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"


def _status_and_headers(block: bytes) -> tuple[str, dict[str, str]]:
    status_line, *lines = block.decode("latin-1").strip().split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return status_line, {name: value for name, value in headers.items() if name not in VARYING}


@pytest.mark.parametrize("stream", STREAMS)
def test_head_of_a_stream_answers_the_gets_status_and_headers_with_no_body_and_ends(key, task, stream):
    path = stream.format(task=task.id)
    with LiveServer(database_url=database_url_for(connection), env=ENV) as server:
        answer = _until_closed(server, _request("HEAD", path, key))
        get_block = _header_block(server, _request("GET", path, key))

    headers_end = answer.find(b"\r\n\r\n") + 4
    assert answer[headers_end:] == b"", "a body after the headers"
    status_line, headers = _status_and_headers(answer[:headers_end])
    assert status_line == "HTTP/1.1 200 OK"
    assert headers["content-type"] == "text/event-stream"
    assert (status_line, headers) == _status_and_headers(get_block)


def test_a_kept_alive_connection_answers_its_next_request_after_a_head_of_a_stream(key, task):
    with LiveServer(database_url=database_url_for(connection), env=ENV) as server:
        client = http.client.HTTPConnection(server.host, server.port, timeout=5)
        try:
            client.request("HEAD", f"/v1/tasks/{task.id}/logs?follow=true", headers={"X-API-Key": key})
            head = client.getresponse()
            assert (head.status, head.read()) == (200, b"")

            client.request("GET", f"/v1/scheduler/jobs/{task.id}/stream", headers={"X-API-Key": key})
            get = client.getresponse()
            first_line = get.readline()
        finally:
            client.close()
    assert get.status == 200
    assert first_line == b"event: status\n"


def test_head_of_a_log_page_longer_than_a_chunk_sends_no_body_and_the_gets_length(key, task):
    # Over 64 KiB, the size of the pieces Django hands a body to the server in.
    lines = [{"stream": "stdout", "line": "x" * 1000} for _ in range(100)]
    append_lines(task_id=task.id, attempt=1, lines=lines)
    path = f"/v1/tasks/{task.id}/logs"
    with LiveServer(database_url=database_url_for(connection)) as server:
        answer = _until_closed(server, _request("HEAD", path, key))
        get = _until_closed(server, _request("GET", path, key))

    headers_end = answer.find(b"\r\n\r\n") + 4
    assert answer[headers_end:] == b"", f"{len(answer) - headers_end} bytes of body"
    status_line, headers = _status_and_headers(answer[:headers_end])
    get_status_line, get_headers = _status_and_headers(get.partition(b"\r\n\r\n")[0])
    assert (status_line, headers) == (get_status_line, get_headers)
    assert int(headers["content-length"]) == len(get.partition(b"\r\n\r\n")[2]) > 65536


def test_head_of_an_api_answer_longer_than_a_chunk_sends_no_body_and_the_gets_length(key):
    with LiveServer(database_url=database_url_for(connection)) as server:
        answer = _until_closed(server, _request("HEAD", "/v1/schema", key))
        get = _until_closed(server, _request("GET", "/v1/schema", key))

    headers_end = answer.find(b"\r\n\r\n") + 4
    assert answer[headers_end:] == b"", f"{len(answer) - headers_end} bytes of body"
    status_line, headers = _status_and_headers(answer[:headers_end])
    assert status_line == "HTTP/1.1 200 OK"
    assert int(headers["content-length"]) == len(get.partition(b"\r\n\r\n")[2]) > 65536


@run_async
async def test_head_of_a_stream_never_starts_it(key, group_moves, thread_connections):
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    path = "/v1/scheduler/status/stream"
    scope = http_scope("HEAD", path, key=key)
    async with asyncio.timeout(5):
        await application(scope, request_then_stay(), send)

    start, *bodies = sent
    assert (start["type"], start["status"]) == ("http.response.start", 200)
    assert (b"Content-Type", b"text/event-stream") in start["headers"]
    assert [body.get("body", b"") for body in bodies] == [b""] * len(bodies)
    assert bodies[-1].get("more_body", False) is False
    assert group_moves.joined == []
