"""How the agent turns a task's output into log lines: long lines in pieces with nothing lost, NUL replaced.

Real child processes write to real pipes; the test peer records the `log` messages.
"""

from __future__ import annotations

from pathlib import Path

from scheduler.agent.runner import MAX_LINE_BYTES
from scheduler.tests.agent_peer import Peer, assign, python, run_async, running_agent


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
