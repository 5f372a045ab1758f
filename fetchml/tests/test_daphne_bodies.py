"""Through a live daphne: a body over its ceiling, or a large body without a usable key, is
answered before it is read (so never spooled to disk); a large body with a usable key goes through."""

import http.client
import io
import json
import random
import socket
import tarfile
from collections.abc import Iterator

import pytest
from django.db import connection

from artifacts.models import Dataset, Snapshot
from fetchml.testing import LiveServer, database_url_for, raw_http_answer

pytestmark = pytest.mark.django_db(transaction=True)

BOGUS_KEY = "fetchml_bogus00000_" + "x" * 43
LARGE = 300_000  # over Twisted's 100 kB threshold for spooling to a file
REQUEST_LIMIT = 2**20  # DATA_UPLOAD_MAX_MEMORY_SIZE: every body but an upload route's upload
SNAPSHOT_LIMIT = 2 * 2**20  # the live server's FETCHML_MAX_SNAPSHOT_BYTES, over REQUEST_LIMIT
ARTIFACT_LIMIT = 2**30  # FETCHML_MAX_ARTIFACT_BYTES_PER_TASK's default
DATASET_LIMIT = 8 * 2**30  # FETCHML_MAX_DATASET_BYTES's default
TASK_ID = "0F8FAD5B-D9CB-469F-A165-70867728950E"  # upper case: the id converter takes either


@pytest.fixture(scope="module")
def server(django_db_setup, django_db_blocker) -> Iterator[LiveServer]:
    env = {"FETCHML_MAX_SNAPSHOT_BYTES": str(SNAPSHOT_LIMIT)}
    with django_db_blocker.unblock(), LiveServer(database_url=database_url_for(connection), env=env) as live:
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


def _head(
    method: str, path: str, *, key: str | None, content_type: str, length: int | None, expect: bool = False
) -> bytes:
    """A request's head; `length` None: the body is sent chunked."""
    lines = [
        f"{method} {path} HTTP/1.1",
        "Host: 127.0.0.1",
        f"Content-Type: {content_type}",
        f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked",
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


def _chunked_answer(server: LiveServer, head: bytes, pieces: list[bytes]) -> tuple[bytes, dict]:
    """Send `head` and `pieces` as a chunked body, then read the answer until the server closes:
    its head and its JSON body. The server reads a refused body to its end (discarding it)."""
    with socket.create_connection((server.host, server.port), timeout=15) as sock:
        sock.sendall(head)
        for piece in pieces:
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        sock.sendall(b"0\r\n\r\n")
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    answer, _, body = received.partition(b"\r\n\r\n")
    return answer, json.loads(body)


def _snapshot(size: int) -> bytes:
    """A .tar.gz of about `size` bytes (its one member does not compress)."""
    content = random.Random(size).randbytes(size)
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        member = tarfile.TarInfo("weights.bin")
        member.size = len(content)
        tar.addfile(member, io.BytesIO(content))
    return archive.getvalue()


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/tasks"),
        ("PUT", "/v1/tasks"),
        ("GET", "/v1/snapshots"),  # the upload route, by a method that uploads nothing
        ("POST", "/v1/snapshots/"),  # no route (a 404), however close to one
        ("POST", "/v1/datasets/mnist"),
        ("POST", f"/v1/tasks/{TASK_ID}/artifacts/out.bin"),  # artifacts are PUT
        ("PUT", "/v1/nowhere"),
    ],
)
def test_raw_bytes_declared_over_the_request_limit_off_the_upload_routes_are_answered_413_before_they_are_sent(
    server, method, path
):
    head = _head(method, path, key=BOGUS_KEY, content_type="application/octet-stream", length=10**9)

    status, _, body = raw_http_answer(server, head)

    assert status == "HTTP/1.1 413 Request Entity Too Large"
    assert (body["code"], body["error"]) == ("BAD_REQUEST", f"Request body too large (limit {REQUEST_LIMIT} bytes)")
    assert body["trace_id"]


@pytest.mark.parametrize(
    ("method", "path", "limit"),
    [
        ("POST", "/v1/snapshots", SNAPSHOT_LIMIT),
        ("PUT", f"/v1/tasks/{TASK_ID}/artifacts/out/model.bin", ARTIFACT_LIMIT),
        ("PUT", f"/v1/tasks/{TASK_ID.lower()}/artifacts/commit", ARTIFACT_LIMIT),  # a file named "commit"
        ("POST", "/v1/datasets?name=big", DATASET_LIMIT),
    ],
)
def test_an_upload_declared_over_its_own_route_limit_is_answered_413_before_it_is_sent(server, method, path, limit):
    head = _head(method, path, key=BOGUS_KEY, content_type="application/octet-stream", length=limit + 1)

    status, _, body = raw_http_answer(server, head)

    assert status == "HTTP/1.1 413 Request Entity Too Large"
    assert (body["code"], body["error"]) == ("BAD_REQUEST", f"Request body too large (limit {limit} bytes)")


@pytest.mark.parametrize(
    ("method", "path", "limit"),
    [
        ("POST", "/v1/snapshots", SNAPSHOT_LIMIT),
        ("PUT", f"/v1/tasks/{TASK_ID}/artifacts/out/model.bin", ARTIFACT_LIMIT),
        ("POST", "/v1/datasets?name=big", DATASET_LIMIT),
    ],
)
def test_an_upload_declared_at_its_own_route_limit_goes_on_to_the_key_check(server, method, path, limit):
    head = _head(method, path, key=BOGUS_KEY, content_type="application/octet-stream", length=limit)

    status, _, _ = raw_http_answer(server, head)

    assert status == "HTTP/1.1 401 Unauthorized"  # past the ceiling: its key, not its size, refused it


def test_raw_bytes_sent_chunked_off_the_upload_routes_are_cut_off_past_the_request_limit(server, user_client):
    head = _head("POST", "/v1/tasks", key=user_client.raw_key, content_type="application/octet-stream", length=None)

    answer, body = _chunked_answer(server, head, [b"x" * 65_536] * 24)  # 1.5 MiB

    assert answer.startswith(b"HTTP/1.1 413 Request Entity Too Large\r\n"), answer
    assert body["error"] == f"Request body too large (limit {REQUEST_LIMIT} bytes)"


def test_a_snapshot_sent_chunked_is_cut_off_past_its_own_limit(server, user_client):
    head = _head("POST", "/v1/snapshots", key=user_client.raw_key, content_type="application/octet-stream", length=None)

    answer, body = _chunked_answer(server, head, [b"x" * 65_536] * 48)  # 3 MiB

    assert answer.startswith(b"HTTP/1.1 413 Request Entity Too Large\r\n"), answer
    assert body["error"] == f"Request body too large (limit {SNAPSHOT_LIMIT} bytes)"
    assert not Snapshot.objects.exists()


def test_a_snapshot_over_the_request_limit_within_its_own_is_stored(server, user_client):
    data = _snapshot(1_500_000)
    assert REQUEST_LIMIT < len(data) < SNAPSHOT_LIMIT
    client = http.client.HTTPConnection(server.host, server.port, timeout=15)
    try:
        headers = {"X-API-Key": user_client.raw_key, "Content-Type": "application/octet-stream"}
        client.request("POST", "/v1/snapshots", body=data, headers=headers)
        response = client.getresponse()
        answer = json.loads(response.read())
    finally:
        client.close()

    assert response.status == 201, answer
    assert Snapshot.objects.get().size == len(data)
