"""The worker WebSocket `/ws/worker`: auth, hello/welcome, validation, assign/ack/status, fencing, cancel, logs."""

import asyncio
import json
import logging
import threading
import uuid

import channels.consumer
import django.db
import pytest
from channels.db import database_sync_to_async
from django.test import override_settings

from fetchml.auth import Actor
from fetchml.tests.factories import ApiKeyFactory
from scheduler import consumers, services
from scheduler.assigns import master_port_for
from scheduler.dispatch import dispatch_round
from scheduler.models import NodeAssignment, Worker
from scheduler.services import worker_drain
from scheduler.tests.agent_peer import until
from scheduler.tests.factories import UserFactory, queued_task
from scheduler.tests.ws import (
    close_code,
    closed_with,
    connect,
    expect_nothing,
    receive,
    refused_then_still_answering,
    run,
    send,
    start_worker,
)
from tasks.models import Task, TaskLogLine
from tasks.services import task_cancel

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("channel_layer", "thread_connections")]

db = database_sync_to_async


@db
def _submit(**fields) -> Task:
    return queued_task(owner=UserFactory(username="alice"), **fields)


@db
def _reload(model, pk):
    return model.objects.get(pk=pk)


async def _assigned(communicator, **fields) -> tuple[Task, dict]:
    """Submit a task, dispatch it, return it with the `assign` the worker received."""
    task = await _submit(**fields)
    assert await db(dispatch_round)() == 1
    message = await receive(communicator)
    assert message["type"] == "assign", message
    return task, message


@pytest.mark.parametrize(
    ("role", "expected"),
    [
        (None, (4401, "invalid or missing API key")),
        ("user", (4403, "the API key does not have the worker role")),
    ],
    ids=["no-key", "user-key"],
)
def test_a_refused_connection_is_told_why_in_the_close_reason(user, role, expected):
    raw = ApiKeyFactory.raw(user=user, role=role) if role else None

    async def scenario():
        return await closed_with(await connect(raw))

    assert run(scenario()) == expected


def test_connection_without_an_api_key_is_closed_with_4401():
    async def scenario():
        communicator = await connect(None)
        assert await close_code(communicator) == 4401

    run(scenario())


def test_api_key_in_the_query_string_is_refused(worker_key):
    async def scenario():
        communicator = await connect(None, query=f"api_key={worker_key}")
        assert await close_code(communicator) == 4401

    run(scenario())


def test_key_without_the_worker_role_is_closed_with_4403(user):
    raw = ApiKeyFactory.raw(user=user, role="user")

    async def scenario():
        communicator = await connect(raw)
        assert await close_code(communicator) == 4403

    run(scenario())


def test_hello_is_answered_with_welcome_and_registers_the_worker(worker_key):
    async def scenario():
        communicator, welcome = await start_worker(worker_key, name="gpu-box-1", cpu_cores=32)
        await communicator.disconnect()
        return welcome

    welcome = run(scenario())

    box = Worker.objects.get(name="gpu-box-1")
    assert welcome["worker_id"] == str(box.id)
    assert welcome["reconcile"] == {"keep": [], "kill": []}
    assert welcome["heartbeat_seconds"] > 0 and welcome["lease_seconds"] > welcome["heartbeat_seconds"]
    assert (box.status, box.cpu_cores, box.gpu_type, box.hostname) == ("active", 32, "A100", "10.0.0.7")


def test_frames_are_handled_without_a_hop_to_the_shared_sync_thread(worker_key, monkeypatch):
    hops = []

    async def counted() -> None:
        hops.append(1)

    monkeypatch.setattr(channels.consumer, "aclose_old_connections", counted)

    async def scenario():
        communicator, _ = await start_worker(worker_key, name="gpu-box-1")
        task, assign = await _assigned(communicator)
        await send(communicator, {"type": "ack", "task_id": assign["task_id"], "token": assign["token"]})
        final = {"type": "status", "task_id": assign["task_id"], "token": assign["token"], "status": "completed"}
        await send(communicator, final | {"exit_code": 0})
        answer = await receive(communicator)
        await communicator.disconnect()
        return task, answer

    task, answer = run(scenario())

    assert answer["type"] == "status_ack" and answer["accepted"]
    assert Task.objects.get(id=task.id).status == "completed"
    assert hops == []


def test_reconnect_with_the_same_name_is_the_same_worker(worker_key):
    async def scenario():
        first, welcome1 = await start_worker(worker_key, name="box-7")
        await first.disconnect()
        second, welcome2 = await start_worker(worker_key, name="box-7")
        await second.disconnect()
        return welcome1["worker_id"], welcome2["worker_id"]

    first_id, second_id = run(scenario())

    assert first_id == second_id
    assert Worker.objects.filter(name="box-7").count() == 1


@pytest.mark.parametrize(
    ("first", "second"),
    [(None, None), ("agent-a", "agent-b"), (None, "agent-a")],
    ids=["no-instances", "other-agent", "unrecorded-instance"],
)
def test_a_second_live_connection_with_the_same_name_from_another_agent_is_closed_with_4409(worker_key, first, second):
    async def scenario():
        live, _ = await start_worker(worker_key, name="twin", instance=first)
        twin = await connect(worker_key)
        hello = {"type": "hello", "name": "twin", "capabilities": {}}
        await send(twin, hello | ({"instance": second} if second else {}))
        code = await close_code(twin)
        await live.disconnect()
        return code

    assert run(scenario()) == 4409


def test_a_name_in_use_is_told_in_the_close_reason(worker_key):
    async def scenario():
        live, _ = await start_worker(worker_key, name="twin", instance="agent-a")
        twin = await connect(worker_key)
        await send(twin, {"type": "hello", "name": "twin", "capabilities": {}, "instance": "agent-b"})
        closed = await closed_with(twin)
        await live.disconnect()
        return closed

    assert run(scenario()) == (4409, "another live connection uses this worker name")


def test_the_same_agent_on_a_new_connection_replaces_its_old_one(worker_key):
    async def scenario():
        # The old connection's consumer still lives (as on a server the agent lost touch with).
        old, _ = await start_worker(worker_key, name="box-1", instance="agent-a")
        new, welcome = await start_worker(worker_key, name="box-1", instance="agent-a")
        old_closed_with = await close_code(old)
        task, assign = await _assigned(new)
        await new.disconnect()
        return welcome, old_closed_with, task, assign

    welcome, old_closed_with, task, assign = run(scenario())

    assert welcome["type"] == "welcome"
    assert old_closed_with == 4012
    assert assign["task_id"] == str(task.id)
    assert Worker.objects.get(name="box-1").agent_instance == "agent-a"


def test_first_message_that_is_not_hello_closes_with_4400(worker_key):
    async def scenario():
        communicator = await connect(worker_key)
        await send(communicator, {"type": "heartbeat", "running": []})
        error = await receive(communicator)
        return error, await close_code(communicator)

    error, code = run(scenario())

    assert (error["type"], code) == ("error", 4400)


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("not json", "BAD_MESSAGE"),
        ('["a", "list"]', "BAD_MESSAGE"),
        ('{"type": "teleport", "version": 1}', "UNKNOWN_TYPE"),
        ('{"type": "heartbeat", "version": 2, "running": []}', "BAD_VERSION"),
        ('{"type": "heartbeat", "version": true, "running": []}', "BAD_VERSION"),
        ('{"type": "heartbeat", "version": 1.0, "running": []}', "BAD_VERSION"),
        ('{"type": "ack", "version": 1, "task_id": "x"}', "BAD_MESSAGE"),
        (
            json.dumps(
                {
                    "type": "status",
                    "version": 1,
                    "task_id": str(uuid.uuid4()),
                    "token": str(uuid.uuid4()),
                    "status": "won",
                }
            ),
            "BAD_MESSAGE",
        ),
        ("[" * 200_000 + "]" * 200_000, "BAD_MESSAGE"),
        ('{"type": "heartbeat", "version": 1, "running": ' + "[" * 5_000 + "]" * 5_000 + "}", "BAD_MESSAGE"),
        ('{"type": "heartbeat", "version": 1, "running": [], "x": ' + "[" * 64 + "]" * 64 + "}", "BAD_MESSAGE"),
    ],
    ids=[
        "not-json",
        "not-object",
        "unknown-type",
        "wrong-version",
        "version-true",
        "version-float",
        "bad-field",
        "bad-status",
        "past-the-recursion-limit",
        "deep-field",
        "past-the-depth-bound",
    ],
)
def test_bad_message_gets_an_error_and_the_connection_keeps_working(worker_key, frame, code):
    async def scenario():
        communicator, _ = await start_worker(worker_key)
        error, after = await refused_then_still_answering(communicator, frame)
        await communicator.disconnect()
        return error, after

    error, after = run(scenario())

    assert (error["type"], error["code"], error["version"]) == ("error", code, 1)
    assert after["type"] == "stop"


def test_an_unknown_type_is_said_back_cut_short(worker_key):
    async def scenario():
        communicator, _ = await start_worker(worker_key)
        await send(communicator, {"type": "x" * 100_000})
        error = await receive(communicator)
        await communicator.disconnect()
        return error

    error = run(scenario())

    assert (error["code"], error["ref_type"]) == ("UNKNOWN_TYPE", "x" * 32)
    assert len(error["message"]) < 100


def test_a_frame_the_validation_fails_on_gets_a_server_error_and_the_connection_keeps_working(worker_key, monkeypatch):
    real_parse = consumers.parse_frame

    def parse(text):
        if '"poison"' in text:
            raise TypeError("a hole in the validation")
        return real_parse(text)

    monkeypatch.setattr(consumers, "parse_frame", parse)

    async def scenario():
        communicator, _ = await start_worker(worker_key)
        error, after = await refused_then_still_answering(communicator, json.dumps({"type": "poison"}))
        await communicator.disconnect()
        return error, after

    error, after = run(scenario())

    assert (error["type"], error["code"], error["ref_type"]) == ("error", "SERVER_ERROR", "frame")
    assert after["type"] == "stop"


def test_assign_is_delivered_to_the_worker_after_dispatch(worker_key):
    async def scenario():
        communicator, _ = await start_worker(worker_key)
        task, message = await _assigned(communicator, gpu=2, gpu_type="A100", cpu=4, env={"A": "1"}, timeout_seconds=60)
        await communicator.disconnect()
        return task, message

    task, message = run(scenario())

    assignment = NodeAssignment.objects.get(task=task)
    assert message["task_id"] == str(task.id) and message["token"] == str(assignment.token)
    assert message["attempt"] == 1 and message["entrypoint"] == task.entrypoint and message["env"] == {"A": "1"}
    assert message["resources"] == {"cpu": 4, "memory_gb": 0, "gpus": 2, "gpu_indices": [0, 1]}
    assert message["node"] == {
        "rank": 0,
        "count": 1,
        "master_addr": "10.0.0.7",
        "master_port": master_port_for(task.id),
    }
    assert message["timeout_seconds"] == 60


def test_a_worker_whose_connection_closed_is_given_no_work_until_it_is_back(worker_key):
    async def scenario():
        communicator, _ = await start_worker(worker_key)
        await communicator.disconnect()
        task = await _submit()
        placed_while_away = await db(dispatch_round)()
        communicator, _ = await start_worker(worker_key)
        placed_when_back = await db(dispatch_round)()
        message = await receive(communicator)
        await communicator.disconnect()
        return task, placed_while_away, placed_when_back, message

    task, placed_while_away, placed_when_back, message = run(scenario())

    assert (placed_while_away, placed_when_back) == (0, 1)
    assert message["task_id"] == str(task.id) and message["attempt"] == 1


def test_unacknowledged_assignment_is_sent_again_on_reconnect(worker_key):
    async def scenario():
        communicator, _ = await start_worker(worker_key)
        _, first = await _assigned(communicator)
        await communicator.disconnect()
        again, _ = await start_worker(worker_key)
        resent = await receive(again)
        await again.disconnect()
        return first, resent

    first, resent = run(scenario())

    assert resent == first


def test_ack_marks_the_assignment_acknowledged(worker_key):
    async def scenario():
        communicator, _ = await start_worker(worker_key)
        task, assign = await _assigned(communicator)
        await send(communicator, {"type": "ack", "task_id": assign["task_id"], "token": assign["token"]})
        await expect_nothing(communicator)
        await communicator.disconnect()
        return task

    task = run(scenario())

    assignment = NodeAssignment.objects.get(task=task)
    assert assignment.status == "acked" and assignment.acked_at is not None


def test_status_reports_move_the_task_to_completed_and_free_the_capacity(worker_key):
    async def scenario():
        communicator, _ = await start_worker(worker_key)
        task, assign = await _assigned(communicator, cpu=4)
        run_ref = {"task_id": assign["task_id"], "token": assign["token"]}
        await send(communicator, {"type": "ack", **run_ref})
        await send(communicator, {"type": "status", **run_ref, "status": "running"})
        await send(communicator, {"type": "status", **run_ref, "status": "collecting"})
        await send(communicator, {"type": "status", **run_ref, "status": "completed", "exit_code": 0, "output": "ok"})
        ack = await receive(communicator)
        await communicator.disconnect()
        return task, ack

    task, ack = run(scenario())

    task.refresh_from_db()
    assert ack == {"type": "status_ack", "version": 1, "task_id": str(task.id), "token": ack["token"], "accepted": True}
    assert (task.status, task.exit_code, task.output) == ("completed", 0, "ok")
    assert task.started_at is not None and task.ended_at is not None
    box = Worker.objects.get()
    assert (box.used_cpu, box.used_batch_slots) == (0, 0)
    assert NodeAssignment.objects.get(task=task).status == "finished"


def test_failed_report_records_exit_code_and_error(worker_key):
    async def scenario():
        communicator, _ = await start_worker(worker_key)
        task, assign = await _assigned(communicator)
        run_ref = {"task_id": assign["task_id"], "token": assign["token"]}
        await send(communicator, {"type": "status", **run_ref, "status": "running"})
        await send(
            communicator,
            {
                "type": "status",
                **run_ref,
                "status": "failed",
                "exit_code": 2,
                "failure_reason": "exit_code",
                "error": "boom",
            },
        )
        ack = await receive(communicator)
        await communicator.disconnect()
        return task, ack

    task, ack = run(scenario())

    task.refresh_from_db()
    assert ack["type"] == "status_ack" and ack["accepted"] is True
    assert (task.status, task.exit_code, task.failure_reason, task.error) == ("failed", 2, "exit_code", "boom")


def test_message_with_a_stale_token_gets_stop_and_changes_nothing(worker_key):
    async def scenario():
        communicator, _ = await start_worker(worker_key)
        task, assign = await _assigned(communicator)
        stale = {"task_id": assign["task_id"], "token": str(uuid.uuid4())}
        await send(communicator, {"type": "status", **stale, "status": "completed", "exit_code": 0})
        stop = await receive(communicator)
        await communicator.disconnect()
        return task, stop, stale

    task, stop, stale = run(scenario())

    task.refresh_from_db()
    assert (stop["type"], stop["task_id"], stop["token"]) == ("stop", stale["task_id"], stale["token"])
    assert task.status == "preparing"
    assert NodeAssignment.objects.get(task=task).holds_capacity


def test_final_report_sent_again_is_acknowledged_again(worker_key):
    async def scenario():
        communicator, _ = await start_worker(worker_key)
        _, assign = await _assigned(communicator)
        final = {"type": "status", "task_id": assign["task_id"], "token": assign["token"], "status": "completed"}
        await send(communicator, {**final, "status": "running"})
        await send(communicator, final)
        first = await receive(communicator)
        await send(communicator, final)
        second = await receive(communicator)
        await communicator.disconnect()
        return first, second

    first, second = run(scenario())

    assert first == second and second["type"] == "status_ack"


def test_reconnect_keeps_runs_still_assigned_and_kills_the_others(worker_key):
    unknown = {"task_id": str(uuid.uuid4()), "token": str(uuid.uuid4())}

    async def scenario():
        communicator, _ = await start_worker(worker_key)
        task, assign = await _assigned(communicator)
        run_ref = {"task_id": assign["task_id"], "token": assign["token"]}
        await send(communicator, {"type": "ack", **run_ref})
        await send(communicator, {"type": "status", **run_ref, "status": "running"})
        await expect_nothing(communicator)
        await communicator.disconnect()
        again, welcome = await start_worker(worker_key, running=[run_ref, unknown])
        await again.disconnect()
        return task, assign, welcome

    task, assign, welcome = run(scenario())

    assert welcome["reconcile"] == {"keep": [assign["token"]], "kill": [unknown["token"]]}
    task.refresh_from_db()
    assert task.status == "running"


def _task_after_a_heartbeat(worker_key: str, *, first: dict, reported: str) -> Task:
    """A task assigned to a worker that sent `first` about the run (an ack, a status), then a
    heartbeat saying the run is `reported`."""

    async def scenario():
        communicator, _ = await start_worker(worker_key)
        task, assign = await _assigned(communicator)
        run_ref = {"task_id": assign["task_id"], "token": assign["token"]}
        await send(communicator, {**first, **run_ref})
        await send(communicator, {"type": "heartbeat", "running": [{**run_ref, "status": reported}]})
        await expect_nothing(communicator)
        await communicator.disconnect()
        return task

    task = run(scenario())
    task.refresh_from_db()
    return task


def test_a_heartbeat_reporting_a_run_further_along_than_recorded_moves_its_task(worker_key):
    # The `running` status never arrived; the heartbeat says where the run is.
    task = _task_after_a_heartbeat(worker_key, first={"type": "ack"}, reported="running")

    assert task.status == "running"
    assert task.started_at is not None
    assert NodeAssignment.objects.get(task=task).status == "running"


def test_a_heartbeat_repeating_recorded_progress_changes_nothing(worker_key):
    task = _task_after_a_heartbeat(worker_key, first={"type": "status", "status": "collecting"}, reported="running")

    assert task.status == "collecting"


def test_a_reconnecting_agent_reporting_a_run_further_along_moves_its_task(worker_key):
    async def scenario():
        communicator, _ = await start_worker(worker_key)
        task, assign = await _assigned(communicator)
        run_ref = {"task_id": assign["task_id"], "token": assign["token"]}
        await send(communicator, {"type": "ack", **run_ref})
        await expect_nothing(communicator)
        await communicator.disconnect()
        again, welcome = await start_worker(worker_key, running=[{**run_ref, "status": "collecting"}])
        await again.disconnect()
        return task, assign, welcome

    task, assign, welcome = run(scenario())

    task.refresh_from_db()
    assert welcome["reconcile"]["keep"] == [assign["token"]]
    assert task.status == "collecting"


def test_a_run_listed_in_hello_is_acknowledged_so_a_drain_announced_next_does_not_hand_it_back(worker_key):
    # The agent ran the task to its end while the server that assigned it was down: the
    # acknowledgement never arrived, but the hello says the agent has the run.
    async def scenario():
        communicator, _ = await start_worker(worker_key)
        task, assign = await _assigned(communicator)
        run_ref = {"task_id": assign["task_id"], "token": assign["token"]}
        await communicator.disconnect()
        again, welcome = await start_worker(worker_key, running=[{**run_ref, "status": "completed"}])
        await send(again, {"type": "draining"})
        await send(again, {"type": "status", **run_ref, "status": "completed", "exit_code": 0})
        answer = await receive(again)
        await again.disconnect()
        return task, welcome, answer

    task, welcome, answer = run(scenario())

    task.refresh_from_db()
    assert welcome["reconcile"]["keep"] == [answer["token"]]
    assert (answer["type"], answer["accepted"]) == ("status_ack", True)
    assert (task.status, task.attempt, task.retry_count) == ("completed", 1, 0)


def test_a_heartbeat_with_a_bad_run_status_is_refused(worker_key):
    async def scenario():
        communicator, _ = await start_worker(worker_key)
        run_ref = {"task_id": str(uuid.uuid4()), "token": str(uuid.uuid4()), "status": "sleeping"}
        await send(communicator, {"type": "heartbeat", "running": [run_ref]})
        answer = await receive(communicator)
        await communicator.disconnect()
        return answer

    answer = run(scenario())

    assert (answer["type"], answer["code"], answer["ref_type"]) == ("error", "BAD_MESSAGE", "heartbeat")


def test_acknowledged_run_missing_after_reconnect_is_lost_and_requeued(worker_key):
    async def scenario():
        communicator, _ = await start_worker(worker_key)
        task, assign = await _assigned(communicator)
        await send(communicator, {"type": "ack", "task_id": assign["task_id"], "token": assign["token"]})
        await expect_nothing(communicator)
        await communicator.disconnect()
        again, _ = await start_worker(worker_key, running=[])
        await again.disconnect()
        return task

    task = run(scenario())

    task.refresh_from_db()
    assert (task.status, task.retry_count, task.failure_reason) == ("queued", 1, "worker_lost")
    assert NodeAssignment.objects.get(task=task).status == "lost"


def test_heartbeat_extends_the_lease(worker_key):
    async def scenario():
        communicator, welcome = await start_worker(worker_key)
        await db(Worker.objects.filter(id=welcome["worker_id"]).update)(last_heartbeat=None)
        await send(communicator, {"type": "heartbeat", "running": []})
        await expect_nothing(communicator)
        await communicator.disconnect()
        return welcome["worker_id"]

    worker_id = run(scenario())

    assert Worker.objects.get(id=worker_id).last_heartbeat is not None


def _heartbeats_held_back(monkeypatch) -> tuple[threading.Event, list[int]]:
    """The connection's first heartbeat held in the database call until the event is set (what a
    busy database does), so that what the worker sends after it waits in the connection's queue;
    returns the event and the list of heartbeats applied."""
    release, applied = threading.Event(), []
    real = services.worker_heartbeat

    def held(**fields):
        if not applied:
            release.wait(10)
        applied.append(1)
        return real(**fields)

    monkeypatch.setattr(services, "worker_heartbeat", held)
    return release, applied


def test_heartbeats_still_queued_when_the_worker_goes_are_not_applied(worker_key, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="fetchml.scheduler.ws")
    release, applied = _heartbeats_held_back(monkeypatch)

    def skipped() -> bool:
        return any("4 heartbeat(s) not applied" in record.getMessage() for record in caplog.records)

    async def scenario():
        communicator, welcome = await start_worker(worker_key)
        for _ in range(5):
            await send(communicator, {"type": "heartbeat", "running": []})
        leaving = asyncio.ensure_future(communicator.disconnect(timeout=10))
        await until(skipped, what="the disconnect to set the queued heartbeats aside")  # the first still held
        release.set()
        await asyncio.wait_for(leaving, 10)
        return welcome["worker_id"]

    worker_id = run(scenario())

    assert applied == [1]  # the one under way when it went; none of those behind it
    assert Worker.objects.get(id=worker_id).channel_name == ""


def test_reports_not_applied_within_the_bound_of_a_disconnect_are_dropped(worker_key, monkeypatch, caplog):
    monkeypatch.setattr(consumers, "DISCONNECT_DRAIN_SECONDS", 0.2)
    release, _ = _heartbeats_held_back(monkeypatch)

    def dropped() -> bool:
        return any("not applied by its disconnect" in record.getMessage() for record in caplog.records)

    async def scenario():
        communicator, welcome = await start_worker(worker_key)
        task, assign = await _assigned(communicator)
        await send(communicator, {"type": "heartbeat", "running": []})
        report = {"type": "log", "task_id": assign["task_id"], "token": assign["token"], "seq": 0}
        await send(communicator, {**report, "lines": [{"stream": "stdout", "line": "late"}]})
        leaving = asyncio.ensure_future(communicator.disconnect(timeout=10))
        await until(dropped, what="the disconnect to give up on what is left")  # the heartbeat still held
        release.set()
        await leaving
        return welcome["worker_id"], task.id

    worker_id, task_id = run(scenario())

    assert not TaskLogLine.objects.filter(task_id=task_id).exists()  # the agent sends it again when back
    assert Worker.objects.get(id=worker_id).channel_name == ""


def _lease_after_a_log_report(worker_key: str):
    async def scenario():
        communicator, welcome = await start_worker(worker_key, features=["log_ack"])
        _, assign = await _assigned(communicator)
        await db(Worker.objects.filter(id=welcome["worker_id"]).update)(last_heartbeat=None)
        await send(communicator, _log(assign, "epoch 1", seq=0))
        assert (await receive(communicator))["type"] == "log_ack"
        await communicator.disconnect()
        return welcome["worker_id"]

    return Worker.objects.get(id=run(scenario())).last_heartbeat


@override_settings(FETCHML_WORKER_HEARTBEAT_SECONDS=0)
def test_a_run_report_extends_the_lease_when_a_heartbeat_is_due(worker_key):
    assert _lease_after_a_log_report(worker_key) is not None


@override_settings(FETCHML_WORKER_HEARTBEAT_SECONDS=0)
def test_a_run_report_is_answered_when_extending_the_lease_fails(worker_key, monkeypatch):
    def failing(**_):
        raise django.db.OperationalError("the database went away")

    monkeypatch.setattr(services, "worker_lease_extend", failing)

    async def scenario():
        communicator, _ = await start_worker(worker_key, features=["log_ack"])
        _, assign = await _assigned(communicator)
        await send(communicator, _log(assign, "epoch 1", seq=0))
        answer = await receive(communicator)
        await communicator.disconnect()
        return answer

    assert run(scenario())["type"] == "log_ack"


def test_a_run_report_leaves_the_lease_alone_while_the_last_extension_is_recent(worker_key):
    assert _lease_after_a_log_report(worker_key) is None


def test_cancel_of_a_running_task_reaches_the_worker_connection(worker_key):
    async def scenario():
        communicator, _ = await start_worker(worker_key)
        task, assign = await _assigned(communicator)
        owner = await db(lambda: task.owner)()
        await db(task_cancel)(task=await _reload(Task, task.id), actor=Actor(user=owner, role="user"))
        cancel = await receive(communicator)
        await communicator.disconnect()
        return assign, cancel

    assign, cancel = run(scenario())

    assert cancel == {
        "type": "cancel",
        "version": 1,
        "task_id": assign["task_id"],
        "token": assign["token"],
        "reason": "cancelled by alice",
    }


def test_pending_cancel_is_sent_again_with_the_heartbeat(worker_key):
    async def scenario():
        communicator, _ = await start_worker(worker_key)
        task, assign = await _assigned(communicator)
        owner = await db(lambda: task.owner)()
        await db(task_cancel)(task=await _reload(Task, task.id), actor=Actor(user=owner, role="user"))
        await receive(communicator)
        await send(
            communicator, {"type": "heartbeat", "running": [{"task_id": assign["task_id"], "token": assign["token"]}]}
        )
        again = await receive(communicator)
        await communicator.disconnect()
        return again

    assert run(scenario())["type"] == "cancel"


def test_cancelled_report_ends_the_task_cancelled_and_keeps_who_cancelled_it(worker_key):
    async def scenario():
        communicator, _ = await start_worker(worker_key)
        task, assign = await _assigned(communicator)
        owner = await db(lambda: task.owner)()
        await db(task_cancel)(task=await _reload(Task, task.id), actor=Actor(user=owner, role="user"))
        await receive(communicator)
        run_ref = {"task_id": assign["task_id"], "token": assign["token"]}
        await send(communicator, {"type": "status", **run_ref, "status": "cancelled", "exit_code": -15})
        ack = await receive(communicator)
        await communicator.disconnect()
        return task, ack

    task, ack = run(scenario())

    task.refresh_from_db()
    assert ack["type"] == "status_ack"
    assert (task.status, task.failure_reason, task.cancelled_by.username) == ("cancelled", "cancelled", "alice")
    assert Worker.objects.get().used_batch_slots == 0


def test_log_lines_are_stored_for_the_current_attempt(worker_key):
    async def scenario():
        communicator, _ = await start_worker(worker_key)
        task, assign = await _assigned(communicator)
        lines = [{"stream": "stdout", "line": "epoch 1"}, {"stream": "stderr", "line": "warning"}]
        await send(
            communicator, {"type": "log", "task_id": assign["task_id"], "token": assign["token"], "lines": lines}
        )
        await expect_nothing(communicator)
        await communicator.disconnect()
        return task

    task = run(scenario())

    stored = list(TaskLogLine.objects.filter(task=task).order_by("id").values_list("attempt", "stream", "line"))
    assert stored == [(1, "stdout", "epoch 1"), (1, "stderr", "warning")]


def _log(assign: dict, *texts: str, seq: int | None = None) -> dict:
    lines = [{"stream": "stdout", "line": text} for text in texts]
    return {"type": "log", "task_id": assign["task_id"], "token": assign["token"], "lines": lines} | (
        {"seq": seq} if seq is not None else {}
    )


def test_a_counted_log_message_is_acknowledged_to_an_agent_that_asked(worker_key):
    async def scenario():
        communicator, _ = await start_worker(worker_key, features=["log_ack"])
        task, assign = await _assigned(communicator)
        await send(communicator, _log(assign, "epoch 1", "epoch 2", seq=0))
        answer = await receive(communicator)
        await communicator.disconnect()
        return task, assign, answer

    task, assign, answer = run(scenario())

    assert answer == {"type": "log_ack", "version": 1, "task_id": assign["task_id"], "token": assign["token"], "seq": 0}
    stored = TaskLogLine.objects.filter(task=task).order_by("id").values_list("seq", "line")
    assert list(stored) == [(0, "epoch 1"), (1, "epoch 2")]


def test_a_log_message_sent_again_is_acknowledged_again_and_stored_once(worker_key):
    async def scenario():
        communicator, _ = await start_worker(worker_key, features=["log_ack"])
        task, assign = await _assigned(communicator)
        answers = []
        for _ in range(2):
            await send(communicator, _log(assign, "epoch 1", seq=0))
            answers.append(await receive(communicator))
        await communicator.disconnect()
        return task, answers

    task, answers = run(scenario())

    assert [answer["type"] for answer in answers] == ["log_ack", "log_ack"]
    assert list(TaskLogLine.objects.filter(task=task).values_list("line", flat=True)) == ["epoch 1"]


def test_an_agent_that_did_not_ask_gets_no_log_ack(worker_key):
    async def scenario():
        communicator, _ = await start_worker(worker_key, features=["batch"])
        _, assign = await _assigned(communicator)
        await send(communicator, _log(assign, "epoch 1", seq=0))
        await expect_nothing(communicator)
        await communicator.disconnect()

    run(scenario())


def test_lines_of_a_run_that_ended_on_its_own_report_are_still_stored(worker_key):
    async def scenario():
        communicator, _ = await start_worker(worker_key, features=["log_ack"])
        task, assign = await _assigned(communicator)
        final = {"type": "status", "task_id": assign["task_id"], "token": assign["token"], "status": "completed"}
        await send(communicator, final)
        assert (await receive(communicator))["type"] == "status_ack"
        await send(communicator, _log(assign, "late line", seq=0))
        answer = await receive(communicator)
        await communicator.disconnect()
        return task, answer

    task, answer = run(scenario())

    assert answer["type"] == "log_ack"
    assert list(TaskLogLine.objects.filter(task=task).values_list("line", flat=True)) == ["late line"]


@pytest.mark.parametrize("seq", [-1, True, "0", 2**31 - 1])
def test_a_log_message_with_a_bad_seq_is_refused_and_stores_nothing(worker_key, seq):
    async def scenario():
        communicator, _ = await start_worker(worker_key, features=["log_ack"])
        task, assign = await _assigned(communicator)
        await send(communicator, _log(assign, "a", "b", seq=seq))
        answer = await receive(communicator)
        await communicator.disconnect()
        return task, answer

    task, answer = run(scenario())

    assert (answer["type"], answer["code"], answer["ref_type"]) == ("error", "BAD_MESSAGE", "log")
    assert not TaskLogLine.objects.filter(task=task).exists()


def test_drain_is_delivered_to_the_worker(worker_key, admin_user):
    async def scenario():
        communicator, welcome = await start_worker(worker_key)
        box = await _reload(Worker, welcome["worker_id"])
        await db(worker_drain)(worker=box, actor=Actor(user=admin_user, role="admin"))
        message = await receive(communicator)
        await communicator.disconnect()
        return message

    assert run(scenario()) == {"type": "drain", "version": 1}


def test_an_operator_drain_while_the_agent_is_away_is_delivered_when_that_agent_comes_back(worker_key, admin_user):
    async def scenario():
        communicator, welcome = await start_worker(worker_key, instance="agent-a")
        await communicator.disconnect()
        box = await _reload(Worker, welcome["worker_id"])
        await db(worker_drain)(worker=box, actor=Actor(user=admin_user, role="admin"))  # idle: offline at once
        again, _ = await start_worker(worker_key, instance="agent-a")
        message = await receive(again)
        await again.disconnect()
        return message, await _reload(Worker, welcome["worker_id"])

    message, box = run(scenario())

    assert message == {"type": "drain", "version": 1}
    assert box.status == "draining"


def test_a_new_agent_process_is_not_handed_the_drain_its_predecessor_announced(worker_key):
    async def scenario():
        communicator, welcome = await start_worker(worker_key, instance="agent-a")
        _, assign = await _assigned(communicator)
        await send(communicator, {"type": "ack", "task_id": assign["task_id"], "token": assign["token"]})
        await send(communicator, {"type": "draining"})  # its SIGTERM: it drains, then is killed
        await expect_nothing(communicator)
        await communicator.disconnect()
        again, _ = await start_worker(worker_key, instance="agent-b")
        await expect_nothing(again)
        await again.disconnect()
        return await _reload(Worker, welcome["worker_id"])

    assert run(scenario()).status == "active"


def test_an_operator_drain_holds_for_an_agent_started_again_before_the_worker_drained(worker_key, admin_user):
    # The agent died mid-drain (its runs with it) and was started again, as `serve` does.
    async def scenario():
        communicator, welcome = await start_worker(worker_key, instance="agent-a")
        _, assign = await _assigned(communicator)
        await send(communicator, {"type": "ack", "task_id": assign["task_id"], "token": assign["token"]})
        await expect_nothing(communicator)
        box = await _reload(Worker, welcome["worker_id"])
        await db(worker_drain)(worker=box, actor=Actor(user=admin_user, role="admin"))
        assert (await receive(communicator))["type"] == "drain"
        await communicator.disconnect()
        again, _ = await start_worker(worker_key, instance="agent-b")
        message = await receive(again)
        await again.disconnect()
        return message

    assert run(scenario()) == {"type": "drain", "version": 1}


def test_a_drained_agent_coming_back_gets_drain_not_its_unacknowledged_runs_which_go_back(worker_key, admin_user):
    async def scenario():
        communicator, welcome = await start_worker(worker_key, instance="agent-a")
        task, _ = await _assigned(communicator)
        await communicator.disconnect()
        box = await _reload(Worker, welcome["worker_id"])
        await db(worker_drain)(worker=box, actor=Actor(user=admin_user, role="admin"))
        again, _ = await start_worker(worker_key, instance="agent-a")
        message = await receive(again)
        await expect_nothing(again)
        await send(again, {"type": "draining"})
        await expect_nothing(again)
        await again.disconnect()
        return message, await _reload(Task, task.id)

    message, task = run(scenario())

    assert message == {"type": "drain", "version": 1}
    assert (task.status, task.retry_count) == ("queued", 0)


def test_reports_sent_back_to_back_are_all_applied_and_answered_in_the_order_sent(worker_key):
    async def scenario():
        communicator, _ = await start_worker(worker_key, batch_slots=6)
        for _ in range(6):
            await _submit()
        assert await db(dispatch_round)() == 6
        assigns = [await receive(communicator) for _ in range(6)]
        for assign in assigns:
            run_ref = {"task_id": assign["task_id"], "token": assign["token"]}
            await send(communicator, {"type": "ack", **run_ref})
            await send(communicator, {"type": "status", **run_ref, "status": "completed", "exit_code": 0})
        answers = [await receive(communicator) for _ in range(6)]
        await communicator.disconnect()
        return assigns, answers

    assigns, answers = run(scenario())

    assert [a["type"] for a in answers] == ["status_ack"] * 6
    assert [a["task_id"] for a in answers] == [a["task_id"] for a in assigns]
    assert all(a["accepted"] for a in answers)
    assert set(Task.objects.values_list("status", flat=True)) == {"completed"}


def test_reports_reaching_an_idle_connection_a_moment_apart_are_applied_in_one_batch(worker_key, monkeypatch):
    # A wide window, so that the moment between the two reports cannot outlast it.
    monkeypatch.setattr(consumers, "REPORT_GATHER_SECONDS", 0.5)
    batches = []
    apply = services.apply_run_reports

    def recorded(*, worker_id, reports):
        batches.append([report["type"] for report in reports])
        return apply(worker_id=worker_id, reports=reports)

    monkeypatch.setattr(services, "apply_run_reports", recorded)

    async def scenario():
        communicator, _ = await start_worker(worker_key, name="gpu-box-1")
        _, assign = await _assigned(communicator)
        run_ref = {"task_id": assign["task_id"], "token": assign["token"]}
        await send(communicator, {"type": "ack", **run_ref})
        await asyncio.sleep(0.05)
        await send(communicator, {"type": "status", **run_ref, "status": "completed", "exit_code": 0})
        answer = await receive(communicator)
        await communicator.disconnect()
        return answer

    answer = run(scenario())

    assert answer["type"] == "status_ack" and answer["accepted"]
    assert batches == [["ack", "status"]]
