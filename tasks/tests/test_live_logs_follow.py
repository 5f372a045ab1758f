"""GET /v1/tasks/{taskId}/logs?follow=true: the SSE stream, read through Django's AsyncClient.

Events are published after commit, hence `transactional_db` throughout.
"""

import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.test import AsyncClient, override_settings

from fetchml import events
from fetchml.testing import KeyAsyncClient, SSEStream, run_async
from fetchml.tests.factories import ApiKeyFactory
from tasks.logs import append_lines
from tasks.models import TaskLogLine
from tasks.services import task_submit, task_transition
from tasks.states import TaskStatus

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def task(user):
    return task_submit(owner=user, job_name="train")


@pytest.fixture
def client(user) -> KeyAsyncClient:
    return KeyAsyncClient(ApiKeyFactory.raw(user=user))


def _lines(*texts: str) -> list[dict]:
    return [{"stream": "stdout", "line": text} for text in texts]


async def _append(task, *texts: str, attempt: int = 1) -> None:
    await sync_to_async(append_lines)(task_id=task.id, attempt=attempt, lines=_lines(*texts))


async def _move(task, *states: str) -> None:
    for state in states:
        assert await sync_to_async(task_transition)(task_id=task.id, to=state) is not None


async def _follow(client: AsyncClient, task, **params) -> SSEStream:
    response = await client.get(f"/v1/tasks/{task.id}/logs", {"follow": "true", **params})
    assert response.status_code == 200
    assert response["Content-Type"] == "text/event-stream"
    assert response["Cache-Control"] == "no-cache"
    return SSEStream(response.streaming_content)


def _texts(items) -> list[str]:
    return [item.data["line"] for item in items if item.event == "log"]


@run_async
async def test_follow_sends_stored_lines_then_new_ones_and_ends_when_the_task_completes(client, task):
    await _append(task, "stored 1", "stored 2")
    stream = await _follow(client, task)
    try:
        status, *stored = await stream.events(3)
        assert (status.event, status.data["status"]) == ("status", "queued")
        assert _texts(stored) == ["stored 1", "stored 2"]

        await _append(task, "live 1", "live 2")
        assert _texts(await stream.events(2)) == ["live 1", "live 2"]

        await _move(task, TaskStatus.PREPARING, TaskStatus.RUNNING)
        assert [e.data["status"] for e in await stream.events(2)] == ["preparing", "running"]

        await _append(task, "last words")
        await _move(task, TaskStatus.COMPLETED)
        rest = await stream.until_end()
    finally:
        await stream.close()

    assert _texts(rest) == ["last words"]
    assert [(e.event, e.data["status"]) for e in rest if e.event != "log"] == [
        ("status", "completed"),
        ("end", "completed"),
    ]
    assert stream.ended


@run_async
async def test_log_events_carry_the_line_id_as_event_id(client, task):
    await _append(task, "one")
    stream = await _follow(client, task)
    try:
        _status, line = await stream.events(2)
    finally:
        await stream.close()
    stored = await TaskLogLine.objects.aget(task=task)
    assert line.id == str(stored.id)
    assert line.data == {
        "id": stored.id,
        "stream": "stdout",
        "line": "one",
        "attempt": 1,
        "node": 0,
        "seq": None,
        "created_at": stored.created_at.isoformat().replace("+00:00", "Z"),
    }


@run_async
async def test_follow_with_tail_sends_only_the_last_stored_lines(client, task):
    await _append(task, "a", "b", "c", "d")
    stream = await _follow(client, task, tail=2)
    try:
        _status, *stored = await stream.events(3)
        await _append(task, "e")
        new = await stream.events(1)
    finally:
        await stream.close()
    assert _texts(stored) == ["c", "d"]
    assert _texts(new) == ["e"]


@run_async
async def test_following_a_finished_task_sends_its_lines_and_ends_at_once(client, task):
    await _append(task, "x", "y")
    await _move(task, TaskStatus.CANCELLED)
    stream = await _follow(client, task)
    try:
        items = await stream.until_end()
    finally:
        await stream.close()
    assert [item.event for item in items] == ["status", "log", "log", "end"]
    assert items[-1].data == {"task_id": str(task.id), "status": "cancelled"}


@run_async
async def test_reconnect_with_last_event_id_resumes_after_that_line(client, task):
    await _append(task, "seen", "unseen")
    seen = await TaskLogLine.objects.filter(task=task).order_by("id").afirst()
    response = await client.get(
        f"/v1/tasks/{task.id}/logs", {"follow": "true"}, headers={"Last-Event-ID": str(seen.id)}
    )
    stream = SSEStream(response.streaming_content)
    try:
        _status, line = await stream.events(2)
    finally:
        await stream.close()
    assert _texts([line]) == ["unseen"]


@run_async
async def test_a_line_announced_twice_is_sent_once(client, task):
    await _append(task, "only once")
    stream = await _follow(client, task)
    try:
        await stream.events(2)
        ids = [line.id async for line in TaskLogLine.objects.filter(task=task)]
        # As if the event of a line already read from the database arrived late.
        await get_channel_layer().group_send(
            events.task_group(task.id), {"type": "task.log", "task_id": str(task.id), "ids": ids}
        )
        await _append(task, "next")
        assert _texts(await stream.events(1)) == ["next"]
    finally:
        await stream.close()


@override_settings(FETCHML_SSE_HEARTBEAT_SECONDS=0.1)
@run_async
async def test_lines_and_the_end_whose_events_were_lost_arrive_at_a_heartbeat(client, task):
    stream = await _follow(client, task)
    try:
        await stream.events(1)
        # Written without publishing, as when the channel layer dropped the events.
        await TaskLogLine.objects.acreate(task=task, attempt=1, stream="stderr", line="unannounced")
        await task.__class__.objects.filter(id=task.id).aupdate(status=TaskStatus.FAILED)
        items = await stream.until_end()
    finally:
        await stream.close()
    assert [(item.event, item.data.get("status") or item.data.get("line")) for item in items] == [
        ("log", "unannounced"),
        ("status", "failed"),
        ("end", "failed"),
    ]


@override_settings(FETCHML_SSE_HEARTBEAT_SECONDS=0.1)
@run_async
async def test_idle_stream_sends_heartbeat_comments(client, task):
    stream = await _follow(client, task)
    try:
        await stream.events(1)
        beat = await stream.next()
    finally:
        await stream.close()
    assert beat.comment == "heartbeat"


@run_async
async def test_another_user_cannot_follow(other_user, task):
    other = KeyAsyncClient(await sync_to_async(ApiKeyFactory.raw)(user=other_user))
    response = await other.get(f"/v1/tasks/{task.id}/logs", {"follow": "true"})
    assert response.status_code == 404
    assert response.json()["code"] == "NOT_FOUND"


@run_async
async def test_follow_without_a_key_is_unauthorized(task):
    response = await AsyncClient().get(f"/v1/tasks/{task.id}/logs", {"follow": "true"})
    assert response.status_code == 401
    assert response.json()["code"] == "UNAUTHORIZED"
