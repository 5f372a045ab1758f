"""A local agent does not outlive the `manage.py serve` that started it: killed with kill -9, serve cannot
stop its agents, so each one, given `--parent-pid`, notices its parent is gone and drains as on SIGTERM."""

import asyncio
import contextlib
import os
import signal
import sqlite3
import sys
import time
import uuid
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from fetchml.tests.test_serve_command import WAIT, _Serve, submit_through
from scheduler.management.commands.worker import API_KEY_ENV
from scheduler.tests.agent_peer import API_KEY, MANAGE_PY, Peer, assign, gated, process_gone, python, run_async, until

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="watches processes through /proc (Linux)")

# Starts the agent (argv[2:]) with its own pid as --parent-pid, its log in argv[1]; prints the agent's pid.
PARENT = """\
import os, subprocess, sys
with open(sys.argv[1], "wb") as log:
    agent = subprocess.Popen([*sys.argv[2:], "--parent-pid", str(os.getpid())], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=log)
print(agent.pid, flush=True)
agent.wait()
"""


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def test_parent_pid_must_be_a_process_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(API_KEY_ENV, API_KEY)
    with pytest.raises(CommandError, match="--parent-pid: must be a process id"):
        call_command("worker", "--server", "http://127.0.0.1:9", "--parent-pid", "0")


def test_an_agent_whose_parent_dies_drains_finishes_its_run_and_exits(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    log = tmp_path / "worker.log"

    async def scenario() -> None:
        async with Peer() as peer:
            parent = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                PARENT,
                str(log),
                *(sys.executable, str(MANAGE_PY), "worker", "--server", f"http://127.0.0.1:{peer.port}"),
                *("--name", "child-box", "--workdir", str(tmp_path / "work"), "--no-artifacts"),
                env={**os.environ, API_KEY_ENV: API_KEY, "FETCHML_LOG_LEVEL": "INFO"},
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
            )
            agent = int(await asyncio.wait_for(parent.stdout.readline(), WAIT))
            try:
                message = assign(gated(gate))
                await peer.send(message)
                await peer.status(message["token"], "running")

                parent.kill()  # as `kill -9` of serve: the agent is handed to init
                await parent.wait()

                await peer.next(lambda m: m["type"] == "draining")
                assert f"(pid {parent.pid}) is gone: draining" in log.read_text()
                refused = assign(python("print('never')"))
                await peer.send(refused)
                await until(lambda: f"not taking task {refused['task_id']}" in log.read_text(), what="the refusal")
                assert not process_gone(agent)  # its run is still going: it waits for it

                gate.touch()
                final = await peer.final(message["token"])
                assert (final["status"], final["output"]) == ("completed", "done")
                await until(lambda: process_gone(agent), what="the agent to exit")
                assert "drained: every run finished and reported; exiting" in log.read_text()
                assert peer.about(refused["token"]) == []
            finally:
                _kill(agent)

    run_async(scenario())


@pytest.mark.e2e
def test_the_local_agent_of_a_serve_killed_with_kill_9_exits_and_the_next_serve_starts(tmp_path: Path) -> None:
    first = _Serve(tmp_path)
    agent = None
    second = None
    try:
        first.wait_for("connected to ws://")
        [agent] = first.agents()

        first.process.kill()
        first.process.wait(timeout=WAIT)

        # The agent's log still reaches the test: it writes to serve's output, which the test reads.
        first.wait_for(f"(pid {first.process.pid}) is gone: draining")
        deadline = time.monotonic() + WAIT
        while not process_gone(agent):
            assert time.monotonic() < deadline, "the agent of the killed serve is still running"
            time.sleep(0.05)

        # Not refused: the killed serve's lock went with it. (Its agent is let in once the server has
        # missed three heartbeats of the dead one's connection, as after any crash.)
        second = _Serve(tmp_path)
        second.wait_for("Health:")
        assert second.stop() == 0
    finally:
        if agent is not None:
            _kill(agent)
        first.stop()
        if second is not None:
            second.stop()


@pytest.mark.e2e
@pytest.mark.timeout(5 * WAIT)  # above its own waits, so that one of those fails first, with serve's log
def test_a_run_left_by_a_killed_serve_is_reported_to_the_next_serve_and_not_run_again(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    first = _Serve(tmp_path)
    second = None
    agents: list[int] = []
    try:
        first.wait_for("connected to ws://")
        task_id = submit_through(first, job_name="left", entrypoint=gated(gate))
        first.wait_for("started (token")
        agents = first.agents()

        first.process.kill()
        first.process.wait(timeout=WAIT)
        first.wait_for(f"(pid {first.process.pid}) is gone: draining")

        # The next serve, on the same address: its local agent waits for the one left running.
        second = _Serve(tmp_path, port=first.port)
        second.wait_for("another agent still runs in")
        gate.touch()
        # The left agent reports its run to the new server, then exits; the new one starts after it.
        first.wait_for("drained: every run finished and reported; exiting", timeout=3 * WAIT)
        second.wait_for("connected to ws://", timeout=3 * WAIT)

        with sqlite3.connect(tmp_path / "fetchml.sqlite3") as db:
            status, attempt, retries = db.execute(
                "SELECT status, attempt, retry_count FROM tasks_task WHERE id = ?", (uuid.UUID(task_id).hex,)
            ).fetchone()
        assert (status, attempt, retries) == ("completed", 1, 0)
        assert second.stop() == 0
    finally:
        for agent in agents:
            _kill(agent)
        first.stop()
        if second is not None:
            second.stop()
