"""The scheduler loop: woken by the channel layer, polling only as a safety net.

`SchedulerLoop.run()` is a coroutine so it can live in its own process
(`manage.py scheduler`) or inside daphne's event loop (`manage.py serve`). The
database work of a pass runs in one dedicated thread (so its connection is
reused and can be closed there), never on the event loop. It installs no signal
handlers: the caller owns the process and sets the stop event.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from functools import partial
from typing import Any

from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.db import close_old_connections, connections
from django.utils import timezone

from fetchml import events
from fetchml.aio import STOP_READ_SECONDS, cancel_and_wait
from fetchml.conf import app_settings
from fetchml.dbsocket import cut_connection
from fetchml.logformat import brief
from jupyter.services import scheduler_pass as jupyter_pass
from scheduler import selectors
from scheduler.assigns import assign_messages, assign_notice
from scheduler.dispatch import any_task_may_starve, dispatch_round
from scheduler.reservations import reservations_tick
from scheduler.services import DatabaseStalled, enforce_timeouts, expire_leases
from tasks.services import idempotency_prune

logger = logging.getLogger("fetchml.scheduler.loop")

ERROR_BACKOFF_MIN = 0.5
# Short: once the database or the channel layer is back, idle workers wait at most this long for work
# (a wake-up does not cut a back-off short), and a failed attempt costs one connection attempt.
ERROR_BACKOFF_MAX = 5.0
GROUP_REFRESH_SECONDS = 60.0
# Housekeeping that need not run every pass: expired Idempotency-Key records, at most a batch a
# pass (a backlog, after days without a scheduler, is worked off pass by pass, each one short).
HOUSEKEEPING_SECONDS = 600.0
PRUNE_BATCH = 10_000
# Leases, time-outs, reservations, Jupyter services, re-sends: checked at most this often.
MAINTENANCE_SECONDS = 1.0
# Asked to stop during a pass, the loop lets the pass finish for this long, then cuts its database
# connection: a database that stopped answering must not hold up a SIGTERM.
STOP_PASS_GRACE_SECONDS = 2.0
# A pass whose statements have taken this share of a lease (at least STALLED_FLOOR_SECONDS) waited on
# a database that stopped answering, everyone's heartbeats with it: what its lease and time-out
# checks decided is rolled back, and the pass fails as after an outage (`pass_failed`). Freezes
# shorter than that cannot cost a worker its lease (its heartbeats, every few seconds, resume).
STALLED_SHARE_OF_LEASE = 1 / 3
STALLED_FLOOR_SECONDS = 1.0
# Leaving the wake group at exit, at most this long: a silent channel layer must not hold up a
# SIGTERM, and the membership expires by itself.
LEAVE_GROUP_SECONDS = 2.0
# How long the loop waits, at start, to be a member of the wake group before its first pass: the
# pass reads the queue after the membership, so that no wake sent after its read goes unheard.
# A channel layer out of reach is not waited for longer: the interval polls meanwhile.
JOIN_BEFORE_FIRST_PASS_SECONDS = 2.0


class SchedulerLoop:
    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scheduler")
        self._resent: dict[Any, float] = {}  # assignment id -> monotonic time of the last re-send
        self.passes = 0  # completed passes, for operators and tests
        self._housekept_at = float("-inf")  # monotonic time of the last housekeeping
        self._maintained_at = float("-inf")  # monotonic time of the last maintenance pass
        self.wake: _WakeListener | None = None  # while running
        self._pass_started_at = float("-inf")  # monotonic time the last pass started
        self._pass_connection: Any = None  # the database connection of the pass thread, once it ran
        self._last_placed = 0  # tasks the last pass placed
        # Whether the last pass left runnable tasks behind: only then is freed capacity news.
        self.backlog = True
        self.starvation_possible = True  # as of the last maintenance pass
        # Monotonic start of the first pass of the current run of passes that succeeded (None right
        # after a failure, and before the first pass: a scheduler started during or after a
        # database outage, every scheduler having died in it, say, cannot know the workers were
        # out of reach of the database too, so it gives them a lease as after its own failure).
        self._succeeding_since: float | None = None

    # --- one pass (sync) ---------------------------------------------------------

    def run_once(self, *, maintenance: bool = True) -> bool:
        """Dispatch, after (with `maintenance`) expiring leases, enforcing time-outs, ending and
        idle-stopping Jupyter services, re-sending unacked assigns and, now and then, pruning
        expired idempotency records.

        Returns whether the pass changed anything.
        """
        started = time.monotonic()
        self._pass_connection = connections["default"]
        close_old_connections()
        worked = False
        if maintenance:
            self._maintained_at = time.monotonic()
            if self._heard_for_a_lease():
                stalled = partial(self._stalled, since=started)
                worked = expire_leases(stalled=stalled) > 0
                # The agent's final report gets its lease too.
                worked = enforce_timeouts(stalled=stalled) > 0 or worked
            worked = reservations_tick() > 0 or worked  # expired reservations release their capacity
            worked = jupyter_pass() > 0 or worked  # after the leases: services of lost workers end in `error`
            self._resend_unacked()
            self._housekeeping()
            # Starvation is a matter of minutes: looked for once a maintenance pass, not every pass.
            self.starvation_possible = any_task_may_starve(timezone.now())
        placed = self._last_placed = dispatch_round(starvation_possible=self.starvation_possible)
        self.backlog = selectors.has_runnable_tasks()
        self.passes += 1
        if self._succeeding_since is None:
            self._succeeding_since = started
        return placed > 0 or worked

    @staticmethod
    def _stalled(*, since: float) -> bool:
        limit = max(app_settings.WORKER_LEASE_SECONDS * STALLED_SHARE_OF_LEASE, STALLED_FLOOR_SECONDS)
        return time.monotonic() - since > limit

    def pass_failed(self) -> None:
        """A pass failed (the database out of reach, most likely): `run` tells it here."""
        self._succeeding_since = None

    def _heard_for_a_lease(self) -> bool:
        """Whether passes have succeeded for a whole lease. While the database was out of reach no
        heartbeat or report could be stored either: a worker silent through an outage is not
        thereby lost, nor is a run whose end it could not report overdue, and runs (hours of
        training, say) are not taken away until their workers have had a lease to be heard again.
        Counted from the first pass that succeeded, not from the last that failed: the loop's own
        back-off after failures (up to ERROR_BACKOFF_MAX) must not use up the workers' lease."""
        since = self._succeeding_since
        return since is not None and time.monotonic() - since >= app_settings.WORKER_LEASE_SECONDS

    def _maintenance_due(self) -> bool:
        # Wake-ups (a submitted task, a freed slot) come far more often than leases or
        # time-outs need checking: between maintenance passes a wake-up only dispatches.
        every = min(MAINTENANCE_SECONDS, app_settings.SCHEDULER_INTERVAL)
        return time.monotonic() - self._maintained_at >= every

    def _housekeeping(self) -> None:
        if time.monotonic() - self._housekept_at < HOUSEKEEPING_SECONDS:
            return
        self._housekept_at = time.monotonic()
        pruned = idempotency_prune(limit=PRUNE_BATCH)
        if pruned:
            logger.info("pruned %d expired idempotency record(s)", pruned)
        if pruned >= PRUNE_BATCH:
            self._housekept_at = float("-inf")  # more may be left: the next maintenance pass goes on

    def _resend_unacked(self) -> int:
        """At-least-once delivery of `assign`: re-send what the agent has not acknowledged."""
        every = app_settings.ASSIGN_RESEND_SECONDS
        pending = selectors.unacked_assignments(older_than=timezone.now() - timedelta(seconds=every))
        clock = time.monotonic()
        waiting = {assignment_id for assignment_id, _ in pending}
        self._resent = {key: sent for key, sent in self._resent.items() if key in waiting}
        due: dict[Any, list[str]] = {}
        for assignment_id, worker_id in pending:
            if clock - self._resent.get(assignment_id, float("-inf")) < every:
                continue
            due.setdefault(worker_id, []).append(str(assignment_id))
            self._resent[assignment_id] = clock
        notices = [
            (worker_id, assign_messages(assignment_ids=ids, worker_id=worker_id)) for worker_id, ids in due.items()
        ]
        events.send_batch_now([assign_notice(worker_id, messages) for worker_id, messages in notices if messages])
        return sum(len(messages) for _, messages in notices)

    def _wanted(self, message: dict[str, Any]) -> bool:
        """A wake-up for freed capacity is news only while tasks wait (a pass decides it again)."""
        return self.backlog or message.get("reason") not in events.CAPACITY_WAKE_REASONS

    def _close_connection(self) -> None:
        connections.close_all()

    # --- the loop (async) ----------------------------------------------------------

    async def _space_passes(self, stop: asyncio.Event) -> None:
        """Under load, let freed capacity and new tasks gather for a moment before the next pass.

        A pass costs about the same for one task as for dozens; passes back to
        back, each placing the one slot freed meanwhile, would spend the
        scheduler's CPU on overhead. So passes start at most one gap apart. The
        gap counts from the last pass's start, not its end: a pass that took
        longer than the gap has let capacity gather already, and waiting on
        top of it would leave the scheduler idle while workers wait (under
        load a pass placing a few dozen tasks takes about two gaps). An idle
        scheduler (last pass longer ago than the gap), one whose last pass left
        nothing runnable (new work on an empty queue is placed at once) and
        one that just placed a full batch go at once.
        """
        if self._last_placed >= app_settings.SCHEDULER_BATCH_SIZE or not self.backlog:
            return
        remaining = self._pass_started_at + app_settings.SCHEDULER_PASS_GAP_SECONDS - time.monotonic()
        if remaining > 0:
            await _wait(stop, remaining)

    def _pass_again(self, worked: bool) -> bool:
        """Whether to pass again at once instead of waiting for a wake-up: when the pass changed
        something and left runnable tasks (some may fit what is left, or what it freed). A pass that
        emptied the queue waits: new work wakes the loop, and a pass for nothing would hold up the
        next submission's."""
        return worked and self.backlog

    async def _in_thread(self, function) -> Any:
        return await sync_to_async(function, thread_sensitive=False, executor=self._executor)()

    async def _bounded_pass(self, stop: asyncio.Event) -> bool:
        """One pass in the loop's thread, its wait on the database bounded.

        A pass still running after SCHEDULER_PASS_TIMEOUT_SECONDS, or STOP_PASS_GRACE_SECONDS
        after `stop`, waits on a database that stopped answering with its connection open (a
        frozen server process): the connection is cut, the pass fails as after any lost connection,
        and the server rolls back what it had not committed.
        """
        started = time.monotonic()
        deadline = started + app_settings.SCHEDULER_PASS_TIMEOUT_SECONDS
        passing = asyncio.ensure_future(self._in_thread(partial(self.run_once, maintenance=self._maintenance_due())))
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({passing, stopping}, timeout=deadline - started, return_when=asyncio.FIRST_COMPLETED)
            if not passing.done() and stop.is_set():
                grace = min(STOP_PASS_GRACE_SECONDS, deadline - time.monotonic())
                await asyncio.wait({passing}, timeout=max(grace, 0.0))
        finally:
            stopping.cancel()
        if not passing.done() and self._pass_connection is not None:
            waited = time.monotonic() - started
            logger.error("scheduler pass still running after %.1f s; cutting its database connection", waited)
            cut_connection(self._pass_connection)
        return await passing

    async def run(self, stop: asyncio.Event) -> None:
        """Run passes until `stop` is set: at once when woken, else every SCHEDULER_INTERVAL seconds."""
        logger.info("scheduler loop started")
        wake = self.wake = _WakeListener(wanted=self._wanted)
        await wake.joined_within(JOIN_BEFORE_FIRST_PASS_SECONDS)
        backoff = ERROR_BACKOFF_MIN
        failing = False  # the last pass failed: a failure in a row is one line, not a traceback
        try:
            while not stop.is_set():
                await self._space_passes(stop)
                self._pass_started_at = time.monotonic()
                try:
                    worked = await self._bounded_pass(stop)
                    backoff, failing = ERROR_BACKOFF_MIN, False
                except Exception as exc:
                    if isinstance(exc, DatabaseStalled):
                        logger.warning("scheduler pass: %s; retrying in %.1f s", exc, backoff)
                    elif failing:
                        logger.warning("scheduler pass failed again (%s); retrying in %.1f s", brief(exc), backoff)
                    else:
                        logger.exception("scheduler pass failed; retrying in %.1f s", backoff)
                    failing = True
                    self.pass_failed()
                    await self._in_thread(self._close_connection)
                    await _wait(stop, backoff)
                    backoff = min(backoff * 2, ERROR_BACKOFF_MAX)
                    continue
                if self._pass_again(worked):
                    await asyncio.sleep(0)  # let others run first
                    continue
                await wake.wait(stop, app_settings.SCHEDULER_INTERVAL)
        finally:
            await wake.close()
            await self._in_thread(self._close_connection)
            self._executor.shutdown(wait=False)
            logger.info("scheduler loop stopped")


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


class _WakeListener:
    """Membership of `scheduler.wake` on the channel layer, surviving layer outages.

    A background task receives the wake messages and sets one flag: any number
    of them arriving during a pass cost one more pass, not one each; a message
    `wanted` declines (freed capacity with nothing waiting) sets nothing.
    """

    def __init__(self, wanted: Callable[[dict[str, Any]], bool] = lambda message: True) -> None:
        self.wanted = wanted
        self.layer = get_channel_layer()
        self.channel: str | None = None
        self.joined_at = 0.0
        self.woken = asyncio.Event()
        self.received = 0  # wake messages so far, for operators and tests
        self.declined = 0  # of which `wanted` declined
        self.listening: asyncio.Task | None = None
        self.joined = asyncio.Event()  # a member of the group, once at least

    def _start(self) -> None:
        if self.layer is not None and (self.listening is None or self.listening.done()):
            self.listening = asyncio.ensure_future(self._listen())

    async def joined_within(self, timeout: float) -> None:
        """Start listening, and return once a member of the group, or after `timeout` seconds."""
        self._start()
        if self.layer is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.joined.wait(), timeout)

    async def wait(self, stop: asyncio.Event, timeout: float) -> None:
        """Return once woken since the last return, on `stop`, or after `timeout` seconds."""
        self._start()
        waits = {asyncio.ensure_future(self.woken.wait()), asyncio.ensure_future(stop.wait())}
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
        self.woken.clear()

    async def _join(self) -> None:
        if self.channel is None:
            self.channel = await self.layer.new_channel()
        # Re-joined periodically: group membership expires on the Redis layer.
        if time.monotonic() - self.joined_at > GROUP_REFRESH_SECONDS:
            await self.layer.group_add(events.WAKE_GROUP, self.channel)
            self.joined_at = time.monotonic()
            self.joined.set()

    async def _listen(self) -> None:
        receiving: asyncio.Future | None = None
        backoff = ERROR_BACKOFF_MIN
        try:
            while True:
                try:
                    await self._join()
                    if receiving is None:
                        receiving = asyncio.ensure_future(self.layer.receive(self.channel))
                    # Bounded, so that the membership is refreshed while no wake comes.
                    done, _ = await asyncio.wait({receiving}, timeout=GROUP_REFRESH_SECONDS / 2)
                    if receiving in done:
                        received, receiving = receiving, None
                        message = received.result()
                        logger.debug("woken: %s", message.get("reason", message.get("type")))
                        self.received += 1
                        if self.wanted(message):
                            self.woken.set()
                        else:
                            self.declined += 1
                        backoff = ERROR_BACKOFF_MIN
                except Exception:
                    # Redis down or the like: the interval poll carries on until it is back.
                    logger.warning("channel layer unavailable; retrying in %.1f s", backoff, exc_info=True)
                    receiving, self.channel, self.joined_at = None, None, 0.0
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, ERROR_BACKOFF_MAX)
        finally:
            if receiving is not None:
                await cancel_and_wait(receiving)

    async def close(self) -> None:
        if self.listening is not None:
            # Cancelled once (its own clean-up re-cancels the read it has out), waited for boundedly.
            self.listening.cancel()
            await asyncio.wait({self.listening}, timeout=STOP_READ_SECONDS + 1)
        if self.layer is not None and self.channel is not None:
            try:
                await asyncio.wait_for(self.layer.group_discard(events.WAKE_GROUP, self.channel), LEAVE_GROUP_SECONDS)
            except Exception as exc:  # its membership expires by itself
                logger.warning(
                    "could not leave %s (%s); its membership expires by itself", events.WAKE_GROUP, brief(exc)
                )
