"""How the agent turns a task's output into log lines: long lines in pieces with nothing lost, NUL replaced,
progress bars redrawn with carriage returns sent as their state rather than as every frame.

Real child processes write to real pipes; the test peer records the `log` messages.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from scheduler.agent import output
from scheduler.agent.output import MAX_LINE_BYTES, LineAssembler
from scheduler.tests.agent_peer import Peer, assign, python, run_async, running_agent, until


async def _stdout_lines(tmp_path: Path, code: str) -> list[str]:
    """The stdout lines the agent sent for a task running `code`, once the task completed."""
    async with Peer() as peer, running_agent(peer.url, tmp_path):
        message = assign(python(code))
        await peer.send(message)
        final = await peer.final(message["token"])
        assert final["status"] == "completed", final
        return peer.log_lines(message["token"])


ALPHABET, REPEAT = "abcdefghijklmnopqrstuvwxyz", 7_693
LONG_LINE = ALPHABET * REPEAT  # 200,018 characters, made by the child (no argument may be that long)
MAKE_LONG_LINE = f"{ALPHABET!r} * {REPEAT}"


def test_a_line_longer_than_the_limit_arrives_whole_in_pieces_within_the_limit(tmp_path: Path) -> None:
    code = f"import sys\nsys.stdout.write('first\\n' + {MAKE_LONG_LINE} + '\\nlast\\n')"

    lines = run_async(_stdout_lines(tmp_path, code))

    assert lines[0] == "first" and lines[-1] == "last"
    pieces = lines[1:-1]
    assert "".join(pieces) == LONG_LINE
    assert all(len(piece.encode()) <= MAX_LINE_BYTES for piece in pieces)


def test_a_long_line_arriving_in_small_writes_arrives_whole(tmp_path: Path) -> None:
    # Written a few bytes at a time, so that pieces are cut from a line still coming in.
    code = (
        f"import sys\nline = {MAKE_LONG_LINE}\n"
        "for i in range(0, len(line), 777):\n    sys.stdout.write(line[i:i + 777])\n    sys.stdout.flush()\nprint()"
    )

    lines = run_async(_stdout_lines(tmp_path, code))

    assert "".join(lines) == LONG_LINE
    assert all(len(piece.encode()) <= MAX_LINE_BYTES for piece in lines)


def test_a_long_line_of_multibyte_characters_is_cut_between_characters(tmp_path: Path) -> None:
    line = "é€😀" * 5_000  # 2, 3 and 4 bytes in UTF-8: a cut at the limit would often fall inside one
    code = f"import sys\nsys.stdout.buffer.write({line!r}.encode() + b'\\n')"

    lines = run_async(_stdout_lines(tmp_path, code))

    assert "".join(lines) == line
    assert len(lines) > 1
    assert all(len(piece.encode()) <= MAX_LINE_BYTES for piece in lines)
    assert not any("\ufffd" in piece for piece in lines)


def test_a_nul_in_the_output_is_sent_as_a_replacement_character(tmp_path: Path) -> None:
    code = "import sys\nsys.stdout.buffer.write(b'before\\nhas\\x00nul\\nafter\\n')"

    lines = run_async(_stdout_lines(tmp_path, code))

    assert lines == ["before", "has\ufffdnul", "after"]


def _assembled(*reads: bytes) -> list[str]:
    """The lines one pipe's reads make, the pipe closing after the last."""

    async def assemble() -> list[str]:
        lines: list[str] = []
        assembler = LineAssembler(lines.append)
        for data in reads:
            assembler.feed(data)
        assembler.close()
        return lines

    return run_async(assemble())


def test_a_carriage_return_line_ending_is_no_part_of_the_line() -> None:
    assert _assembled(b"first\r\nsecond\r", b"\nthird\r\n") == ["first", "second", "third"]


def test_a_frame_overwrites_the_line_as_on_a_terminal() -> None:
    # A shorter frame leaves the end of the longer one before it, as a terminal shows it.
    assert _assembled(b"epoch 1 loss 0.912\repoch 2\n") == ["epoch 2 loss 0.912"]


def test_a_line_drawn_across_reads_is_sent_as_it_stands_then_once_finished(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(output, "PROGRESS_LINE_SECONDS", 3600.0)

    lines = _assembled(b"\r 10%|#", b"\r 50%|#####", b"\r100%|##########\n", b"next\n")

    # The first state goes at once; the later ones within the interval only as the final line.
    assert lines == [" 10%|#", "100%|##########", "next"]


def test_a_progress_bar_of_many_frames_arrives_as_few_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(output, "PROGRESS_LINE_SECONDS", 3600.0)
    code = (
        "import sys\nfor i in range(101):\n"
        "    sys.stdout.write(f'\\r{i:3d}%|{\"#\" * (i // 10):<10}|')\n    sys.stdout.flush()\n"
        "print()\nprint('trained')"
    )

    lines = run_async(_stdout_lines(tmp_path, code))

    assert lines[-2:] == ["100%|##########|", "trained"]
    assert len(lines) <= 3  # at most the state first read, the final state, the next line
    assert not any("\r" in line for line in lines)


def test_a_bar_still_being_redrawn_is_sent_as_it_stands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(output, "PROGRESS_LINE_SECONDS", 0.5)
    gates = [tmp_path / "gate-1", tmp_path / "gate-2"]
    code = (
        "import os, sys, time\n"
        "def wait(gate):\n    while not os.path.exists(gate): time.sleep(0.01)\n"
        f"sys.stdout.write('\\rstep 1'); sys.stdout.flush(); wait({str(gates[0])!r})\n"
        f"sys.stdout.write('\\rstep 2'); sys.stdout.flush(); wait({str(gates[1])!r})\n"
        "sys.stdout.write('\\rstep 3\\n')"
    )

    async def scenario() -> list[str]:
        async with Peer() as peer, running_agent(peer.url, tmp_path / "work"):
            message = assign(python(code))
            await peer.send(message)
            for step, gate in enumerate(gates, start=1):
                # Each state arrives while the line is still unfinished, the child waiting on the test.
                await until(lambda step=step: f"step {step}" in peer.log_lines(message["token"]), what=f"step {step}")
                gate.touch()
            final = await peer.final(message["token"])
            assert final["status"] == "completed", final
            return peer.log_lines(message["token"])

    assert run_async(scenario()) == ["step 1", "step 2", "step 3"]
