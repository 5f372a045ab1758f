"""The logs SSE stream through a real ASGI server: Django's ASGI handler, and daphne over HTTP."""

import asyncio
import http.client
import json

import pytest
from asgiref.sync import sync_to_async
from django.db import connection

from fetchml import apikeys, events
from fetchml.asgi import application
from fetchml.models import ApiKey
from fetchml.testing import LiveServer, SSEEvent, SSEParser, database_url_for, http_scope, run_async
from fetchml.tests.factories import ApiKeyFactory
from tasks.logs import append_lines
from tasks.services import task_submit

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def task(user):
    task = task_submit(owner=user, job_name="train")
    append_lines(task_id=task.id, attempt=1, lines=[{"stream": "stdout", "line": f"stored {n}"} for n in (1, 2)])
    return task


@pytest.fixture
def key(user) -> str:
    return ApiKeyFactory.raw(user=user)


@sync_to_async
def _key_id(raw: str) -> str:
    return str(ApiKey.objects.get(prefix=apikeys.split(raw)[0]).id)


def _read_events(response: http.client.HTTPResponse, parser: SSEParser, count: int) -> list[SSEEvent]:
    """The next `count` events (comments skipped), reading line by line as they arrive."""
    found: list[SSEEvent] = []
    while len(found) < count:
        line = response.readline()
        assert line, f"stream ended early after {found}"
        found.extend(item for item in parser.feed(line) if item.comment is None)
    return found


def _read_to_end(response: http.client.HTTPResponse, parser: SSEParser) -> list[SSEEvent]:
    found: list[SSEEvent] = []
    while line := response.readline():
        found.extend(item for item in parser.feed(line) if item.comment is None)
    return found


def test_live_server_streams_stored_and_new_lines_and_ends_the_stream_when_the_task_is_cancelled(task, key):
    # A short heartbeat: without Redis the server cannot hear this process's
    # events, so the line appended below reaches it through the heartbeat re-check.
    env = {"FETCHML_SSE_HEARTBEAT_SECONDS": "0.2"}
    with LiveServer(database_url=database_url_for(connection), env=env) as server:
        stream = http.client.HTTPConnection(server.host, server.port, timeout=15)
        control = http.client.HTTPConnection(server.host, server.port, timeout=15)
        try:
            stream.request("GET", f"/v1/tasks/{task.id}/logs?follow=true", headers={"X-API-Key": key})
            response = stream.getresponse()
            assert response.status == 200
            assert response.getheader("Content-Type") == "text/event-stream"
            parser = SSEParser()
            first = _read_events(response, parser, 3)
            assert [(e.event, e.data.get("status") or e.data.get("line")) for e in first] == [
                ("status", "queued"),
                ("log", "stored 1"),
                ("log", "stored 2"),
            ]

            append_lines(task_id=task.id, attempt=1, lines=[{"stream": "stderr", "line": "live"}])
            assert [e.data["line"] for e in _read_events(response, parser, 1)] == ["live"]

            # The cancel happens inside the server, which publishes the final state there.
            control.request("DELETE", f"/v1/tasks/{task.id}", headers={"X-API-Key": key})
            cancelled = control.getresponse()
            assert cancelled.status == 204, cancelled.read()
            cancelled.read()

            rest = _read_to_end(response, parser)  # returns only because the server ends the stream
        finally:
            stream.close()
            control.close()

    assert [(e.event, e.data["status"]) for e in rest] == [("status", "cancelled"), ("end", "cancelled")]


def test_live_server_refuses_a_stream_without_a_key(task):
    with LiveServer(database_url=database_url_for(connection)) as server:
        client = http.client.HTTPConnection(server.host, server.port, timeout=15)
        try:
            client.request("GET", f"/v1/tasks/{task.id}/logs?follow=true")
            response = client.getresponse()
            body = json.loads(response.read())
        finally:
            client.close()
    assert response.status == 401
    assert body["code"] == "UNAUTHORIZED"


@run_async
async def test_client_disconnect_through_the_asgi_handler_leaves_the_task_and_owner_groups(task, key, group_moves):
    joined, left = group_moves.joined, group_moves.left

    first_body = asyncio.Event()
    gone = asyncio.Event()
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

    scope = http_scope("GET", f"/v1/tasks/{task.id}/logs", key=key, query_string=b"follow=true")
    served = asyncio.create_task(application(scope, receive, send))
    async with asyncio.timeout(10):
        await first_body.wait()
        gone.set()  # the client goes away while the stream waits for news
        await served

    # The task's log lines, its owner's task changes, and a revocation of the stream's key: joined on
    # the real layer for the stream (it was this process's only listener), and left again.
    groups = [events.task_group(task.id), events.user_group(task.owner_id), events.api_key_group(await _key_id(key))]
    assert [group for group, _ in joined] == groups
    assert sorted(left) == sorted(joined)
