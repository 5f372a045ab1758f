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


def _sessions_of_this_database() -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return cursor.fetchone()[0]


@requires_postgres
def test_closing_the_pool_connections_ends_every_pool_threads_session():
    gate = threading.Barrier(POOL_THREADS, timeout=10)

    def hold_a_connection() -> None:
        gate.wait()  # all threads busy at once: each opens its own connection
        _thread_name_after_a_query()

    async def scenario() -> None:
        await asyncio.gather(*(in_pool(hold_a_connection)() for _ in range(POOL_THREADS)))

    before = _sessions_of_this_database()
    asyncio.run(scenario())
    assert _sessions_of_this_database() >= before + POOL_THREADS

    close_pool_connections()

    assert _sessions_of_this_database() == before
