"""A database that froze for most of a lease and then answered stored no heartbeat meanwhile: the
pass that waited on it expires no lease and fails no run as overdue, and fails as after an outage.
Failures in a row are logged once with their traceback; leaving the wake group cannot hold up a stop."""

import asyncio
import logging
import time
from datetime import timedelta

import pytest
from django.db import OperationalError
from django.test import override_settings
from django.utils import timezone

from scheduler import loop as scheduler_loop
from scheduler import services
from scheduler.loop import SchedulerLoop, _WakeListener
from scheduler.services import DatabaseStalled
from scheduler.tests.factories import queued_task, run_started, worker
from tasks.models import Task

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("channel_layer", "thread_connections")]

LEASE = 3.0  # a third of it, past STALLED_FLOOR_SECONDS, is a stall
STALL = 1.2
WAIT = 10.0


def _heard_for_a_lease() -> SchedulerLoop:
    loop = SchedulerLoop()
    loop._succeeding_since = time.monotonic() - 3600  # passes succeeded long before the freeze
    return loop


def _answering_late(real):
    def late(*args, **kwargs):
        time.sleep(STALL)  # the database answers only now, its silence past a third of the lease
        return real(*args, **kwargs)

    return late


async def _run_until(loop: SchedulerLoop, *, passes: int) -> None:
    """Run `loop` until it has completed `passes` passes, then stop it."""
    stop = asyncio.Event()
    running = asyncio.ensure_future(loop.run(stop))
    async with asyncio.timeout(WAIT):
        while loop.passes < passes:
            await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(running, timeout=WAIT)


@override_settings(FETCHML_WORKER_LEASE_SECONDS=LEASE)
def test_a_pass_held_up_by_a_silent_database_expires_no_lease(monkeypatch):
    silent = worker(last_heartbeat=timezone.now() - timedelta(hours=1))  # none could be stored meanwhile
    run = run_started(queued_task())
    monkeypatch.setattr(services, "database_now", _answering_late(services.database_now))

    with pytest.raises(DatabaseStalled):
        _heard_for_a_lease().run_once()

    silent.refresh_from_db()
    run.refresh_from_db()
    assert (silent.status, run.holds_capacity) == ("active", True)


@override_settings(FETCHML_WORKER_LEASE_SECONDS=LEASE, FETCHML_TIMEOUT_MARGIN_SECONDS=0.0)
def test_a_pass_held_up_by_a_silent_database_fails_no_run_as_overdue(monkeypatch):
    worker(last_heartbeat=timezone.now() + timedelta(hours=1))  # heard from throughout
    task = queued_task(timeout_seconds=30)
    run_started(task)
    Task.objects.filter(id=task.id).update(started_at=timezone.now() - timedelta(seconds=60))
    monkeypatch.setattr(services, "lock_run_workers", _answering_late(services.lock_run_workers))

    with pytest.raises(DatabaseStalled):
        _heard_for_a_lease().run_once()

    assert Task.objects.get(id=task.id).status == "running"


@override_settings(FETCHML_WORKER_LEASE_SECONDS=LEASE)
def test_a_pass_that_answered_in_time_still_expires_a_silent_worker():
    silent = worker(last_heartbeat=timezone.now() - timedelta(hours=1))

    _heard_for_a_lease().run_once()

    silent.refresh_from_db()
    assert silent.status == "offline"


@override_settings(FETCHML_SCHEDULER_INTERVAL=0.05, FETCHML_WORKER_LEASE_SECONDS=LEASE)
def test_the_loop_takes_a_stalled_pass_as_an_outage(monkeypatch):
    silent = worker(last_heartbeat=timezone.now() - timedelta(hours=1))
    run_once, stalls = SchedulerLoop.run_once, []

    def stalls_once(self, **options):
        if not stalls:
            stalls.append(1)
            raise DatabaseStalled("the database stalled while expiring leases")
        return run_once(self, **options)

    monkeypatch.setattr(SchedulerLoop, "run_once", stalls_once)

    asyncio.run(_run_until(_heard_for_a_lease(), passes=3))
    silent.refresh_from_db()
    assert silent.status == "active"  # the lease runs again from the first pass after the stall


@override_settings(FETCHML_SCHEDULER_INTERVAL=0.05)
def test_failures_in_a_row_log_one_traceback_then_one_line_each(monkeypatch, caplog):
    failures = []

    def fails_three_times(self, **options):
        if len(failures) < 3:
            failures.append(1)
            raise OperationalError("server closed the connection unexpectedly\nThis probably means ...")
        self.passes += 1
        return False

    monkeypatch.setattr(SchedulerLoop, "run_once", fails_three_times)
    monkeypatch.setattr(scheduler_loop, "ERROR_BACKOFF_MIN", 0.01)
    caplog.set_level(logging.INFO, logger="fetchml.scheduler.loop")

    asyncio.run(_run_until(SchedulerLoop(), passes=1))
    failed = [record for record in caplog.records if "scheduler pass failed" in record.getMessage()]
    assert [record.exc_info is not None for record in failed] == [True, False, False]
    assert "OperationalError: server closed the connection unexpectedly" in failed[1].getMessage()


def test_leaving_the_wake_group_on_a_silent_channel_layer_is_bounded(monkeypatch):
    monkeypatch.setattr(scheduler_loop, "LEAVE_GROUP_SECONDS", 0.2)

    class SilentLayer:
        async def group_discard(self, group, channel):
            await asyncio.Event().wait()  # never answers

    async def scenario() -> float:
        wake = _WakeListener()
        wake.layer, wake.channel = SilentLayer(), "specific.wake!1"
        started = time.monotonic()
        await asyncio.wait_for(wake.close(), timeout=WAIT)
        return time.monotonic() - started

    assert asyncio.run(scenario()) < 2
