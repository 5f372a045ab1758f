"""Runs the server took from an agent die on the agent, and the agent says why: taken over by another
agent of its name (refused with 4409), or ended while it was out of touch (`welcome.reconcile.kill`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from scheduler.tests.agent_peer import Peer, assign, process_gone, python, run_async, running_agent, until

NAME_IN_USE = (4409, "another live connection uses this worker name")
# Prints its pid, then runs until killed.
PRINTS_PID_AND_WAITS = "import os, time\nprint(os.getpid())\ntime.sleep(300)"


async def started(peer: Peer, message: dict[str, Any]) -> int:
    """Send `message` (running PRINTS_PID_AND_WAITS); the pid of its process."""
    await peer.send(message)
    log = await peer.next(lambda m: m["type"] == "log" and m["token"] == message["token"])
    return int(log["lines"][0]["line"])


async def refused_as_name_in_use(tmp_path: Path, message: dict[str, Any], *, hellos: int = 1) -> tuple[Peer, int]:
    """An agent runs `message`, loses its server and is then refused with 4409 `hellos` times: the
    refusing peer, and the pid of the run's process (to be looked at after the refusals)."""
    async with Peer() as first, running_agent(first.url, tmp_path) as agent:
        pid = await started(first, message)
        port = first.port
        await first.close()
        async with Peer(port=port, refuse_hello=NAME_IN_USE) as second:
            await until(lambda: len(second.hellos) >= hellos, what=f"{hellos} refused hello(s)")
            await until(lambda: process_gone(pid), what="the run to die")
            assert agent.held_runs() == []
            return second, pid


def test_an_agent_refused_because_another_agent_holds_its_name_kills_the_runs_it_holds(tmp_path: Path) -> None:
    message = assign(python(PRINTS_PID_AND_WAITS))

    second, pid = run_async(refused_as_name_in_use(tmp_path, message))

    assert process_gone(pid)
    assert second.hellos[0]["running"][0]["token"] == message["token"]  # it held the run when refused


def test_an_agent_refused_because_another_agent_holds_its_name_says_which_run_it_stops_and_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="scheduler.agent")
    message = assign(python(PRINTS_PID_AND_WAITS))

    run_async(refused_as_name_in_use(tmp_path, message))

    stopped = [r for r in caplog.records if r.getMessage().startswith(f"stopping task {message['task_id']}")]
    assert [r.levelno for r in stopped] == [logging.WARNING], caplog.text
    assert "another agent named 'test-box' took this worker's runs over" in stopped[0].getMessage()


def test_an_agent_that_stopped_its_runs_for_another_agent_of_its_name_keeps_trying_with_none(tmp_path: Path) -> None:
    second, _ = run_async(refused_as_name_in_use(tmp_path, assign(python(PRINTS_PID_AND_WAITS)), hellos=2))

    assert second.hellos[-1]["running"] == []


def test_a_run_the_server_ended_while_the_agent_was_away_is_killed_with_a_warning_naming_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="scheduler.agent")
    message = assign(python(PRINTS_PID_AND_WAITS))

    async def scenario() -> int:
        async with Peer() as first, running_agent(first.url, tmp_path):
            pid = await started(first, message)
            port = first.port
            await first.close()
            async with Peer(port=port, kill=[message["token"]]) as second:
                await second.connected()
                await until(lambda: process_gone(pid), what="the reconciled run to die")
                return pid

    run_async(scenario())

    stopped = [r for r in caplog.records if r.getMessage().startswith(f"stopping task {message['task_id']}")]
    assert [r.levelno for r in stopped] == [logging.WARNING], caplog.text
    assert "the server no longer holds this run for this worker" in stopped[0].getMessage()
