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
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.db import close_old_connections, connections
from django.utils import timezone

from fetchml import events
from fetchml.conf import app_settings
from jupyter.services import scheduler_pass as jupyter_pass
from scheduler import selectors
from scheduler.dispatch import dispatch_round
from scheduler.reservations import reservations_tick
from scheduler.services import enforce_timeouts, expire_leases
from tasks.services import idempotency_prune

logger = logging.getLogger("fetchml.scheduler.loop")

ERROR_BACKOFF_MIN = 0.5
ERROR_BACKOFF_MAX = 30.0
GROUP_REFRESH_SECONDS = 60.0
# Housekeeping that need not run every pass: expired Idempotency-Key records.
HOUSEKEEPING_SECONDS = 600.0


class SchedulerLoop:
    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scheduler")
        self._resent: dict[Any, float] = {}  # assignment id -> monotonic time of the last re-send
        self.passes = 0  # completed passes, for operators and tests
        self._housekept_at = float("-inf")  # monotonic time of the last housekeeping

    # --- one pass (sync) ---------------------------------------------------------

    def run_once(self) -> bool:
        """Expire leases, enforce time-outs, end/idle-stop Jupyter services, re-send unacked assigns, dispatch,
        and now and then prune expired idempotency records.

        Returns whether the pass changed anything.
        """
        close_old_connections()
        worked = expire_leases() > 0
        worked = enforce_timeouts() > 0 or worked
        worked = reservations_tick() > 0 or worked  # expired reservations release their capacity
        worked = jupyter_pass() > 0 or worked  # after the leases: services of lost workers end in `error`
        self._resend_unacked()
        placed = dispatch_round()
        self._housekeeping()
        self.passes += 1
        return placed > 0 or worked

    def _housekeeping(self) -> None:
        if time.monotonic() - self._housekept_at < HOUSEKEEPING_SECONDS:
            return
        self._housekept_at = time.monotonic()
        pruned = idempotency_prune()
        if pruned:
            logger.info("pruned %d expired idempotency record(s)", pruned)

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
        events.send_batch_now(
            [
                ([events.worker_group(worker_id)], {"type": "worker.assign", "assignment_ids": ids})
                for worker_id, ids in due.items()
            ]
        )
        return sum(len(ids) for ids in due.values())

    def _close_connection(self) -> None:
        connections.close_all()

    # --- the loop (async) ----------------------------------------------------------

    async def _in_thread(self, function) -> Any:
        return await sync_to_async(function, thread_sensitive=False, executor=self._executor)()

    async def run(self, stop: asyncio.Event) -> None:
        """Run passes until `stop` is set: at once when woken, else every SCHEDULER_INTERVAL seconds."""
        logger.info("scheduler loop started")
        wake = _WakeListener()
        backoff = ERROR_BACKOFF_MIN
        try:
            while not stop.is_set():
                try:
                    worked = await self._in_thread(self.run_once)
                    backoff = ERROR_BACKOFF_MIN
                except Exception:
                    logger.exception("scheduler pass failed; retrying in %.1f s", backoff)
                    await self._in_thread(self._close_connection)
                    await _wait(stop, backoff)
                    backoff = min(backoff * 2, ERROR_BACKOFF_MAX)
                    continue
                if worked:
                    await asyncio.sleep(0)  # more may be waiting: go again, but let others run
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
    """Membership of `scheduler.wake` on the channel layer, surviving layer outages."""

    def __init__(self) -> None:
        self.layer = get_channel_layer()
        self.channel: str | None = None
        self.joined_at = 0.0
        self.receiving: asyncio.Task | None = None

    async def _join(self) -> None:
        if self.channel is None:
            self.channel = await self.layer.new_channel()
        # Re-joined periodically: group membership expires on the Redis layer.
        if time.monotonic() - self.joined_at > GROUP_REFRESH_SECONDS:
            await self.layer.group_add(events.WAKE_GROUP, self.channel)
            self.joined_at = time.monotonic()

    async def wait(self, stop: asyncio.Event, timeout: float) -> None:
        """Return on a wake message, on `stop`, or after `timeout` seconds."""
        if self.layer is None:
            await _wait(stop, timeout)
            return
        try:
            await self._join()
            if self.receiving is None:
                self.receiving = asyncio.ensure_future(self.layer.receive(self.channel))
            stopping = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait(
                {self.receiving, stopping}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            stopping.cancel()
            if self.receiving in done:
                receiving, self.receiving = self.receiving, None
                message = receiving.result()
                logger.debug("woken: %s", message.get("reason", message.get("type")))
        except Exception:
            # Redis down or the like: the interval poll carries on until it is back.
            logger.warning("channel layer unavailable; polling every %.1f s", timeout, exc_info=True)
            self.receiving, self.channel, self.joined_at = None, None, 0.0
            await _wait(stop, timeout)

    async def close(self) -> None:
        if self.receiving is not None:
            self.receiving.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.receiving
        if self.layer is not None and self.channel is not None:
            try:
                await self.layer.group_discard(events.WAKE_GROUP, self.channel)
            except Exception:
                logger.warning("could not leave %s", events.WAKE_GROUP, exc_info=True)
