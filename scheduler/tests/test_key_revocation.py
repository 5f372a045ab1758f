"""`/ws/worker` and a key that stops being usable: revoked (told at once), expired or its user
deactivated (found at the next heartbeat). The connection is closed with 4401, the worker goes
offline, and its runs are re-queued once, as `worker_lost`; the agent so closed stops."""

import asyncio
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from channels.db import database_sync_to_async
from django.utils import timezone

from audit.models import AuditEvent
from fetchml.models import ApiKey
from fetchml.tests.factories import ApiKeyFactory, deactivate_key_user, expire_key, revoke_key, revoke_key_unannounced
from scheduler.agent.client import EXIT_REFUSED, Agent
from scheduler.dispatch import dispatch_round
from scheduler.models import NodeAssignment, Worker
from scheduler.services import expire_leases
from scheduler.tests.agent_peer import Peer, agent_config, assign, process_gone, python, run_async
from scheduler.tests.factories import UserFactory, queued_task
from scheduler.tests.ws import closed_with, connect, receive, run, send, start_worker
from tasks.models import Task

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("channel_layer", "thread_connections")]

db = database_sync_to_async
REVOKED = (4401, "API key revoked")
FOUND_UNUSABLE = (4401, "API key revoked or expired")


@pytest.fixture
def worker_pair() -> tuple[ApiKey, str]:
    return ApiKeyFactory.pair(user=UserFactory(username="worker-agent"), role="worker")


_revoke = db(revoke_key)


@db
def _submit() -> Task:
    return queued_task(owner=UserFactory(username="alice"))


async def _running(communicator) -> tuple[Task, dict]:
    """A task dispatched to the worker, acknowledged and running."""
    task = await _submit()
    assert await db(dispatch_round)() == 1
    assign = await receive(communicator)
    assert assign["type"] == "assign", assign
    run_ids = {"task_id": assign["task_id"], "token": assign["token"]}
    await send(communicator, {"type": "ack", **run_ids})
    await send(communicator, {"type": "status", **run_ids, "status": "running"})
    # Answered (`stop` for the unknown run) once all the above is applied: the connection's messages
    # are handled in order.
    unknown = {"task_id": str(uuid.uuid4()), "token": str(uuid.uuid4())}
    await send(communicator, {"type": "heartbeat", "running": [{**run_ids, "status": "running"}, unknown]})
    assert (await receive(communicator))["type"] == "stop"
    return task, assign


def test_revoking_its_key_closes_a_worker_connection_with_4401(worker_pair):
    key, raw = worker_pair

    async def scenario():
        communicator, _ = await start_worker(raw, name="box-1")
        await _revoke(key)
        return await closed_with(communicator)

    assert run(scenario()) == REVOKED


def test_a_connection_not_yet_welcomed_is_closed_too_and_registers_no_worker(worker_pair):
    key, raw = worker_pair

    async def scenario():
        communicator = await connect(raw)
        await _revoke(key)
        return await closed_with(communicator)

    assert run(scenario()) == REVOKED
    assert not Worker.objects.exists()


def test_a_worker_whose_key_is_revoked_goes_offline_and_is_assigned_nothing_more(worker_pair):
    key, raw = worker_pair

    async def scenario():
        communicator, _ = await start_worker(raw, name="box-1")
        await _revoke(key)
        await closed_with(communicator)
        await communicator.disconnect()
        await _submit()
        return await db(dispatch_round)()

    assert run(scenario()) == 0
    box = Worker.objects.get(name="box-1")
    assert (box.status, box.channel_name) == (Worker.Status.OFFLINE, "")
    assert AuditEvent.objects.filter(resource="worker:box-1", action="key_refused").count() == 1


def test_runs_of_a_worker_whose_key_is_revoked_are_requeued_once_as_worker_lost(worker_pair):
    key, raw = worker_pair

    async def scenario():
        communicator, _ = await start_worker(raw, name="box-1")
        task, _ = await _running(communicator)
        assert (await db(Task.objects.get)(id=task.id)).status == "running"
        await _revoke(key)
        await closed_with(communicator)
        await communicator.disconnect()
        return task

    task = run(scenario())

    task.refresh_from_db()
    assert (task.status, task.retry_count, task.attempt) == ("queued", 1, 1)
    [assignment] = NodeAssignment.objects.filter(task=task)
    assert (assignment.status, assignment.holds_capacity) == (NodeAssignment.Status.LOST, False)
    box = Worker.objects.get(name="box-1")
    assert (box.used_batch_slots, box.used_cpu) == (0, 0)
    # The lease pass finds nothing left to take away: the run is not lost a second time.
    assert expire_leases(now=timezone.now() + timedelta(days=1)) == 0
    task.refresh_from_db()
    assert (task.status, task.retry_count) == ("queued", 1)


def test_a_final_status_after_the_revocation_is_told_to_stop(worker_pair):
    key, raw = worker_pair
    other_raw = ApiKeyFactory.raw(user=key.user, role="worker")

    async def scenario():
        communicator, _ = await start_worker(raw, name="box-1")
        task, assign = await _running(communicator)
        await _revoke(key)
        await closed_with(communicator)
        await communicator.disconnect()
        # The same machine, with a new key, reports the run that was taken away.
        again, welcome = await start_worker(other_raw, name="box-1", running=[{**assign, "status": "completed"}])
        await again.disconnect()
        return task, assign, welcome

    task, assign, welcome = run(scenario())

    assert welcome["reconcile"] == {"keep": [], "kill": [assign["token"]]}
    task.refresh_from_db()
    assert (task.status, task.retry_count) == ("queued", 1)


def test_reconnecting_with_a_revoked_key_is_refused_at_the_handshake(worker_pair):
    key, raw = worker_pair

    async def scenario():
        await _revoke(key)
        return await closed_with(await connect(raw))

    assert run(scenario()) == (4401, "invalid or missing API key")


@pytest.mark.parametrize(
    "made_unusable",
    [expire_key, deactivate_key_user, revoke_key_unannounced],
    ids=["expired", "user-deactivated", "revocation-message-lost"],
)
def test_a_key_found_unusable_at_a_heartbeat_closes_the_connection_and_requeues_its_runs(
    worker_pair, made_unusable: Callable[[ApiKey], None]
):
    key, raw = worker_pair

    async def scenario():
        communicator, _ = await start_worker(raw, name="box-1")
        task, assign = await _running(communicator)
        await db(made_unusable)(key)
        run_ids = {"task_id": assign["task_id"], "token": assign["token"], "status": "running"}
        await send(communicator, {"type": "heartbeat", "running": [run_ids]})
        closed = await closed_with(communicator)
        await communicator.disconnect()
        return task, closed

    task, closed = run(scenario())

    assert closed == FOUND_UNUSABLE
    assert Worker.objects.get(name="box-1").status == Worker.Status.OFFLINE
    task.refresh_from_db()
    assert (task.status, task.retry_count) == ("queued", 1)


def test_revoking_another_key_leaves_the_connection_open(worker_pair):
    _key, raw = worker_pair
    other = ApiKeyFactory.create(user=UserFactory(username="other-agent"), role="worker")

    async def scenario():
        communicator, _ = await start_worker(raw, name="box-1")
        await _revoke(other)
        unknown = {"task_id": str(uuid.uuid4()), "token": str(uuid.uuid4())}
        await send(communicator, {"type": "heartbeat", "running": [unknown]})
        answer = await receive(communicator)
        await communicator.disconnect()
        return answer

    assert run(scenario())["type"] == "stop"
    assert Worker.objects.get(name="box-1").status == Worker.Status.ACTIVE


def test_an_agent_whose_live_connection_is_closed_with_4401_stops_and_kills_its_runs(tmp_path: Path, caplog):
    async def scenario() -> tuple[int, int, int]:
        async with Peer() as peer:
            agent = Agent(agent_config(peer.url, tmp_path))
            serving = asyncio.create_task(agent.run())
            await peer.send(assign(python("import os, time\nprint(os.getpid(), flush=True)\ntime.sleep(300)")))
            pid = int((await peer.next(lambda m: m["type"] == "log"))["lines"][0]["line"])
            await peer.close_connection(*REVOKED)
            return await asyncio.wait_for(serving, 15), pid, len(peer.hellos)

    exit_status, pid, hellos = run_async(scenario())

    assert (exit_status, hellos) == (EXIT_REFUSED, 1)  # stopped, not reconnected
    assert process_gone(pid)
    assert "the server refused the API key" in caplog.text
