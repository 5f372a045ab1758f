"""`batch` frames on `/ws/worker`: several messages in one frame, both ways (docs/worker-protocol.md)."""

import json

import pytest
from channels.db import database_sync_to_async

from scheduler.dispatch import dispatch_round
from scheduler.protocol import MAX_BATCH
from scheduler.tests.factories import UserFactory, queued_task
from scheduler.tests.ws import close_code, connect, receive, refused_then_still_answering, run, send_batch, start_worker
from tasks.models import Task

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("channel_layer", "thread_connections")]

db = database_sync_to_async


@db
def _dispatch(tasks: int) -> int:
    owner = UserFactory(username="alice")
    for _ in range(tasks):
        queued_task(owner=owner)
    return dispatch_round()


def _completed(assign: dict) -> list[dict]:
    run_ref = {"task_id": assign["task_id"], "token": assign["token"]}
    return [{"type": "ack", **run_ref}, {"type": "status", **run_ref, "status": "completed", "exit_code": 0}]


def test_welcome_lists_the_features_the_server_accepts(worker_key):
    async def scenario():
        communicator, welcome = await start_worker(worker_key)
        await communicator.disconnect()
        return welcome

    assert run(scenario())["features"] == ["batch", "log_ack"]


def test_a_rounds_assigns_reach_an_agent_that_accepts_batches_in_one_frame(worker_key):
    async def scenario():
        communicator, _ = await start_worker(worker_key, features=["batch"], batch_slots=3)
        assert await _dispatch(3) == 3
        frame = await receive(communicator)
        await communicator.disconnect()
        return frame

    frame = run(scenario())

    assert (frame["type"], frame["version"]) == ("batch", 1)
    assert [message["type"] for message in frame["messages"]] == ["assign"] * 3
    assert {message["task_id"] for message in frame["messages"]} == {
        str(i) for i in Task.objects.values_list("id", flat=True)
    }


def test_an_agent_that_did_not_list_batch_gets_one_message_per_frame(worker_key):
    async def scenario():
        communicator, _ = await start_worker(worker_key, batch_slots=3)
        assert await _dispatch(3) == 3
        frames = [await receive(communicator) for _ in range(3)]
        await communicator.disconnect()
        return frames

    assert [frame["type"] for frame in run(scenario())] == ["assign"] * 3


def test_reports_in_one_batch_frame_are_applied_and_answered_in_one_batch_frame(worker_key):
    async def scenario():
        communicator, _ = await start_worker(worker_key, features=["batch"], batch_slots=3)
        assert await _dispatch(3) == 3
        assigns = (await receive(communicator))["messages"]
        await send_batch(communicator, [report for assign in assigns for report in _completed(assign)])
        answer = await receive(communicator)
        await communicator.disconnect()
        return assigns, answer

    assigns, answer = run(scenario())

    assert answer["type"] == "batch"
    assert [(m["type"], m["task_id"], m["accepted"]) for m in answer["messages"]] == [
        ("status_ack", assign["task_id"], True) for assign in assigns
    ]
    assert set(Task.objects.values_list("status", flat=True)) == {"completed"}


def test_a_bad_message_in_a_batch_gets_its_error_and_the_others_are_applied(worker_key):
    async def scenario():
        communicator, _ = await start_worker(worker_key, features=["batch"])
        assert await _dispatch(1) == 1
        assign = await receive(communicator)  # one assign: a frame of its own
        await send_batch(communicator, [{"type": "ack", "task_id": "x"}, *_completed(assign)])
        error, answer = await receive(communicator), await receive(communicator)
        await communicator.disconnect()
        return error, answer

    error, answer = run(scenario())

    assert (error["type"], error["code"], error["ref_type"]) == ("error", "BAD_MESSAGE", "ack")
    assert answer["type"] == "status_ack" and answer["accepted"]
    assert Task.objects.get().status == "completed"


@pytest.mark.parametrize(
    ("messages", "ref_type"),
    [
        ([{"type": "batch", "messages": [{"type": "heartbeat", "running": []}]}], "batch"),
        ([{"type": "hello", "name": "box-2", "capabilities": {}}], "hello"),
        (["not an object"], "batch"),
    ],
    ids=["batch-in-a-batch", "hello-in-a-batch", "not-an-object"],
)
def test_a_message_that_cannot_travel_in_a_batch_is_refused(worker_key, messages, ref_type):
    async def scenario():
        communicator, _ = await start_worker(worker_key)
        inner = [m if isinstance(m, str) else {"version": 1, **m} for m in messages]
        frame = json.dumps({"type": "batch", "version": 1, "messages": inner})
        error, after = await refused_then_still_answering(communicator, frame)
        await communicator.disconnect()
        return error, after

    error, after = run(scenario())

    assert (error["type"], error["code"], error["ref_type"]) == ("error", "BAD_MESSAGE", ref_type)
    assert after["type"] == "stop"


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ({"type": "batch", "version": 1, "messages": []}, "BAD_MESSAGE"),
        (
            {"type": "batch", "version": 1, "messages": [{"type": "heartbeat", "version": 1}] * (MAX_BATCH + 1)},
            "BAD_MESSAGE",
        ),
        ({"type": "batch", "version": 1, "messages": {"type": "heartbeat"}}, "BAD_MESSAGE"),
        ({"type": "batch", "version": 2, "messages": [{"type": "heartbeat", "version": 1}]}, "BAD_VERSION"),
    ],
    ids=["empty", "too-many", "not-a-list", "wrong-version"],
)
def test_a_malformed_batch_frame_gets_one_error_and_nothing_in_it_is_applied(worker_key, frame, code):
    async def scenario():
        communicator, _ = await start_worker(worker_key)
        await communicator.send_to(text_data=json.dumps(frame))
        error = await receive(communicator)
        assert await communicator.receive_nothing(timeout=0.2)
        await communicator.disconnect()
        return error

    error = run(scenario())

    assert (error["type"], error["code"], error["ref_type"]) == ("error", code, "batch")


def test_a_batch_before_hello_closes_with_4400(worker_key):
    async def scenario():
        communicator = await connect(worker_key)
        await send_batch(communicator, [{"type": "heartbeat", "running": []}])
        error = await receive(communicator)
        return error, await close_code(communicator)

    error, code = run(scenario())

    assert (error["type"], code) == ("error", 4400)
