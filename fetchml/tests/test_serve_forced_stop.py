"""The forced stop of a local agent (a second Ctrl-C of `manage.py serve`, or its drain running out): each
run gets SIGTERM and a grace to save its work (its cancel grace, capped), then SIGKILL; what it wrote is
stored as a cancelled run's files are, and it is reported `failed` (`worker_lost`), so that the server
records why the attempt ended and re-queues it."""

import asyncio
import os
import signal
import sqlite3
import time
import uuid
from pathlib import Path

import pytest

from fetchml.tests.test_serve_command import WAIT, _Serve, submit_through
from scheduler.agent.client import Agent
from scheduler.tests.agent_peer import Peer, agent_config, assign, process_gone, python, run_async

# A task that saves a checkpoint on SIGTERM and exits; `ready` once its handler is in place.
CHECKPOINTS_ON_SIGTERM = """\
import os, signal, sys, time
def on_term(*_):
    with open(os.path.join(os.environ["FETCHML_OUTPUT_DIR"], "checkpoint.txt"), "w") as out:
        out.write("step 7")
    print("checkpoint saved", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""
IGNORES_SIGTERM = """\
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
time.sleep(300)
"""


async def _started(peer: Peer, message: dict) -> None:
    """Until the run's process says it is ready (its SIGTERM handler in place)."""
    ready = {"stream": "stdout", "line": "ready"}
    await peer.send(message)
    await peer.next(lambda m: m["type"] == "log" and m["token"] == message["token"] and ready in m["lines"])


async def _agent_running(
    peer: Peer, tmp_path: Path, code: str, *, cancel_grace: float, **config: float
) -> tuple[Agent, asyncio.Task, dict]:
    """An agent (`config` its AgentConfig overrides) running `code` once it said it is ready: the
    agent, its `run()` and the run's assign."""
    agent = Agent(agent_config(peer.url, tmp_path, **config))
    serving = asyncio.create_task(agent.run())
    message = assign(python(code), cancel_grace_seconds=cancel_grace)
    await _started(peer, message)
    return agent, serving, message


def test_a_forced_stop_sends_the_run_sigterm_lets_it_save_its_work_and_reports_it_worker_lost(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Peer() as peer:
            agent, serving, message = await _agent_running(peer, tmp_path, CHECKPOINTS_ON_SIGTERM, cancel_grace=60)

            agent.drain()
            agent.shutdown()

            assert await asyncio.wait_for(serving, 15) == 0
            final = await peer.final(message["token"])
            assert (final["status"], final["failure_reason"], final["exit_code"]) == ("failed", "worker_lost", 0)
            assert final["error"].startswith("worker shut down: the run was sent SIGTERM")
            assert "checkpoint saved" in peer.log_lines(message["token"])
            assert final["output"] == "ready\ncheckpoint saved"

    run_async(scenario())


def test_a_forced_stop_kills_a_run_that_ignores_sigterm_once_the_capped_grace_is_over(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Peer() as peer:
            agent, serving, message = await _agent_running(
                peer, tmp_path, IGNORES_SIGTERM, cancel_grace=60, forced_stop_grace_seconds=0.5
            )

            began = time.monotonic()
            agent.shutdown()

            assert await asyncio.wait_for(serving, 15) == 0
            assert time.monotonic() - began >= 0.5
            final = await peer.final(message["token"])
            assert (final["status"], final["failure_reason"]) == ("failed", "worker_lost")
            assert final["exit_code"] == 128 + signal.SIGKILL
            assert final["error"].startswith(
                "worker shut down; did not stop within its 0.5 s grace after SIGTERM; killed by signal 9 (SIGKILL)"
            )

    run_async(scenario())


def test_a_second_forced_stop_kills_the_runs_at_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Peer() as peer:
            agent, serving, message = await _agent_running(
                peer, tmp_path, IGNORES_SIGTERM, cancel_grace=300, forced_stop_grace_seconds=300
            )

            agent.shutdown()
            agent.shutdown()  # a third Ctrl-C

            assert await asyncio.wait_for(serving, 15) == 0
            final = await peer.final(message["token"])
            assert (final["status"], final["failure_reason"]) == ("failed", "worker_lost")

    run_async(scenario())


def test_a_run_its_owner_cancels_during_a_forced_stop_is_reported_cancelled(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Peer() as peer:
            agent, serving, message = await _agent_running(
                peer, tmp_path, IGNORES_SIGTERM, cancel_grace=60, forced_stop_grace_seconds=0.5
            )

            agent.shutdown()
            await peer.send({"type": "cancel", "task_id": message["task_id"], "token": message["token"], "reason": "x"})

            assert await asyncio.wait_for(serving, 15) == 0
            assert (await peer.final(message["token"]))["status"] == "cancelled"

    run_async(scenario())


@pytest.mark.e2e
def test_a_second_ctrl_c_of_serve_lets_the_run_checkpoint_stores_it_and_requeues_the_task(tmp_path: Path) -> None:
    if not Path("/proc/self/stat").exists():
        pytest.skip("waits for signals to be taken through /proc (Linux)")
    serve = _Serve(tmp_path)
    try:
        serve.wait_for("connected to ws://")
        ready = tmp_path / "ready"
        code = CHECKPOINTS_ON_SIGTERM.replace('print("ready", flush=True)', f"open({str(ready)!r}, 'w').close()")
        task_id = submit_through(serve, job_name="checkpoints", entrypoint=python(code))
        deadline = time.monotonic() + WAIT
        while not ready.exists():  # its SIGTERM handler is in place
            assert time.monotonic() < deadline, "the task did not start"
            time.sleep(0.02)
        [agent] = serve.agents()

        serve.process.send_signal(signal.SIGTERM)
        serve.wait_for("Stopping: draining local workers")
        serve.process.send_signal(signal.SIGTERM)  # a second Ctrl-C

        serve.wait_for("shutting down: killing 1 run(s)")
        assert serve.process.wait(timeout=WAIT) == 0  # no third signal: that would kill the run at once
        assert process_gone(agent)
    finally:
        serve.stop()

    while not serve.lines.empty():
        serve.seen.append(serve.lines.get())
    log = "".join(serve.seen)
    assert "not uploaded" not in log
    assert "keeping its work directory" not in log
    with sqlite3.connect(tmp_path / "fetchml.sqlite3") as db:
        status, reason, error, retries = db.execute(
            "SELECT status, failure_reason, error, retry_count FROM tasks_task WHERE id = ?", (uuid.UUID(task_id).hex,)
        ).fetchone()
        stored = db.execute(
            "SELECT path FROM artifacts_artifact WHERE task_id = ? AND attempt = 1 AND complete",
            (uuid.UUID(task_id).hex,),
        ).fetchall()
    assert (status, reason, retries) == ("queued", "worker_lost", 1), log
    assert error.startswith("worker shut down: the run was sent SIGTERM, then SIGKILL after 10 s"), log
    assert {path for (path,) in stored} >= {"checkpoint.txt", "logs/stdout.log"}
    work = tmp_path / "work"
    assert not any(work.glob(f"*/{task_id}")), os.listdir(next(work.iterdir()))
