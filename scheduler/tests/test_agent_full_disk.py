"""A run whose log files cannot be written (a full disk) is supervised to its end all the same: it
reports its own exit code, says which log file is incomplete, and the server still gets every line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from scheduler.agent.artifacts import RUN_FILES
from scheduler.tests.agent_peer import Peer, assign, python, run_async, running_agent

FULL_DISK = Path("/dev/full")  # takes nothing: every write that reaches it fails with ENOSPC


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """The runs' log files are on a full disk: what reaches the disk, at a write or at the flush of
    closing, fails with ENOSPC. Everything else is written where it belongs."""
    if not FULL_DISK.exists():
        pytest.skip("needs /dev/full")
    real_open = Path.open

    def opening(path: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if path.parent.name == RUN_FILES and path.name in ("stdout.log", "stderr.log") and "w" in mode:
            return real_open(FULL_DISK, mode, *args, **kwargs)
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", opening)


def _final_and_lines(work_root: Path, code: str) -> tuple[dict[str, Any], list[str]]:
    async def scenario() -> tuple[dict[str, Any], list[str]]:
        async with Peer() as peer, running_agent(peer.url, work_root):
            message = assign(python(code))
            await peer.send(message)
            final = await peer.final(message["token"])
            return final, peer.log_lines(message["token"])

    return run_async(scenario())


@pytest.mark.usefixtures("full_disk")
def test_a_run_whose_log_files_cannot_be_written_reports_its_own_exit_code(tmp_path: Path) -> None:
    final, _ = _final_and_lines(tmp_path, "import sys\nprint('epoch 1')\nsys.exit(3)")

    assert (final["status"], final["exit_code"], final["failure_reason"]) == ("failed", 3, "exit_code")
    assert final["error"].endswith(f"log file {RUN_FILES}/stdout.log is incomplete: No space left on device")


@pytest.mark.usefixtures("full_disk")
def test_every_line_reaches_the_server_when_the_log_files_cannot_be_written(tmp_path: Path) -> None:
    # Far more than a file's write buffer: writes fail while the run goes on.
    final, lines = _final_and_lines(tmp_path, "for n in range(5000): print(f'line {n:>10}')")

    assert (final["status"], final["exit_code"]) == ("completed", 0)
    assert lines == [f"line {n:>10}" for n in range(5000)]
