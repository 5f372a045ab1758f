"""Runs die with their agent, and an agent starting in a work directory ends what an earlier one left
there: real processes, killed and looked for in /proc."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from scheduler.agent import orphans
from scheduler.tests.agent_peer import process_gone
from scheduler.tests.live_system import wait_until

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="looks for processes in /proc")

# Starts a grandchild in its own process group (unless told to leave it), writes its pid, then waits.
SPAWNS_A_GRANDCHILD = """\
import os, signal, subprocess, sys, time
if "ignore-term" in sys.argv:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
grandchild = subprocess.Popen(["sleep", "300"], start_new_session="leave-group" in sys.argv)
with open("grandchild.tmp", "w") as f:
    f.write(str(grandchild.pid))
os.rename("grandchild.tmp", "grandchild")
time.sleep(300)
"""


class Started:
    """Processes this test started, each in a session of its own; all of them killed at the end."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen] = []

    def run(self, work_root: Path, task_id: str, *flags: str) -> tuple[int, int]:
        """A run's process left in `work_root` (its environment as the runner sets it), with a
        grandchild: (pid, grandchild's pid)."""
        work_dir = work_root / task_id / "1"
        (work_dir / "output").mkdir(parents=True)
        env = {**os.environ, "FETCHML_TASK_ID": task_id, "FETCHML_OUTPUT_DIR": str(work_dir / "output")}
        process = self.popen([sys.executable, "-c", SPAWNS_A_GRANDCHILD, *flags], cwd=work_dir, env=env)
        grandchild = wait_until(lambda: _read(work_dir / "grandchild"), timeout=10, what="the grandchild's pid")
        return process.pid, int(grandchild)

    def popen(self, command: list[str], **kwargs: object) -> subprocess.Popen:
        process = subprocess.Popen(command, start_new_session=True, **kwargs)  # type: ignore[call-overload]
        self.processes.append(process)
        return process

    def close(self) -> None:
        for process in self.processes:
            # Not reaped yet, so its pid (and its group's id) still name it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            if process.stdout is not None:
                process.stdout.close()


@pytest.fixture
def started(tmp_path: Path) -> Iterator[Started]:
    processes = Started()
    try:
        yield processes
    finally:
        processes.close()
        orphans.sweep(tmp_path, grace=0)  # a grandchild that left its group, were a test to fail


def _read(path: Path) -> str | None:
    return path.read_text() if path.exists() else None


def test_sweep_kills_a_run_left_in_the_work_directory_and_its_grandchild(tmp_path: Path, started: Started) -> None:
    pid, grandchild = started.run(tmp_path / "work", "task-1")

    found = orphans.sweep(tmp_path / "work")

    assert {(leftover.process.pid, leftover.task_id) for leftover in found} == {(pid, "task-1"), (grandchild, "task-1")}
    assert process_gone(pid)
    assert process_gone(grandchild)


def test_sweep_leaves_runs_of_another_work_directory_alone(tmp_path: Path, started: Started) -> None:
    pid, grandchild = started.run(tmp_path / "other", "task-1")

    assert orphans.sweep(tmp_path / "work") == []
    assert not process_gone(pid)
    assert not process_gone(grandchild)


def test_sweep_kills_a_run_that_ignores_sigterm_after_the_grace(tmp_path: Path, started: Started) -> None:
    pid, grandchild = started.run(tmp_path / "work", "task-1", "ignore-term")

    orphans.sweep(tmp_path / "work", grace=0.2)

    assert process_gone(pid)
    assert process_gone(grandchild)


def test_sweep_kills_a_process_that_left_its_runs_group(tmp_path: Path, started: Started) -> None:
    pid, grandchild = started.run(tmp_path / "work", "task-1", "leave-group")

    orphans.sweep(tmp_path / "work")

    assert process_gone(pid)
    assert process_gone(grandchild)


def test_an_agent_starting_in_a_work_directory_another_live_agent_uses_kills_nothing(
    tmp_path: Path, started: Started
) -> None:
    with orphans.claimed(tmp_path / "work"):
        pid, grandchild = started.run(tmp_path / "work", "task-1")

        with orphans.claimed(tmp_path / "work"):
            assert not process_gone(pid)
            assert not process_gone(grandchild)


def test_an_agent_starting_in_a_work_directory_no_live_agent_uses_first_ends_what_is_left_there(
    tmp_path: Path, started: Started
) -> None:
    pid, grandchild = started.run(tmp_path / "work", "task-1")

    with orphans.claimed(tmp_path / "work"):
        assert process_gone(pid)
        assert process_gone(grandchild)


# An agent stand-in: starts `sh` tethered (with a grandchild), prints both pids, then waits to be killed.
AGENT = """\
import os, subprocess, sys, time
from pathlib import Path
from scheduler.agent import orphans
work = Path(sys.argv[1])
argv = ["sh", "-c", "sleep 300 & echo $!; exec sleep 300"]
command, fds = orphans.tethered(argv, cwd=work, env=os.environ)
run = subprocess.Popen(command, cwd=work, pass_fds=fds, start_new_session=True, stdout=subprocess.PIPE, text=True)
print(run.pid, run.stdout.readline().strip(), flush=True)
time.sleep(300)
"""


def test_a_tethered_run_and_its_grandchild_die_when_the_process_that_started_it_is_killed(
    tmp_path: Path, started: Started
) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(orphans.__file__).parents[2])}
    agent = started.popen([sys.executable, "-c", AGENT, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True)
    assert agent.stdout is not None
    pid, grandchild = map(int, agent.stdout.readline().split())
    assert not process_gone(pid)

    agent.kill()
    agent.wait()

    wait_until(lambda: process_gone(pid) and process_gone(grandchild), timeout=5, what="the run to die")


def test_a_tethered_command_gets_exactly_the_environment_it_was_given(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "ONLY": "this"}
    command, fds = orphans.tethered(["env"], cwd=tmp_path, env=env)

    shown = subprocess.Popen(command, env=env, pass_fds=fds, start_new_session=True, stdout=subprocess.PIPE, text=True)
    output, _ = shown.communicate()
    os.killpg(shown.pid, signal.SIGKILL)  # its watchdog, as the runner does once a run's process has exited

    assert sorted(output.splitlines()) == ["ONLY=this", f"PATH={os.environ['PATH']}"]


def test_a_tethered_command_that_cannot_be_found_raises_as_starting_it_directly_would(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as raised:
        orphans.tethered(["no-such-program-fetchml"], cwd=tmp_path, env={"PATH": str(tmp_path)})

    assert str(raised.value) == "[Errno 2] No such file or directory: 'no-such-program-fetchml'"
