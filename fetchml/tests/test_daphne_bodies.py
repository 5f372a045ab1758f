"""Through a live daphne: a body over its ceiling, or a large body without a usable key, is
answered before it is read (so never spooled to disk); a large body with a usable key goes through."""

import http.client
import json
import socket
from collections.abc import Iterator

import pytest
from django.db import connection

from artifacts.models import Dataset
from fetchml.testing import LiveServer, database_url_for, raw_http_answer

pytestmark = pytest.mark.django_db(transaction=True)

BOGUS_KEY = "fetchml_bogus00000_" + "x" * 43
LARGE = 300_000  # over Twisted's 100 kB threshold for spooling to a file


@pytest.fixture(scope="module")
def server(django_db_setup, django_db_blocker) -> Iterator[LiveServer]:
    with django_db_blocker.unblock(), LiveServer(database_url=database_url_for(connection)) as live:
        yield live


def _one_response(sock: socket.socket) -> bytes:
    """One whole response read from a kept-alive connection (by its Content-Length)."""
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(65536) or pytest.fail(f"connection closed: {received!r}")
    head, _, body = received.partition(b"\r\n\r\n")
    length = int(
        next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    )
    while len(body) < length:
        body += sock.recv(65536) or pytest.fail("connection closed mid-body")
    return head + b"\r\n\r\n" + body


def _head(method: str, path: str, *, key: str | None, content_type: str, length: int, expect: bool = False) -> bytes:
    lines = [
        f"{method} {path} HTTP/1.1",
        "Host: 127.0.0.1",
        f"Content-Type: {content_type}",
        f"Content-Length: {length}",
    ]
    lines += [f"X-API-Key: {key}"] if key else []
    lines += ["Expect: 100-continue"] if expect else []
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_a_json_body_declared_over_the_limit_is_answered_413_before_it_is_sent(server):
    head = _head("POST", "/v1/tasks", key=BOGUS_KEY, content_type="application/json", length=10 * 2**30)

    status, _, body = raw_http_answer(server, head)

    assert status == "HTTP/1.1 413 Request Entity Too Large"
    assert (body["code"], body["error"]) == ("BAD_REQUEST", "Request body too large (limit 1048576 bytes)")
    assert body["trace_id"]


def test_an_upload_declared_over_every_upload_limit_is_answered_413_before_it_is_sent(server):
    head = _head("POST", "/v1/datasets?name=big", key=BOGUS_KEY, content_type="application/octet-stream", length=2**40)

    status, _, _ = raw_http_answer(server, head)

    assert status == "HTTP/1.1 413 Request Entity Too Large"


@pytest.mark.parametrize("key", [BOGUS_KEY, None], ids=["bad-key", "no-key"])
def test_a_large_upload_without_a_usable_key_is_answered_401_before_it_is_sent(server, key):
    head = _head("POST", "/v1/datasets?name=big", key=key, content_type="application/octet-stream", length=10**8)

    status, headers, body = raw_http_answer(server, head)

    assert status == "HTTP/1.1 401 Unauthorized"
    assert (body["code"], body["error"]) == ("UNAUTHORIZED", "Invalid or missing API key")
    assert headers["www-authenticate"] == 'ApiKey header="X-API-Key"'
    assert not Dataset.objects.exists()


def test_a_client_waiting_for_100_continue_is_refused_without_being_asked_for_its_body(server):
    head = _head(
        "POST",
        "/v1/datasets?name=big",
        key=BOGUS_KEY,
        content_type="application/octet-stream",
        length=10**8,
        expect=True,
    )

    with socket.create_connection((server.host, server.port), timeout=15) as sock:
        sock.sendall(head)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk

    assert received.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    assert b"100 Continue" not in received


def test_a_large_upload_with_a_usable_key_is_stored(server, user_client):
    data = b"7,0\n" * (LARGE // 4)
    client = http.client.HTTPConnection(server.host, server.port, timeout=15)
    try:
        headers = {"X-API-Key": user_client.raw_key, "Content-Type": "application/octet-stream"}
        client.request("POST", "/v1/datasets?name=mnist", body=data, headers=headers)
        response = client.getresponse()
        answer = json.loads(response.read())
    finally:
        client.close()

    assert response.status == 201, answer
    assert Dataset.objects.get(name="mnist").size == len(data)


def test_a_large_upload_waiting_for_100_continue_is_asked_for_its_body_once_its_key_is_accepted(server, user_client):
    data = b"7,0\n" * (LARGE // 4)
    head = _head(
        "POST",
        "/v1/datasets?name=mnist",
        key=user_client.raw_key,
        content_type="application/octet-stream",
        length=len(data),
        expect=True,
    )

    with socket.create_connection((server.host, server.port), timeout=15) as sock:
        sock.sendall(head)
        interim = sock.recv(65536)
        sock.sendall(data)
        final = _one_response(sock)

    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert final.startswith(b"HTTP/1.1 201 Created\r\n"), final[:200]
    assert Dataset.objects.get(name="mnist").size == len(data)


def test_a_chunked_upload_of_several_megabytes_with_a_usable_key_is_stored_whole(server, user_client):
    piece = b"7,0\n" * 65_536  # 256 KiB: the body passes the held megabyte while its key is checked
    client = http.client.HTTPConnection(server.host, server.port, timeout=15)
    try:
        headers = {"X-API-Key": user_client.raw_key, "Content-Type": "application/octet-stream"}
        client.request("POST", "/v1/datasets?name=big", body=iter([piece] * 12), headers=headers, encode_chunked=True)
        response = client.getresponse()
        answer = json.loads(response.read())
    finally:
        client.close()

    assert response.status == 201, answer
    assert Dataset.objects.get(name="big").size == 12 * len(piece)


def test_an_upload_outside_the_api_is_held_to_the_request_limit(server):
    head = _head("POST", "/admin/login/", key=None, content_type="multipart/form-data; boundary=x", length=2**31)

    status, _, body = raw_http_answer(server, head)

    assert status == "HTTP/1.1 413 Request Entity Too Large"
    assert body["error"] == "Request body too large (limit 1048576 bytes)"


def test_a_large_form_outside_the_api_needs_no_api_key(server):
    form = b"username=root&password=" + b"x" * LARGE
    client = http.client.HTTPConnection(server.host, server.port, timeout=15)
    try:
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        client.request("POST", "/admin/login/", body=form, headers=headers)
        response = client.getresponse()
        response.read()
    finally:
        client.close()

    assert response.status == 403  # Django's CSRF check answered: the body reached the application
