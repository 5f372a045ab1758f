"""A last line without a newline is the end of a run's output, also when a descendant that left the
run's process group (and its environment) still holds the pipes: the agent gives the pipes up and
delivers the line, which ends the run's output tail too."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from scheduler.tests.agent_peer import Peer, assign, run_async, running_agent

LAST_LINE = "last-line-no-newline"


def test_a_last_line_without_a_newline_is_delivered_while_an_escaped_descendant_holds_the_pipes(
    tmp_path: Path,
) -> None:
    escapee_pid, script = tmp_path / "escapee.pid", tmp_path / "leave-and-print.sh"
    # The escapee has left the group (and, `env -i`, anything marking it as the run's) before the
    # last line is printed: it holds the pipes open until it is killed.
    script.write_text(
        f"env -i setsid sh -c 'echo $$ > {escapee_pid}; exec sleep 60' &\n"
        f"while [ ! -s {escapee_pid} ]; do sleep 0.01; done\n"
        f"printf {LAST_LINE}\n"
    )
    command = f"sh {script}"

    async def scenario() -> None:
        async with Peer() as peer, running_agent(peer.url, tmp_path / "work"):
            message = assign(command)
            await peer.send(message)
            final = await peer.final(message["token"])

            assert final["status"] == "completed"
            assert peer.log_lines(message["token"])[-1:] == [LAST_LINE]
            assert final["output"] == LAST_LINE

    try:
        run_async(scenario())
    finally:
        if escapee_pid.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(escapee_pid.read_text()), signal.SIGKILL)
