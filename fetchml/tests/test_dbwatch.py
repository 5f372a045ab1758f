"""A serving process's waits on a frozen PostgreSQL server process end after the limit.

The server process is really stopped (SIGSTOP) while its host keeps acknowledging
packets, so no network time-out would ever fire.
"""

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from django.db import OperationalError, connection, transaction
from websockets.sync.client import connect

from conftest import requires_postgres
from fetchml import dbwatch
from fetchml.models import ApiKey
from fetchml.testing import LiveServer, backend_pid, database_url_for, frozen
from fetchml.tests.factories import ApiKeyFactory

LIMIT = 0.5
WAIT = 30.0

pytestmark = [requires_postgres, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def watchdog():
    dbwatch.unwatch()  # one a served application started in this process, with its own limit
    assert dbwatch.watch(LIMIT)
    yield
    dbwatch.unwatch()


@pytest.fixture
def own_thread():
    """Runs calls in a thread of its own: its own connection, closed afterwards."""
    with ThreadPoolExecutor(max_workers=1) as pool:

        def call(function: Callable[[], Any]) -> Any:
            return pool.submit(function).result(timeout=WAIT)

        yield call
        call(lambda: connection.close())


def _query() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        return cursor.fetchone()[0]


def test_a_statement_sent_to_a_frozen_server_process_fails_after_the_limit(watchdog, own_thread, freezable_database):
    pid = own_thread(backend_pid)
    started = time.monotonic()
    with frozen(pid), pytest.raises(OperationalError):
        own_thread(_query)
    assert time.monotonic() - started < LIMIT + 5


def test_the_next_statement_after_a_cut_runs_on_a_new_connection(watchdog, own_thread, freezable_database):
    pid = own_thread(backend_pid)
    with frozen(pid), pytest.raises(OperationalError):
        own_thread(_query)
    own_thread(lambda: connection.close_if_unusable_or_obsolete())  # what Django does between requests
    assert own_thread(backend_pid) != pid


def test_a_commit_sent_to_a_frozen_server_process_fails_after_the_limit(watchdog, freezable_database):
    # Whether the commit lands is unknown, as after any connection lost at commit: the server
    # process may read it from its socket when it resumes. The caller must not wait for good.
    key = ApiKeyFactory.create()
    updated, commit = threading.Event(), threading.Event()
    pid: list[int] = []

    def rename_then_commit() -> None:
        try:
            with transaction.atomic():
                pid.append(backend_pid())
                ApiKey.objects.filter(id=key.id).update(name="renamed")
                updated.set()
                assert commit.wait(WAIT)
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=1) as pool:
        renaming = pool.submit(rename_then_commit)
        assert updated.wait(WAIT)
        with frozen(pid[0]):
            started = time.monotonic()
            commit.set()
            with pytest.raises(OperationalError):
                renaming.result(timeout=WAIT)
            assert time.monotonic() - started < LIMIT + 5


def test_a_statement_answered_within_the_limit_is_left_alone(watchdog, own_thread):
    def slow_query() -> int:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_sleep(%s), pg_backend_pid()", [LIMIT / 5])
            return cursor.fetchone()[1]

    pid = own_thread(backend_pid)
    assert own_thread(slow_query) == pid


def test_an_idle_connection_is_never_cut(watchdog, own_thread):
    pid = own_thread(backend_pid)
    time.sleep(LIMIT * 4)  # idle, not waiting on the server: the watchdog must let it be
    assert own_thread(backend_pid) == pid


def _server_backends() -> list[int]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
        )
        return [row[0] for row in cursor.fetchall()]


def test_a_live_server_answers_again_when_the_database_process_behind_it_freezes(user, freezable_database):
    key = ApiKeyFactory.raw(user=user)
    env = {"FETCHML_DB_ANSWER_TIMEOUT_SECONDS": "1"}
    with (
        LiveServer(database_url=database_url_for(connection), env=env) as server,
        connect(f"ws://{server.host}:{server.port}/ws", additional_headers={"X-API-Key": key}) as ws,
    ):
        ws.send(json.dumps({"type": "subscribe", "task_id": str(uuid.uuid4())}))
        assert json.loads(ws.recv(timeout=WAIT))["code"] == "NOT_FOUND"  # the server's connection is open
        with contextlib.ExitStack() as stack:
            for pid in _server_backends():
                stack.enter_context(frozen(pid))
            ws.send(json.dumps({"type": "subscribe", "task_id": str(uuid.uuid4())}))
            # Answered on a new connection while the old one's process is still stopped.
            assert json.loads(ws.recv(timeout=WAIT))["code"] == "NOT_FOUND"
