"""A bound on each wait of a serving process on PostgreSQL.

A PostgreSQL server process frozen with its host up (stopped, stuck in the
kernel) answers nothing, yet its host acknowledges every packet, so no network
time-out fires: a statement or commit sent to it waits for good. In a serving
process that wait blocks Django's one thread for synchronous code, or one of
the worker consumers' pool threads, and every request or report queued behind
it. Once `watch()` runs, each statement and each commit or rollback on a
connection of `fetchml.backends.postgresql` is timed; one still unanswered
after the limit has its connection's socket shut down (`cut_connection`), so it
fails like any lost connection and the next use reconnects.
"""

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from django.db.backends.base.base import BaseDatabaseWrapper

from fetchml.dbsocket import cut_connection

logger = logging.getLogger("fetchml.db")

_lock = threading.Lock()
# id(wrapper) -> (wrapper, monotonic time its wait began); only while a watchdog runs.
_waiting: dict[int, tuple[BaseDatabaseWrapper, float]] = {}
_watchdog: "_Watchdog | None" = None


@contextlib.contextmanager
def waiting_on(wrapper: BaseDatabaseWrapper) -> Iterator[None]:
    """Time the wait of `wrapper`'s thread on the server for the watchdog, when one runs."""
    if _watchdog is None:
        yield
        return
    key = id(wrapper)
    with _lock:
        mine = key not in _waiting
        if mine:
            _waiting[key] = (wrapper, time.monotonic())
    try:
        yield
    finally:
        if mine:
            with _lock:
                _waiting.pop(key, None)


def watched_execute(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: dict) -> Any:
    """An execute wrapper (`connection.execute_wrappers`) timing each statement."""
    with waiting_on(context["connection"]):
        return execute(sql, params, many, context)


class _Watchdog(threading.Thread):
    def __init__(self, limit_seconds: float) -> None:
        super().__init__(name="db-watchdog", daemon=True)
        self.limit_seconds = limit_seconds
        self.stopped = threading.Event()

    def run(self) -> None:
        period = min(1.0, self.limit_seconds / 4)
        while not self.stopped.wait(period):
            self.cut_overdue()

    def cut_overdue(self) -> None:
        now = time.monotonic()
        # Under the lock, so a wait that ends meanwhile cannot leave its connection to another use.
        with _lock:
            for key, (wrapper, since) in list(_waiting.items()):
                if now - since < self.limit_seconds:
                    continue
                del _waiting[key]
                logger.error(
                    "a database call has waited %.1f s on the server (frozen?); cutting its connection",
                    now - since,
                )
                cut_connection(wrapper)


def watch(limit_seconds: float) -> bool:
    """Start the watchdog of this process (idempotent); whether one runs. 0 (or less) starts none."""
    global _watchdog
    with _lock:
        if _watchdog is None and limit_seconds > 0:
            _watchdog = _Watchdog(limit_seconds)
            _watchdog.start()
        return _watchdog is not None


def unwatch() -> None:
    """Stop the watchdog (tests)."""
    global _watchdog
    with _lock:
        watchdog, _watchdog = _watchdog, None
        _waiting.clear()
    if watchdog is not None:
        watchdog.stopped.set()
        watchdog.join(timeout=5)
