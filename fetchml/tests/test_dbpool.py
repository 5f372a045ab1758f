"""The database thread pool of async hot paths: off the sync thread, bounded, its connections closable."""

import asyncio
import threading

import pytest
from django.db import connection

from conftest import requires_postgres
from fetchml.dbpool import POOL_THREADS, close_pool_connections, in_pool

pytestmark = pytest.mark.django_db(transaction=True)


def _thread_name_after_a_query() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return threading.current_thread().name


def test_calls_run_concurrently_on_a_bounded_set_of_pool_threads():
    async def scenario() -> list[str]:
        return await asyncio.gather(*(in_pool(_thread_name_after_a_query)() for _ in range(3 * POOL_THREADS)))

    names = asyncio.run(scenario())

    assert all(name.startswith("db-pool") for name in names)
    assert 1 <= len(set(names)) <= POOL_THREADS


def _on_every_pool_thread(function) -> list:
    """Run `function` once on each pool thread (a barrier keeps them all busy at once)."""
    gate = threading.Barrier(POOL_THREADS, timeout=10)

    def once() -> object:
        gate.wait()
        return function()

    async def scenario() -> list:
        return await asyncio.gather(*(in_pool(once)() for _ in range(POOL_THREADS)))

    return asyncio.run(scenario())


@requires_postgres
def test_closing_the_pool_connections_closes_each_pool_threads_connection():
    names = _on_every_pool_thread(_thread_name_after_a_query)
    assert len(set(names)) == POOL_THREADS

    close_pool_connections()

    assert _on_every_pool_thread(lambda: connection.connection is None) == [True] * POOL_THREADS
