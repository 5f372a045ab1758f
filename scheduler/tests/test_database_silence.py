"""A scheduler whose database falls silent (its host gone, a partition) notices within a bound,
places work again once it answers, and stops on SIGTERM meanwhile; a server that cannot store a
worker's heartbeats sends it elsewhere before its lease runs out.

The silence is real: the scheduler runs in a network namespace and reaches PostgreSQL through
a gate whose replies a blackhole route makes vanish (`fetchml.testing.IsolatedNetwork`). Left to
the kernel, a query on such a connection waits about a quarter of an hour.
"""

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from django.conf import settings
from django.db import connection
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from conftest import requires_postgres
from fetchml.testing import LiveServer, ThreadedGate, database_url_for
from scheduler.agent import protocol
from scheduler.agent.capacity import Capacity
from scheduler.agent.protocol import LEASE_SHARE_TO_RECONNECT
from scheduler.consumers import CLOSE_RECONNECT
from scheduler.tests.agent_peer import run_async
from scheduler.tests.factories import assignments_of, queued_task, worker
from scheduler.tests.live_system import DEFAULT_ENV, wait_until, with_query

PASS_FAILED = "scheduler pass failed"

pytestmark = [requires_postgres, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def scheduler_behind(isolated_network):
    """Start `manage.py scheduler` in the namespace, its database reached through `gate_url`;
    yields a function doing that, which returns (process, output reader). Stopped after the test."""
    started: list[tuple[subprocess.Popen, object]] = []

    def start(gate_url: str) -> tuple[subprocess.Popen, object]:
        log = tempfile.TemporaryFile()  # noqa: SIM115 (closed below)
        env = {
            **os.environ,
            **DEFAULT_ENV,
            **isolated_network.PROCESS_ENV,
            "DATABASE_URL": with_query(gate_url, "connect_timeout", "2"),  # libpq's shortest
            "FETCHML_DB_NETWORK_TIMEOUT_SECONDS": "2",
            "FETCHML_WORKER_LEASE_SECONDS": "600",  # the worker rows here have no agent to heartbeat
        }
        command = isolated_network.command([sys.executable, "manage.py", "scheduler"])
        process = subprocess.Popen(command, cwd=settings.BASE_DIR, env=env, stdout=log, stderr=subprocess.STDOUT)
        started.append((process, log))

        def output() -> str:
            log.seek(0)
            return log.read().decode(errors="replace")

        return process, output

    yield start
    for process, log in started:
        process.kill()
        process.wait(timeout=10)
        log.close()


def test_a_scheduler_whose_database_falls_silent_fails_its_pass_within_a_bound_and_places_work_once_it_answers(
    isolated_network, scheduler_behind
):
    worker(batch_slots=2)
    first = queued_task()
    with ThreadedGate(database_url_for(connection), host=isolated_network.service_address) as gate:
        process, output = scheduler_behind(gate.url)
        wait_until(lambda: assignments_of(first), what="the first task to be placed")

        isolated_network.silence()
        silent_since = time.monotonic()
        second = queued_task()
        wait_until(lambda: PASS_FAILED in output(), timeout=60, what=f"'{PASS_FAILED}' in:\n{output()}")
        noticed_after = time.monotonic() - silent_since
        # The network bound (2 s) and a connect time-out (2 s), with room for a busy machine.
        assert noticed_after < 15, f"noticed after {noticed_after:.1f} s"
        assert not assignments_of(second)

        isolated_network.restore()
        wait_until(lambda: assignments_of(second), timeout=60, what=f"the second task to be placed:\n{output()}")
        assert process.poll() is None


def _unanswered_bytes_to(pid: int, port: int) -> bool:
    """Whether the network namespace of process `pid` holds a TCP connection to `port` with bytes
    sent and not acknowledged: a statement on its way to a database that does not answer."""
    for row in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = row.split()
        remote_port = int(fields[2].rsplit(":", 1)[1], 16)
        unacknowledged = int(fields[4].split(":")[0], 16)
        if remote_port == port and unacknowledged:
            return True
    return False


def test_a_scheduler_whose_database_is_silent_stops_on_sigterm(isolated_network, scheduler_behind):
    worker()
    task = queued_task()
    with ThreadedGate(database_url_for(connection), host=isolated_network.service_address) as gate:
        process, output = scheduler_behind(gate.url)
        wait_until(lambda: assignments_of(task), what="the task to be placed")
        isolated_network.silence()
        port = urlsplit(gate.url).port
        wait_until(
            lambda: _unanswered_bytes_to(process.pid, port), what=f"a statement to the silent database:\n{output()}"
        )
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the scheduler did not stop within 30 s:\n{output()}") from None
        assert code == 0, output()
        assert "scheduler loop stopped" in output()


def test_a_server_that_cannot_store_heartbeats_tells_its_worker_to_reconnect_before_the_lease_runs_out(
    isolated_network, worker_key
):
    # Long enough that heartbeats fail (each within 4.5 s: the 2 s network bound, a 2 s connect
    # time-out) and are answered `error` before a third of it has gone by.
    lease = 24.0
    env = {
        **isolated_network.PROCESS_ENV,
        "FETCHML_DB_NETWORK_TIMEOUT_SECONDS": "2",
        "FETCHML_WORKER_LEASE_SECONDS": str(lease),
    }
    with (
        ThreadedGate(database_url_for(connection), host=isolated_network.service_address) as gate,
        LiveServer(
            database_url=with_query(gate.url, "connect_timeout", "2"), env=env, network=isolated_network
        ) as server,
    ):
        code, after = run_async(_heartbeat_until_closed(server, worker_key, isolated_network), timeout=60)
        assert "no heartbeat stored for" in server.output()
        # Each failure said in a line, not a stack trace per message of every worker.
        assert "database unavailable" in server.output() and "Traceback" not in server.output()
    assert code == CLOSE_RECONNECT
    # Told at the first heartbeat to fail once none had been stored for a third of the lease: well
    # before the lease ran out.
    assert lease * LEASE_SHARE_TO_RECONNECT <= after < lease, f"told after {after:.1f} s"


async def _heartbeat_until_closed(server: LiveServer, key: str, network) -> tuple[int, float]:
    """Say hello, then heartbeat every 0.2 s; silence the database after the welcome. Returns the
    close code, and how long after the silence the connection was closed."""
    url = f"ws://{server.host}:{server.port}/ws/worker"
    async with connect(url, additional_headers={"X-API-Key": key}, ping_interval=None) as ws:
        capacity = Capacity(cpu_cores=2, memory_gb=2, gpu_count=0, gpu_type="", batch_slots=1, service_slots=0)
        await ws.send(
            protocol.encode(
                protocol.hello(
                    name="cut-off", instance="1", hostname="", capabilities=capacity.as_capabilities(), running=[]
                )
            )
        )
        assert protocol.decode(await ws.recv())["type"] == "welcome"
        network.silence()
        silent_since = time.monotonic()

        async def heartbeats() -> None:
            while True:
                await ws.send(protocol.encode(protocol.heartbeat(running=[])))
                await asyncio.sleep(0.2)

        beating = asyncio.ensure_future(heartbeats())
        try:
            async with asyncio.timeout(45):
                async for _ in ws:  # `error` answers to the heartbeats that failed
                    pass
        except ConnectionClosed:
            pass
        finally:
            beating.cancel()
        code = ws.close_code
    return code, time.monotonic() - silent_since
