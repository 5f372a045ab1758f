"""A small thread pool for the database work of async code on hot paths.

`database_sync_to_async` runs every call of a process in one thread, so the
calls of many WebSocket consumers queue behind each other. Calls made with
`in_pool` run on a few threads instead, each thread keeping its own
(persistent) database connection. A caller that needs its calls in order
awaits them one at a time.
"""

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from channels.db import DatabaseSyncToAsync
from django.db import connections

POOL_THREADS = 4
_pool = ThreadPoolExecutor(max_workers=POOL_THREADS, thread_name_prefix="db-pool")
_used = threading.Event()


def in_pool(function: Any) -> Any:
    """`function` as an awaitable run on the pool (with Django's connection housekeeping)."""
    _used.set()
    return DatabaseSyncToAsync(function, thread_sensitive=False, executor=_pool)


def close_pool_connections(timeout: float = 30.0) -> None:
    """Close the database connection each pool thread holds (before a test database is dropped).

    One call per thread: all of them wait at a barrier until every thread has
    one, so no thread takes two and none is missed.
    """
    if not _used.is_set():
        return
    barrier = threading.Barrier(POOL_THREADS, timeout=timeout)

    def close() -> None:
        barrier.wait()
        connections.close_all()

    for done in [_pool.submit(close) for _ in range(POOL_THREADS)]:
        done.result(timeout=timeout)
