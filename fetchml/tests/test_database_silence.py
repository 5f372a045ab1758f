"""A database that stops answering costs a bounded wait, not a hung process.

The network falls silent (its host died, a partition: packets vanish without a reset) or a
process holding a transaction freezes: each is made real here, the first with a blackhole route
in a network namespace, the second with SIGSTOP.
"""

import http.client
import json
import os
import subprocess
import sys
import time

import pytest
from django.conf import settings
from django.db import DatabaseError, connection, transaction

from conftest import requires_postgres
from fetchml.env import bound_postgres_waits
from fetchml.testing import LiveServer, ThreadedGate, database_url_for, first_line
from fetchml.tests.factories import ApiKeyFactory
from scheduler.models import Worker
from scheduler.tests.factories import WorkerFactory
from scheduler.tests.live_system import wait_until, with_query

# What the processes under test are given: a short network bound, and libpq's shortest connect time-out.
NETWORK_SECONDS = 2
SHORT_WAITS = {
    "FETCHML_DB_NETWORK_TIMEOUT_SECONDS": str(NETWORK_SECONDS),
    "FETCHML_DB_STALLED_TRANSACTION_SECONDS": "1",
}


def test_a_connection_bounds_its_waits_on_a_silent_network_and_on_a_stalled_transaction():
    options: dict = {}
    bound_postgres_waits(options, network_seconds=15, stalled_transaction_seconds=15)
    assert options == {
        "keepalives": "1",
        "keepalives_idle": "5",
        "keepalives_interval": "2",
        "keepalives_count": "5",
        "tcp_user_timeout": "15000",
        "options": "-c idle_in_transaction_session_timeout=15000",
    }


def test_bounds_the_database_url_gives_are_kept():
    options = {"tcp_user_timeout": "60000", "options": "-c idle_in_transaction_session_timeout=5000"}
    bound_postgres_waits(options, network_seconds=15, stalled_transaction_seconds=15)
    assert options["tcp_user_timeout"] == "60000"
    assert options["options"] == "-c idle_in_transaction_session_timeout=5000"


def test_other_server_options_of_the_database_url_are_kept_beside_the_bound():
    options = {"options": "-c search_path=fetchml"}
    bound_postgres_waits(options, network_seconds=15, stalled_transaction_seconds=15)
    assert options["options"] == "-c search_path=fetchml -c idle_in_transaction_session_timeout=15000"


def test_a_stalled_transaction_bound_of_zero_sets_none():
    options: dict = {}
    bound_postgres_waits(options, network_seconds=15, stalled_transaction_seconds=0)
    assert "options" not in options


HOLD_A_WORKER_LOCK_AND_FREEZE = """
import os, signal, sys
import django
django.setup()
from django.db import transaction
from scheduler.models import Worker
with transaction.atomic():
    Worker.objects.select_for_update().get(id=sys.argv[1])
    print("locked", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
"""


@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_a_process_frozen_inside_a_transaction_loses_its_row_locks_to_the_others():
    worker = WorkerFactory()
    env = {**os.environ, "DATABASE_URL": database_url_for(connection), **SHORT_WAITS}
    with subprocess.Popen(
        [sys.executable, "-c", HOLD_A_WORKER_LOCK_AND_FREEZE, str(worker.id)],
        cwd=settings.BASE_DIR,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as frozen:
        try:
            assert first_line(frozen.stdout, timeout=30, what="the lock holder").strip() == "locked"
            wait_until(lambda: _stopped(frozen.pid), timeout=10, what="the lock holder to freeze")
            # While it holds the lock, a heartbeat's write would wait on it; once the server ends
            # the frozen session, the lock is free for the others.
            wait_until(lambda: _lock_free(worker.id), timeout=10, what="the frozen holder's lock to be released")
        finally:
            frozen.kill()
            frozen.wait(timeout=10)


@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_an_api_request_while_the_database_is_silent_answers_service_unavailable_in_bounded_time(
    isolated_network, user
):
    key = ApiKeyFactory.raw(user=user, role="user")
    database_url = with_query(database_url_for(connection), "connect_timeout", "2")
    env = isolated_network.PROCESS_ENV | SHORT_WAITS
    with (
        ThreadedGate(database_url, host=isolated_network.service_address) as gate,
        LiveServer(database_url=gate.url, env=env, network=isolated_network) as server,
    ):
        first = _get(server, "/v1/tasks", key)
        assert first[0] == 200, first
        isolated_network.silence()
        started = time.monotonic()
        status, body, headers = _get(server, "/v1/tasks", key, timeout=60)
        waited = time.monotonic() - started
        assert (status, body["code"], headers["Retry-After"]) == (503, "SERVICE_UNAVAILABLE", "1"), body
        # Under ASGI a request opens its own connection: it waits out the connect time-out (libpq's
        # shortest, 2 s; SYNs go unanswered), with room for a busy machine.
        assert waited < 20, f"answered after {waited:.1f} s"
        isolated_network.restore()
        wait_until(lambda: _get(server, "/v1/tasks", key)[0] == 200, timeout=30, what="the API to answer again")


def _get(server: LiveServer, path: str, key: str, *, timeout: float = 10) -> tuple[int, dict, dict]:
    client = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
    try:
        client.request("GET", path, headers={"X-API-Key": key})
        response = client.getresponse()
        return response.status, json.loads(response.read() or b"{}"), dict(response.getheaders())
    finally:
        client.close()


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] == "T"


def _lock_free(worker_id) -> bool:
    try:
        with transaction.atomic():
            Worker.objects.select_for_update(nowait=True).get(id=worker_id)
    except DatabaseError:
        return False
    return True
