"""End to end: a killed worker agent leaves nothing of its runs running, and a restarted one ends
what escaped (scheduler/agent/orphans.py): a run whose agent is gone is re-queued and must not
also run on."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.db import connection

from fetchml.testing import database_url_for
from scheduler.agent import orphans
from scheduler.tests.agent_peer import process_gone
from scheduler.tests.live_system import LiveSystem, python_command, wait_until

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="looks for processes in /proc"),
]


@pytest.fixture
def system(tmp_path: Path) -> Iterator[LiveSystem]:
    with LiveSystem(tmp_path=tmp_path, database_url=database_url_for(connection)) as live:
        yield live
    orphans.sweep(tmp_path, grace=0)  # what a failing test left running


def spawning(tmp_path: Path, *, leave_group: bool = False) -> str:
    """A task that, on its first attempt, starts a grandchild (in its process group, or out of
    it), writes "pid grandchild-pid" to the file `pids`, then sleeps; a later attempt just ends."""
    code = (
        "import os, pathlib, subprocess, sys, time\n"
        "if pathlib.Path(os.environ['FETCHML_WORK_DIR']).name != '1': sys.exit(0)\n"
        f"grandchild = subprocess.Popen(['sleep', '300'], start_new_session={leave_group})\n"
        f"pids = pathlib.Path({str(tmp_path / 'pids')!r})\n"
        "pids.with_suffix('.tmp').write_text(f'{os.getpid()} {grandchild.pid}')\n"
        "pids.with_suffix('.tmp').rename(pids)\n"
        "time.sleep(300)"
    )
    return python_command(code)


def started_pids(tmp_path: Path) -> tuple[int, int]:
    pids = tmp_path / "pids"
    text = wait_until(lambda: pids.exists() and pids.read_text(), what="the run's pids")
    pid, grandchild = map(int, text.split())
    return pid, grandchild


def test_a_run_and_its_grandchild_die_with_their_killed_agent(
    system: LiveSystem, tmp_path: Path, owner_key: str, agent_key: str
) -> None:
    agent = system.start_worker("a", key=agent_key)
    task = system.submit(owner_key, entrypoint=spawning(tmp_path))
    system.wait_for_status(owner_key, task["id"], "running")
    pid, grandchild = started_pids(tmp_path)

    agent.process.kill()  # kill -9 of the agent
    agent.process.wait()

    wait_until(lambda: process_gone(pid) and process_gone(grandchild), timeout=5, what="the run to die")


def test_a_restarted_agent_ends_what_a_run_of_its_killed_predecessor_left_before_it_says_hello(
    system: LiveSystem, tmp_path: Path, owner_key: str, agent_key: str
) -> None:
    agent = system.start_worker("a", key=agent_key)
    task = system.submit(owner_key, entrypoint=spawning(tmp_path, leave_group=True))
    system.wait_for_status(owner_key, task["id"], "running")
    pid, escaped = started_pids(tmp_path)
    agent.process.kill()
    agent.process.wait()
    wait_until(lambda: process_gone(pid), timeout=5, what="the run to die")
    assert not process_gone(escaped)  # out of the run's process group: nothing ended it

    restarted = system.start_worker("a", key=agent_key, wait=False)
    # Its own welcome (the server may not have seen the killed agent's connection close yet).
    wait_until(lambda: " as a (worker " in restarted.output(), what="the restarted agent to be welcomed")

    assert process_gone(escaped)
    assert f"killing task {task['id']} (pid {escaped}," in restarted.output()
    system.wait_for_status(owner_key, task["id"], "completed")  # its second attempt, which just ends
