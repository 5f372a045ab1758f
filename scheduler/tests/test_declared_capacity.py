"""A worker that declares less capacity than its runs hold keeps the larger figure only while they run."""

import pytest
from channels.db import database_sync_to_async

from scheduler.counters import give_back
from scheduler.dispatch import dispatch_round
from scheduler.models import Worker
from scheduler.tests.factories import UserFactory, queued_task, worker
from scheduler.tests.ws import receive, run, send, start_worker

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("channel_layer", "thread_connections")]

db = database_sync_to_async


def _cpu(box: Worker) -> tuple[int, int]:
    box.refresh_from_db()
    return box.cpu_cores, box.used_cpu


def test_a_capacity_held_above_the_declared_one_shrinks_back_as_runs_give_back():
    box = worker(cpu_cores=6, used_cpu=6, declared_cpu_cores=4)
    give_back(box.id, {"used_cpu": 1})
    assert _cpu(box) == (5, 5)
    give_back(box.id, {"used_cpu": 3})
    assert _cpu(box) == (4, 2)
    give_back(box.id, {"used_cpu": 2})
    assert _cpu(box) == (4, 0)


def test_a_capacity_never_declared_stays_as_it_is_when_runs_give_back():
    box = worker(cpu_cores=8, used_cpu=6)
    give_back(box.id, {"used_cpu": 6})
    assert _cpu(box) == (8, 0)


def test_a_worker_that_declared_less_is_not_given_more_once_the_runs_holding_more_end(worker_key):
    async def scenario() -> tuple[tuple[int, int], tuple[int, int], int, int]:
        communicator, _ = await start_worker(worker_key, cpu_cores=8)
        owner = await db(UserFactory)(username="alice")
        await db(queued_task)(owner=owner, cpu=6)
        assert await db(dispatch_round)() == 1
        assign = await receive(communicator)
        run_ref = {"task_id": assign["task_id"], "token": assign["token"]}
        await send(communicator, {"type": "ack", **run_ref})
        await send(communicator, {"type": "status", **run_ref, "status": "running"})
        await communicator.disconnect()
        # The agent comes back declaring 4 CPUs, still running the 6-CPU task.
        communicator, welcome = await start_worker(worker_key, cpu_cores=4, running=[run_ref])
        assert welcome["reconcile"]["keep"] == [assign["token"]]
        box = await db(Worker.objects.get)()
        while_running = await db(_cpu)(box)
        await send(communicator, {"type": "status", **run_ref, "status": "completed", "exit_code": 0})
        assert (await receive(communicator))["accepted"] is True
        after = await db(_cpu)(box)
        await db(queued_task)(owner=owner, cpu=5)
        too_big = await db(dispatch_round)()
        await db(queued_task)(owner=owner, cpu=4)
        fitting = await db(dispatch_round)()
        await communicator.disconnect()
        return while_running, after, too_big, fitting

    while_running, after, too_big, fitting = run(scenario())
    assert while_running == (6, 6)
    assert after == (4, 0)
    assert (too_big, fitting) == (0, 1)


def test_a_capacity_declared_above_what_runs_hold_counts_at_once(worker_key):
    async def scenario() -> tuple[int, int]:
        communicator, _ = await start_worker(worker_key, cpu_cores=4)
        await communicator.disconnect()
        communicator, _ = await start_worker(worker_key, cpu_cores=12)
        box = await db(Worker.objects.get)()
        await communicator.disconnect()
        return await db(_cpu)(box)

    assert run(scenario()) == (12, 0)
