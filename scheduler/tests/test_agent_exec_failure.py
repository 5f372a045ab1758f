"""A command whose exec fails (a `#!` naming a missing interpreter, a file that is no program) is a
run that could not start, reported as `preparation`, not as the user's program failing."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

from scheduler.agent import orphans, runner
from scheduler.tests.agent_peer import Peer, assign, python, run_async, running_agent


def _program(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    path.chmod(0o755)
    return path


def _finals(work_root: Path, *entrypoints: str) -> list[dict[str, Any]]:
    """The final statuses of runs of `entrypoints`, one after the other, on one agent."""

    async def scenario() -> list[dict[str, Any]]:
        finals = []
        async with Peer() as peer, running_agent(peer.url, work_root):
            for entrypoint in entrypoints:
                message = assign(entrypoint)
                await peer.send(message)
                finals.append(await peer.final(message["token"]))
        return finals

    return run_async(scenario())


@pytest.mark.parametrize(
    ("content", "strerror"),
    [
        (b"#!/nonexistent/python\nprint('never')\n", "No such file or directory"),
        (b"\x00\x01\x02 not a program\n", "Exec format error"),
    ],
    ids=["missing-interpreter", "not-a-program"],
)
def test_a_command_whose_exec_fails_fails_as_preparation(tmp_path: Path, content: bytes, strerror: str) -> None:
    program = _program(tmp_path / "train", content)

    [final] = _finals(tmp_path / "work", str(program))

    assert (final["status"], final["failure_reason"]) == ("failed", "preparation")
    assert final["error"].startswith(f"cannot start {str(program)!r}: {strerror}")
    assert "exit_code" not in final


def test_a_command_whose_exec_fails_is_never_reported_running(tmp_path: Path) -> None:
    program = _program(tmp_path / "train", b"#!/nonexistent/python\n")

    async def scenario() -> list[str]:
        async with Peer() as peer, running_agent(peer.url, tmp_path / "work"):
            message = assign(str(program))
            await peer.send(message)
            await peer.final(message["token"])
            return [m.get("status", m["type"]) for m in peer.about(message["token"])]

    assert "running" not in run_async(scenario())


def test_starting_runs_leaves_no_descriptor_open_in_the_agent(tmp_path: Path) -> None:
    program = _program(tmp_path / "train", b"#!/nonexistent/python\n")
    entrypoints = [str(program), python("print('ok')"), "no-such-program-fetchml"]
    _finals(tmp_path / "warm-up", *entrypoints)  # what lives as long as the process (its lifeline) is made
    before = sorted(os.listdir("/proc/self/fd"))

    finals = _finals(tmp_path / "work", *entrypoints)

    assert [final["status"] for final in finals] == ["failed", "completed", "failed"]
    assert sorted(os.listdir("/proc/self/fd")) == before


def test_without_a_launcher_a_command_whose_exec_fails_still_fails_as_preparation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    program = _program(tmp_path / "train", b"#!/nonexistent/python\n")
    monkeypatch.setattr(sys, "executable", "")  # runs are then started directly (orphans.tethered)

    [final] = _finals(tmp_path / "work", str(program))

    assert (final["status"], final["failure_reason"]) == ("failed", "preparation")
    assert final["error"] == f"cannot start {str(program)!r}: No such file or directory"


def test_a_launcher_that_never_gets_to_its_exec_is_supervised_as_started_and_times_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The launcher stops itself before anything else (a thrashing machine, at worst): its exec
    # never comes, and the run's timeout must still apply.
    monkeypatch.setattr(
        orphans, "LAUNCHER", "import os, signal\nos.kill(os.getpid(), signal.SIGSTOP)\n" + orphans.LAUNCHER
    )
    monkeypatch.setattr(runner, "EXEC_REPORT_SECONDS", 0.5)

    async def scenario() -> dict[str, Any]:
        async with Peer() as peer, running_agent(peer.url, tmp_path):
            message = assign("true", timeout_seconds=1, cancel_grace_seconds=0)
            await peer.send(message)
            return await peer.final(message["token"], timeout=30)

    final = run_async(scenario())

    assert (final["status"], final["failure_reason"]) == ("failed", "timeout")
