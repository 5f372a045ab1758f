"""A run whose process dies of a signal says which in its `error`, before its stderr tail: real child
processes for a real WebSocket peer."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from scheduler.agent.runner import TAIL_CHARS
from scheduler.tests.agent_peer import Peer, assign, python, run_async, running_agent

OOM_HINT = "a process killed this way may have run out of memory"
# Says it is ready on stdout, then ignores the SIGTERM of a cancel or a timeout until SIGKILL.
IGNORES_SIGTERM = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *_: print('not stopping', file=sys.stderr, flush=True))\n"
    "print('ready', flush=True)\n"
    "while True: time.sleep(0.05)"
)


def _final_of(tmp_path: Path, message: dict[str, Any], *, cancel: bool = False) -> dict[str, Any]:
    """Run `message` to its end (cancelled once it printed its first line, when `cancel`); its final status."""

    async def scenario() -> dict[str, Any]:
        async with Peer() as peer, running_agent(peer.url, tmp_path):
            token = message["token"]
            await peer.send(message)
            if cancel:
                await peer.next(lambda m: m["type"] == "log" and m["token"] == token)
                await peer.send({"type": "cancel", "task_id": message["task_id"], "token": token})
            return await peer.final(token)

    return run_async(scenario())


def _killing_itself(sig: signal.Signals, stderr: str = "") -> str:
    return python(f"import os, signal, sys\nsys.stderr.write({stderr!r})\nos.kill(os.getpid(), signal.{sig.name})")


def test_a_run_killed_by_sigkill_names_the_signal_hints_at_memory_then_gives_its_stderr_tail(tmp_path: Path) -> None:
    final = _final_of(tmp_path, assign(_killing_itself(signal.SIGKILL, "allocating 64 GiB\n")))

    assert (final["status"], final["failure_reason"], final["exit_code"]) == ("failed", "exit_code", 128 + 9)
    assert final["error"] == f"killed by signal 9 (SIGKILL); {OOM_HINT}\nallocating 64 GiB"


def test_a_run_killed_by_another_signal_names_it_without_the_memory_hint(tmp_path: Path) -> None:
    final = _final_of(tmp_path, assign(_killing_itself(signal.SIGUSR1)))

    number = int(signal.SIGUSR1)
    assert (final["status"], final["failure_reason"], final["exit_code"]) == ("failed", "exit_code", 128 + number)
    assert final["error"] == f"killed by signal {number} (SIGUSR1)"


def test_the_signal_explanation_stays_when_the_stderr_tail_fills_the_error(tmp_path: Path) -> None:
    lines = "".join(f"{n:04} {'x' * 395}\n" for n in range(50))  # 20,000 characters: over the bound
    final = _final_of(tmp_path, assign(_killing_itself(signal.SIGKILL, lines)))

    assert final["error"].startswith(f"killed by signal 9 (SIGKILL); {OOM_HINT}\n")
    assert len(final["error"]) == TAIL_CHARS
    assert final["error"].endswith(f"0049 {'x' * 395}")


def test_a_cancelled_run_killed_after_its_grace_says_it_did_not_stop_after_sigterm(tmp_path: Path) -> None:
    final = _final_of(tmp_path, assign(python(IGNORES_SIGTERM), cancel_grace_seconds=0.3), cancel=True)

    assert (final["status"], final["exit_code"]) == ("cancelled", 128 + 9)
    assert final["error"] == "did not stop within its 0.3 s grace after SIGTERM; killed by signal 9 (SIGKILL)"


def test_a_cancelled_run_ended_by_its_sigterm_names_it(tmp_path: Path) -> None:
    message = assign(python("import time\nprint('ready')\ntime.sleep(60)"), cancel_grace_seconds=30)
    final = _final_of(tmp_path, message, cancel=True)

    assert (final["status"], final["exit_code"]) == ("cancelled", 128 + 15)
    assert final["error"] == "killed by signal 15 (SIGTERM)"


def test_a_timed_out_run_killed_after_its_grace_says_so_then_gives_its_stderr_tail(tmp_path: Path) -> None:
    # Time enough to start and ignore SIGTERM, and in its grace to say so on stderr.
    message = assign(python(IGNORES_SIGTERM), timeout_seconds=2, cancel_grace_seconds=1)
    final = _final_of(tmp_path, message)

    assert (final["status"], final["failure_reason"], final["exit_code"]) == ("failed", "timeout", 128 + 9)
    assert final["error"] == (
        "timed out after 2 s; did not stop within its 1 s grace after SIGTERM; killed by signal 9 (SIGKILL)\n"
        "not stopping"
    )
