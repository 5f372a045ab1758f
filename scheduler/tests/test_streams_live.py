"""The Scheduler's SSE streams over real HTTP against a live daphne, and their cleanup on disconnect."""

import asyncio
import http.client
import uuid

import pytest
from asgiref.sync import sync_to_async
from django.db import connection

from conftest import KeyClient
from fetchml import apikeys, events
from fetchml.asgi import application
from fetchml.models import ApiKey
from fetchml.testing import LiveServer, SSEEvent, SSEParser, database_url_for, http_scope, run_async
from fetchml.tests.factories import ApiKeyFactory
from scheduler.tests.factories import worker
from tasks.services import task_submit

pytestmark = pytest.mark.django_db(transaction=True)

# Short heartbeats: without Redis the server cannot hear this process, only its own publishes.
ENV = {"FETCHML_SSE_HEARTBEAT_SECONDS": "0.2"}


@pytest.fixture
def key(user) -> str:
    return ApiKeyFactory.raw(user=user)


@pytest.fixture
def admin_key(admin_user) -> str:
    return ApiKeyFactory.raw(user=admin_user, role="admin")


@sync_to_async
def _key_id(raw: str) -> str:
    return str(ApiKey.objects.get(prefix=apikeys.split(raw)[0]).id)


def _read(response: http.client.HTTPResponse, parser: SSEParser, count: int, *, comments: bool = False) -> list:
    found: list[SSEEvent] = []
    while len(found) < count:
        line = response.readline()
        assert line, f"stream ended early after {found}"
        found.extend(item for item in parser.feed(line) if comments or item.comment is None)
    return found


def _until(response: http.client.HTTPResponse, parser: SSEParser, predicate) -> SSEEvent:
    while line := response.readline():
        for item in parser.feed(line):
            if item.comment is None and predicate(item):
                return item
    raise AssertionError("stream ended before the expected event")


def _call(server: LiveServer, method: str, path: str, key: str, body: str | None = None) -> int:
    client = http.client.HTTPConnection(server.host, server.port, timeout=15)
    try:
        headers = {"X-API-Key": key, "Content-Type": "application/json"}
        client.request(method, path, body=body, headers=headers)
        response = client.getresponse()
        response.read()
        return response.status
    finally:
        client.close()


def test_job_stream_reports_a_priority_change_then_the_cancel_and_ends(user, key):
    task = task_submit(owner=user, job_name="train", priority=4)
    with LiveServer(database_url=database_url_for(connection), env=ENV) as server:
        stream = http.client.HTTPConnection(server.host, server.port, timeout=15)
        try:
            stream.request("GET", f"/v1/scheduler/jobs/{task.id}/stream", headers={"X-API-Key": key})
            response = stream.getresponse()
            assert response.status == 200
            assert response.getheader("Content-Type") == "text/event-stream"
            parser = SSEParser()
            [first] = _read(response, parser, 1)
            assert (first.event, first.data["status"], first.data["priority"]) == ("status", "queued", 4)

            assert _call(server, "PATCH", f"/v1/scheduler/jobs/{task.id}/priority", key, '{"priority": 9}') == 200
            [changed] = _read(response, parser, 1)
            assert (changed.event, changed.data["priority"], changed.data["priority_from"]) == ("priority", 9, 4)

            assert _call(server, "DELETE", f"/v1/tasks/{task.id}", key) == 204
            rest = []
            while line := response.readline():  # returns only because the server ends the stream
                rest.extend(item for item in parser.feed(line) if item.comment is None)
        finally:
            stream.close()
    assert [(e.event, e.data["status"]) for e in rest] == [("status", "cancelled"), ("end", "cancelled")]


def test_status_stream_reports_queue_depth_and_a_drain_and_sends_heartbeats(user, key, admin_key):
    box = worker(name="gpu-0", gpu_count=2)
    with LiveServer(database_url=database_url_for(connection), env=ENV) as server:
        stream = http.client.HTTPConnection(server.host, server.port, timeout=15)
        try:
            stream.request("GET", "/v1/scheduler/status/stream", headers={"X-API-Key": key})
            response = stream.getresponse()
            assert response.status == 200
            parser = SSEParser()
            [first] = _read(response, parser, 1)
            assert (first.event, first.data["event"], first.data["batch_queue_depth"]) == ("status", "connected", 0)
            assert any(item.comment == "heartbeat" for item in _read(response, parser, 1, comments=True))

            # More CPU than the worker has: the task stays queued, so the depth stays 1.
            body = '{"job_name": "train", "entrypoint": "python train.py", "cpu": 1000, "allow_unschedulable": true}'
            assert _call(server, "POST", "/v1/tasks", key, body) == 201
            # Pushed, not only found by a heartbeat's re-read (which may come first).
            queued = _until(response, parser, lambda e: e.data["event"] == "task_update")
            assert queued.data["batch_queue_depth"] == 1

            assert _call(server, "DELETE", f"/v1/scheduler/workers/{box.id}", admin_key) == 204
            drained = _until(response, parser, lambda e: e.data["event"] == "worker_draining")
            assert drained.data["workers_active"] == 0
        finally:
            stream.close()


def test_streams_refuse_missing_keys_and_other_users_jobs(user, other_client, anon_client):
    task = task_submit(owner=user, job_name="mine")

    assert anon_client.get("/v1/scheduler/status/stream").status_code == 401
    assert anon_client.get(f"/v1/scheduler/jobs/{task.id}/stream").status_code == 401
    assert other_client.get(f"/v1/scheduler/jobs/{task.id}/stream").status_code == 404
    assert other_client.get(f"/v1/scheduler/jobs/{uuid.uuid4()}/stream").status_code == 404


def test_streams_refuse_worker_keys(user, worker_key):
    task = task_submit(owner=user, job_name="mine")
    client = KeyClient(worker_key)
    assert client.get("/v1/scheduler/status/stream").status_code == 403
    assert client.get(f"/v1/scheduler/jobs/{task.id}/stream").status_code == 403


@run_async
async def test_client_leaving_the_status_stream_leaves_its_group(key, group_moves, thread_connections):
    joined, left = group_moves.joined, group_moves.left
    first_body, gone = asyncio.Event(), asyncio.Event()
    requested = False

    async def receive() -> dict:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            first_body.set()

    path = "/v1/scheduler/status/stream"
    scope = http_scope("GET", path, key=key)
    tasks_before = len(asyncio.all_tasks())
    served = asyncio.create_task(application(scope, receive, send))
    async with asyncio.timeout(10):
        await first_body.wait()
        gone.set()
        await served

    # The fleet's changes, and a revocation of the stream's key: joined on the real layer for the stream
    # (it was this process's only listener), and left again.
    assert [group for group, _ in joined] == [events.STATUS_GROUP, events.api_key_group(await _key_id(key))]
    assert sorted(left) == sorted(joined)
    assert len(asyncio.all_tasks()) <= tasks_before
