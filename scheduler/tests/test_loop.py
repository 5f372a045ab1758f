"""The scheduler loop: woken by the channel layer, surviving database drops; the command stops on SIGTERM."""

import asyncio
import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import OperationalError, connection
from django.test import override_settings
from django.utils import timezone

from conftest import USING_POSTGRES, requires_postgres
from fetchml import events
from fetchml.models import ApiKey
from fetchml.testing import backend_pid, frozen
from scheduler import loop as scheduler_loop
from scheduler.loop import STOP_PASS_GRACE_SECONDS, SchedulerLoop, _WakeListener
from scheduler.tests.factories import queued_task, run_started, worker
from tasks.models import IdempotencyRecord, Task

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("channel_layer", "thread_connections")]

WAIT = 10.0


async def _until(condition, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not await sync_to_async(condition)():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def _status(task: Task) -> str:
    return Task.objects.values_list("status", flat=True).get(id=task.id)


async def _running_loop() -> tuple[SchedulerLoop, asyncio.Event, asyncio.Task]:
    loop, stop = SchedulerLoop(), asyncio.Event()
    running = asyncio.ensure_future(loop.run(stop))
    await _until(lambda: loop.passes >= 1)
    return loop, stop, running


async def _wake(channel_layer, reason: str = "test") -> None:
    await channel_layer.group_send(events.WAKE_GROUP, {"type": "scheduler.wake", "reason": reason})


@override_settings(FETCHML_SCHEDULER_INTERVAL=60.0)
def test_wake_message_makes_the_loop_dispatch_long_before_the_interval(channel_layer):
    async def scenario():
        _, stop, running = await _running_loop()
        task = await sync_to_async(queued_task)()
        await sync_to_async(worker)()
        started = time.monotonic()
        await _wake(channel_layer)
        await _until(lambda: _status(task) == "preparing", timeout=5)
        stop.set()
        await asyncio.wait_for(running, timeout=WAIT)
        return time.monotonic() - started

    assert run_seconds(scenario()) < 5


def run_seconds(scenario) -> float:
    return asyncio.run(scenario)


@override_settings(FETCHML_SCHEDULER_INTERVAL=0.2)
def test_interval_pass_dispatches_without_any_wake_message():
    async def scenario():
        _, stop, running = await _running_loop()
        task = await sync_to_async(queued_task)()
        await sync_to_async(worker)()
        await _until(lambda: _status(task) == "preparing")
        stop.set()
        await asyncio.wait_for(running, timeout=WAIT)

    asyncio.run(scenario())


def test_a_maintenance_pass_notices_a_starving_head_and_the_pass_holds_capacity_for_it(settings):
    settings.FETCHML_STARVATION_SECONDS = 60
    for name in ("node-0", "node-1"):
        worker(name=name, batch_slots=1)
    queued_task(priority=10)
    loop = SchedulerLoop()
    loop.starvation_possible = False  # as a maintenance pass with no old task would have left it
    loop.run_once(maintenance=False)  # one node busy
    gang = queued_task(node_count=2, queued_at=timezone.now() - timedelta(minutes=10))
    small = queued_task(queued_at=timezone.now() - timedelta(minutes=5))

    loop.run_once(maintenance=True)

    assert loop.starvation_possible
    assert (_status(gang), _status(small)) == ("queued", "queued")


def _drop_loop_connections() -> int:
    """Cut the loop's database connection from outside, as a server restart or a network cut would."""
    if USING_POSTGRES:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            return cursor.fetchone()[0]
    return 1


@override_settings(FETCHML_SCHEDULER_INTERVAL=60.0)
def test_loop_keeps_working_after_its_database_connection_is_dropped(channel_layer):
    async def scenario():
        loop, stop, running = await _running_loop()
        if not USING_POSTGRES:
            # SQLite has no server to cut us off: close the loop's connection under Django's feet.
            await sync_to_async(
                lambda: connection.connection.close(), thread_sensitive=False, executor=loop._executor
            )()
        dropped = await sync_to_async(_drop_loop_connections)()
        task = await sync_to_async(queued_task)()
        await sync_to_async(worker)()
        await _wake(channel_layer)
        await _until(lambda: _status(task) == "preparing")
        assert not running.done()
        stop.set()
        await asyncio.wait_for(running, timeout=WAIT)
        return dropped

    assert asyncio.run(scenario()) >= 1


async def _loop_backend_pid(loop: SchedulerLoop) -> int:
    return await sync_to_async(backend_pid, thread_sensitive=False, executor=loop._executor)()


@requires_postgres
@override_settings(FETCHML_SCHEDULER_INTERVAL=60.0, FETCHML_SCHEDULER_PASS_TIMEOUT_SECONDS=1.0)
def test_loop_cuts_its_connection_to_a_frozen_database_process_and_dispatches_on_a_new_one(
    channel_layer, freezable_database
):
    async def scenario():
        loop, stop, running = await _running_loop()
        backend = await _loop_backend_pid(loop)
        with frozen(backend):
            # The frozen process's host still acknowledges every packet: no network time-out fires.
            task = await sync_to_async(queued_task)()
            await sync_to_async(worker)()
            await _wake(channel_layer)
            await _until(lambda: _status(task) == "preparing")
            new_backend = await _loop_backend_pid(loop)
        assert not running.done()
        stop.set()
        await asyncio.wait_for(running, timeout=WAIT)
        return backend, new_backend

    backend, new_backend = asyncio.run(scenario())
    assert new_backend != backend


@requires_postgres
@override_settings(FETCHML_SCHEDULER_INTERVAL=60.0, FETCHML_SCHEDULER_PASS_TIMEOUT_SECONDS=600.0)
def test_loop_asked_to_stop_during_a_pass_on_a_frozen_database_process_stops_after_the_grace(
    channel_layer, freezable_database
):
    async def scenario():
        loop, stop, running = await _running_loop()
        backend = await _loop_backend_pid(loop)
        with frozen(backend):
            frozen_at = time.monotonic()
            await _wake(channel_layer)
            # A pass has begun; it cannot finish while the process it waits on is stopped.
            await _until(lambda: loop._pass_started_at > frozen_at)
            stop.set()
            await asyncio.wait_for(running, timeout=STOP_PASS_GRACE_SECONDS + WAIT)

    asyncio.run(scenario())


def test_scheduler_command_exits_cleanly_on_sigterm():
    db = connection.settings_dict
    if USING_POSTGRES:
        url = f"postgres://{db['USER']}@{db['HOST']}:{db['PORT'] or 5432}/{db['NAME']}"
    else:
        url = f"sqlite:///{db['NAME']}"
    env = {**os.environ, "DATABASE_URL": url, "DJANGO_SECRET_KEY": "test", "FETCHML_LOG_LEVEL": "INFO"}
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "scheduler"],
        cwd=Path(settings.BASE_DIR),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_line(proc, "scheduler loop started", timeout=30)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert "scheduler loop stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def _wait_for_line(proc: subprocess.Popen, text: str, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], deadline - time.monotonic())
        if not ready:
            break
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if text in line:
            return
    raise AssertionError(f"{text!r} not logged; got: {''.join(seen)}")


def test_a_pass_prunes_expired_idempotency_records_now_and_then(user, worker_key):
    key = ApiKey.objects.first()
    old = IdempotencyRecord.objects.create(
        api_key=key, key="old", body_sha256="0" * 64, task=queued_task(owner=user), created_at=timezone.now()
    )
    IdempotencyRecord.objects.filter(id=old.id).update(created_at=timezone.now() - timedelta(days=30))
    IdempotencyRecord.objects.create(api_key=key, key="new", body_sha256="0" * 64, task=queued_task(owner=user))
    loop = SchedulerLoop()

    loop.run_once()
    assert list(IdempotencyRecord.objects.values_list("key", flat=True)) == ["new"]

    IdempotencyRecord.objects.filter(key="new").update(created_at=timezone.now() - timedelta(days=30))
    loop.run_once()  # housekeeping ran a moment ago: not again yet
    assert IdempotencyRecord.objects.filter(key="new").exists()


def test_a_backlog_of_expired_idempotency_records_is_pruned_a_batch_per_maintenance_pass(user, worker_key, monkeypatch):
    monkeypatch.setattr(scheduler_loop, "PRUNE_BATCH", 2)
    key = ApiKey.objects.first()
    for name in ("a", "b", "c"):
        IdempotencyRecord.objects.create(api_key=key, key=name, body_sha256="0" * 64, task=queued_task(owner=user))
    IdempotencyRecord.objects.update(created_at=timezone.now() - timedelta(days=30))
    loop = SchedulerLoop()

    loop.run_once()
    assert IdempotencyRecord.objects.count() == 1
    loop.run_once()  # the last pass pruned a whole batch: this one goes on
    assert IdempotencyRecord.objects.count() == 0


@override_settings(FETCHML_WORKER_LEASE_SECONDS=0)  # the loop has been up for a lease at once
def test_a_pass_without_maintenance_dispatches_but_leaves_leases_for_the_next_maintenance_pass():
    silent = worker(last_heartbeat=timezone.now() - timedelta(hours=1))
    free = worker(last_heartbeat=timezone.now() + timedelta(hours=1))  # heard from, whatever the lease
    task = queued_task()
    loop = SchedulerLoop()

    assert loop.run_once(maintenance=False)
    assert _status(task) == "preparing"
    assert Task.objects.get(id=task.id).worker_id in {silent.id, free.id}
    silent.refresh_from_db()
    assert silent.status == "active"

    loop.run_once()
    silent.refresh_from_db()
    assert silent.status == "offline"


def test_a_silent_worker_keeps_its_lease_for_a_lease_after_the_scheduler_started():
    # Started after an outage in which every scheduler died: nothing tells it the workers could
    # not be heard meanwhile either.
    silent = worker(last_heartbeat=timezone.now() - timedelta(hours=1))
    run = run_started(queued_task())
    loop = SchedulerLoop()

    loop.run_once()
    loop.run_once()
    silent.refresh_from_db()
    run.refresh_from_db()
    assert (silent.status, run.holds_capacity) == ("active", True)

    with override_settings(FETCHML_WORKER_LEASE_SECONDS=0):  # a lease has gone by since its first pass
        loop.run_once()
    silent.refresh_from_db()
    assert silent.status == "offline"


def test_a_silent_worker_keeps_its_lease_for_a_lease_after_a_pass_failed():
    silent = worker(last_heartbeat=timezone.now() - timedelta(hours=1))
    loop = SchedulerLoop()
    loop.pass_failed()  # the database out of reach: no heartbeat could be stored either

    loop.run_once()
    silent.refresh_from_db()
    assert silent.status == "active"

    with override_settings(FETCHML_WORKER_LEASE_SECONDS=0):  # a lease has gone by since
        loop.run_once()
    silent.refresh_from_db()
    assert silent.status == "offline"


@override_settings(FETCHML_WORKER_LEASE_SECONDS=2.0)
def test_a_silent_worker_keeps_its_lease_for_a_lease_after_the_first_pass_that_succeeds():
    silent = worker(last_heartbeat=timezone.now() - timedelta(hours=1))
    loop = SchedulerLoop()
    loop.pass_failed()
    time.sleep(2.1)  # the loop's back-off after failures outlasted a lease: the workers had none yet

    loop.run_once()  # the first pass that reaches the database again
    loop.run_once()
    silent.refresh_from_db()
    assert silent.status == "active"


@override_settings(FETCHML_TIMEOUT_MARGIN_SECONDS=60.0)
def test_a_run_past_its_timeout_is_left_to_report_for_a_lease_after_a_pass_failed():
    worker(last_heartbeat=timezone.now() + timedelta(hours=1))  # heard from throughout, whatever the lease
    task = queued_task(timeout_seconds=30)
    run_started(task)
    Task.objects.filter(id=task.id).update(started_at=timezone.now() - timedelta(seconds=91))
    loop = SchedulerLoop()
    loop.pass_failed()  # the agent's report of its end may be waiting for the database too

    loop.run_once()
    assert _status(task) == "running"

    with override_settings(FETCHML_WORKER_LEASE_SECONDS=0):
        loop.run_once()
    assert _status(task) == "failed"


@override_settings(FETCHML_SCHEDULER_INTERVAL=0.05)
def test_a_pass_that_fails_holds_the_leases_back(monkeypatch):
    silent = worker(last_heartbeat=timezone.now() - timedelta(hours=1))
    run_once, failures = SchedulerLoop.run_once, []

    def fails_once(self, **options):
        if not failures:
            failures.append(1)
            raise OperationalError("the database is out of reach")
        return run_once(self, **options)

    monkeypatch.setattr(SchedulerLoop, "run_once", fails_once)

    async def scenario():
        loop, stop, running = await _running_loop()
        await _until(lambda: loop.passes >= 3)  # maintenance passes (the interval is shorter than theirs)...
        stop.set()
        await asyncio.wait_for(running, timeout=WAIT)

    asyncio.run(scenario())
    silent.refresh_from_db()
    assert silent.status == "active"  # ...that left the silent worker its lease


class _GatedLoop(SchedulerLoop):
    """A loop whose next pass, once armed, waits for the test to open the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.entered = threading.Event()
        self.gate = threading.Event()

    def run_once(self, **options) -> bool:
        if self.armed:
            self.armed = False
            self.entered.set()
            self.gate.wait(WAIT)
        return super().run_once(**options)


@override_settings(FETCHML_SCHEDULER_INTERVAL=60.0)
def test_wake_messages_arriving_during_a_pass_cost_one_more_pass_not_one_each(channel_layer):
    async def scenario():
        loop, stop = _GatedLoop(), asyncio.Event()
        running = asyncio.ensure_future(loop.run(stop))
        await _until(lambda: loop.passes >= 1 and loop.wake is not None and loop.wake.channel is not None)
        before, received = loop.passes, loop.wake.received
        loop.armed = True
        await _wake(channel_layer)
        await sync_to_async(loop.entered.wait)(WAIT)  # that pass is under way, held at the gate
        for _ in range(20):
            await _wake(channel_layer)
        await _until(lambda: loop.wake.received == received + 21)
        loop.gate.set()
        await _until(lambda: loop.passes == before + 2)
        pending = loop.wake.woken.is_set()
        stop.set()
        await asyncio.wait_for(running, timeout=WAIT)
        return pending

    assert asyncio.run(scenario()) is False


@override_settings(FETCHML_SCHEDULER_INTERVAL=60.0)
def test_freed_capacity_wakes_no_pass_while_nothing_waits(channel_layer):
    async def scenario():
        loop, stop, running = await _running_loop()
        await _until(lambda: loop.wake.channel is not None)
        received = loop.wake.received
        await _wake(channel_layer, "capacity_freed")
        await _until(lambda: loop.wake.received == received + 1)
        declined, woken = loop.wake.declined, loop.wake.woken.is_set()
        stop.set()
        await asyncio.wait_for(running, timeout=WAIT)
        return declined, woken

    assert asyncio.run(scenario()) == (1, False)


@override_settings(FETCHML_SCHEDULER_INTERVAL=60.0)
def test_freed_capacity_wakes_a_pass_for_a_task_left_waiting(channel_layer):
    async def scenario():
        task = await sync_to_async(queued_task)(cpu=4)
        loop, stop, running = await _running_loop()  # no worker yet: the task is left waiting
        await sync_to_async(worker)(cpu_cores=8)
        await _wake(channel_layer, "capacity_freed")
        await _until(lambda: _status(task) == "preparing", timeout=5)
        declined = loop.wake.declined
        stop.set()
        await asyncio.wait_for(running, timeout=WAIT)
        return declined

    assert asyncio.run(scenario()) == 0


@override_settings(FETCHML_SCHEDULER_INTERVAL=60.0)
def test_a_wake_sent_once_the_first_pass_is_done_is_heard_however_slow_the_join(channel_layer, monkeypatch):
    # The first pass reads the queue only once the loop is a member of the wake group: joining
    # after it, a wake sent between the two would be lost and the task left for the interval.
    join = channel_layer.group_add

    async def slow_join(group, channel):
        await asyncio.sleep(0.5)
        await join(group, channel)

    monkeypatch.setattr(channel_layer, "group_add", slow_join)

    async def scenario():
        _, stop, running = await _running_loop()
        task = await sync_to_async(queued_task)()
        await sync_to_async(worker)()
        await _wake(channel_layer)
        await _until(lambda: _status(task) == "preparing", timeout=5)
        stop.set()
        await asyncio.wait_for(running, timeout=WAIT)

    asyncio.run(scenario())


def _kill_redis_clients() -> int:
    """Cut every connection to the test's Redis database but this one, as a Redis restart would."""
    import redis

    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        own, db = client.client_id(), client.connection_pool.connection_kwargs.get("db", 0)
        others = [c["id"] for c in client.client_list() if int(c["db"]) == db and int(c["id"]) != own]
        return sum(client.client_kill_filter(_id=client_id) for client_id in others)
    finally:
        client.close()


@pytest.mark.skipif(not settings.REDIS_URL, reason="needs Redis: set REDIS_URL=redis://... (CI always does)")
@override_settings(FETCHML_SCHEDULER_INTERVAL=60.0)
def test_loop_is_woken_again_after_its_channel_layer_connections_are_killed(channel_layer):
    async def scenario():
        loop, stop, running = await _running_loop()
        await _until(lambda: loop.wake.channel is not None)
        killed = await sync_to_async(_kill_redis_clients)()
        task = await sync_to_async(queued_task)()
        await sync_to_async(worker)()
        deadline = time.monotonic() + WAIT
        # Woken, not polled: the interval is a minute. Wakes sent until the listener is back.
        while await sync_to_async(_status)(task) != "preparing":
            assert time.monotonic() < deadline, "the loop was not woken after the channel layer came back"
            with contextlib.suppress(Exception):
                await _wake(channel_layer)
            await asyncio.sleep(0.1)
        assert not running.done()
        stop.set()
        await asyncio.wait_for(running, timeout=WAIT)
        return killed

    assert asyncio.run(scenario()) >= 1


@pytest.fixture
def pass_gaps(monkeypatch) -> list[float]:
    """The waits `_space_passes` asks for, instead of waiting them."""
    asked: list[float] = []

    async def recorded(stop, seconds):
        asked.append(seconds)

    monkeypatch.setattr("scheduler.loop._wait", recorded)
    return asked


def _just_passed(*, placed: int, backlog: bool, took: float = 0.0) -> SchedulerLoop:
    """A loop whose last pass ended just now after `took` seconds."""
    loop = SchedulerLoop()
    loop._pass_started_at, loop._last_placed, loop.backlog = time.monotonic() - took, placed, backlog
    return loop


@override_settings(FETCHML_SCHEDULER_PASS_GAP_SECONDS=5.0)
def test_pass_right_after_a_pass_that_left_work_waiting_waits_for_the_gap(pass_gaps):
    asyncio.run(_just_passed(placed=1, backlog=True)._space_passes(asyncio.Event()))

    [gap] = pass_gaps
    assert 4.0 < gap <= 5.0


@override_settings(FETCHML_SCHEDULER_PASS_GAP_SECONDS=5.0)
def test_pass_after_a_pass_that_took_longer_than_the_gap_goes_at_once(pass_gaps):
    asyncio.run(_just_passed(placed=1, backlog=True, took=6.0)._space_passes(asyncio.Event()))

    assert pass_gaps == []


@override_settings(FETCHML_SCHEDULER_PASS_GAP_SECONDS=5.0)
def test_pass_after_a_pass_shorter_than_the_gap_waits_only_for_the_rest_of_it(pass_gaps):
    asyncio.run(_just_passed(placed=1, backlog=True, took=3.0)._space_passes(asyncio.Event()))

    [gap] = pass_gaps
    assert 1.0 < gap <= 2.0


@override_settings(FETCHML_SCHEDULER_PASS_GAP_SECONDS=5.0)
def test_new_work_on_a_queue_the_last_pass_left_empty_is_dispatched_without_the_gap(pass_gaps):
    asyncio.run(_just_passed(placed=1, backlog=False)._space_passes(asyncio.Event()))

    assert pass_gaps == []


@override_settings(FETCHML_SCHEDULER_PASS_GAP_SECONDS=5.0, FETCHML_SCHEDULER_BATCH_SIZE=4)
def test_pass_after_a_full_batch_goes_at_once(pass_gaps):
    asyncio.run(_just_passed(placed=4, backlog=True)._space_passes(asyncio.Event()))

    assert pass_gaps == []


@override_settings(FETCHML_SCHEDULER_INTERVAL=60.0)
def test_loop_counts_the_gap_from_when_its_last_pass_started(monkeypatch):
    began: list[float] = []
    run_once = SchedulerLoop.run_once

    def noted(self, **kwargs):
        began.append(time.monotonic())
        return run_once(self, **kwargs)

    monkeypatch.setattr(SchedulerLoop, "run_once", noted)

    async def scenario():
        loop, stop, running = await _running_loop()
        stop.set()
        await asyncio.wait_for(running, timeout=WAIT)
        return loop._pass_started_at

    started = asyncio.run(scenario())
    assert started <= began[-1] < started + 1.0


def test_pass_that_changed_something_and_left_runnable_tasks_is_followed_at_once_by_another():
    assert _just_passed(placed=3, backlog=True)._pass_again(worked=True) is True


def test_pass_that_emptied_the_queue_waits_for_a_wake_up_instead_of_passing_again():
    assert _just_passed(placed=1, backlog=False)._pass_again(worked=True) is False


def test_pass_that_changed_nothing_waits_for_a_wake_up_even_with_tasks_waiting():
    assert _just_passed(placed=0, backlog=True)._pass_again(worked=False) is False


@override_settings(FETCHML_SCHEDULER_INTERVAL=60.0)
def test_loop_that_places_the_last_queued_task_goes_back_to_waiting_without_another_pass(channel_layer, monkeypatch):
    passes_when_waiting: list[int] = []
    loop = SchedulerLoop()
    wait = _WakeListener.wait

    async def recorded(listener, stop, timeout):
        passes_when_waiting.append(loop.passes)
        await wait(listener, stop, timeout)

    monkeypatch.setattr(_WakeListener, "wait", recorded)

    async def scenario():
        stop = asyncio.Event()
        running = asyncio.ensure_future(loop.run(stop))
        await _until(lambda: passes_when_waiting == [1] and loop.wake.channel is not None)
        task = await sync_to_async(queued_task)()
        await sync_to_async(worker)()
        await _wake(channel_layer)
        await _until(lambda: len(passes_when_waiting) == 2)
        stop.set()
        await asyncio.wait_for(running, timeout=WAIT)
        return task

    task = asyncio.run(scenario())

    assert _status(task) == "preparing"
    assert passes_when_waiting == [1, 2]  # the pass that placed it, then straight back to waiting
