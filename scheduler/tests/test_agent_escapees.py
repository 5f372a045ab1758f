"""A process a run started that left the run's process group (``setsid``) does not outlive the run:
real runs, their escapees looked for in /proc by their environment."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scheduler.agent import orphans
from scheduler.tests.agent_peer import Peer, assign, process_gone, python, run_async, running_agent
from scheduler.tests.live_system import wait_until

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="looks for processes in /proc")

# Starts a process in a session of its own (it keeps the run's stdout and stderr), prints its pid, exits.
LEAVES_AN_ESCAPEE = "import subprocess\nprint(subprocess.Popen(['sleep', '1000'], start_new_session=True).pid)"


def _run_leaving_an_escapee(work_root: Path) -> tuple[dict[str, Any], int]:
    """The final status of a run that left an escapee, and the escapee's pid."""

    async def scenario() -> dict[str, Any]:
        async with Peer() as peer, running_agent(peer.url, work_root):
            message = assign(python(LEAVES_AN_ESCAPEE))
            await peer.send(message)
            return await peer.final(message["token"])

    final = run_async(scenario())
    return final, int(final["output"])


@contextlib.contextmanager
def _escapee_killed_afterwards(work_root: Path) -> Iterator[None]:
    """Whatever a failing test left running under `work_root` is ended."""
    try:
        yield
    finally:
        orphans.sweep(work_root, grace=0)


def test_a_process_that_left_the_runs_group_is_killed_when_the_run_ends(tmp_path: Path) -> None:
    with _escapee_killed_afterwards(tmp_path):
        final, escapee = _run_leaving_an_escapee(tmp_path)

        assert final["status"] == "completed"
        wait_until(lambda: process_gone(escapee), timeout=5, what=f"escapee {escapee} to die")


def test_the_escapee_killed_is_logged_with_its_pid(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="scheduler.agent.orphans")
    with _escapee_killed_afterwards(tmp_path):
        final, escapee = _run_leaving_an_escapee(tmp_path)

    assert f"killing process {escapee}" in caplog.text
    assert final["task_id"] in caplog.text


def test_an_escapee_that_ignores_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    code = (
        "import signal, subprocess, sys\n"
        "ignoring = 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); "
        "time.sleep(1000)'\n"
        "escapee = subprocess.Popen([sys.executable, '-c', ignoring], start_new_session=True, stdout=subprocess.PIPE)\n"
        "escapee.stdout.readline()\n"  # its SIGTERM handler is in place
        "print(escapee.pid)"
    )

    async def scenario() -> dict[str, Any]:
        async with Peer() as peer, running_agent(peer.url, tmp_path):
            message = assign(python(code))
            await peer.send(message)
            return await peer.final(message["token"])

    with _escapee_killed_afterwards(tmp_path):
        final = run_async(scenario())
        escapee = int(final["output"])

        wait_until(lambda: process_gone(escapee), timeout=5, what=f"escapee {escapee} to die")


def test_a_process_of_another_run_is_left_alone(tmp_path: Path) -> None:
    other_output_dir = tmp_path / "work" / "other-task" / "1" / "output"
    other_output_dir.mkdir(parents=True)
    env = {**os.environ, "FETCHML_OUTPUT_DIR": str(other_output_dir)}
    other_run = subprocess.Popen(["sleep", "1000"], start_new_session=True, env=env)
    try:
        with _escapee_killed_afterwards(tmp_path / "work"):
            _run_leaving_an_escapee(tmp_path / "work")

            assert other_run.poll() is None
    finally:
        other_run.kill()
        other_run.wait()
