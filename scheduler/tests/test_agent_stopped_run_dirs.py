"""The directory of a run the server stopped goes while the agent runs on (not at its next start),
unless the agent keeps the most recent run directories."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scheduler.agent.artifacts import RECENT_MARKER, RUN_FILES
from scheduler.tests.agent_peer import Peer, assign, python, run_async, running_agent, until

WAITS = "import time\nprint('started')\ntime.sleep(300)"


def _work_dir(root: Path, message: dict[str, Any]) -> Path:
    return root / message["task_id"] / str(message["attempt"])


def _stop(message: dict[str, Any]) -> dict[str, Any]:
    return {"type": "stop", "task_id": message["task_id"], "token": message["token"], "reason": "stale token"}


def test_the_directory_of_a_run_the_server_stopped_is_removed_while_the_agent_runs_on(tmp_path: Path) -> None:
    message = assign(python(WAITS))
    work_dir = _work_dir(tmp_path, message)

    async def scenario() -> None:
        async with Peer(heartbeat_seconds=0.1) as peer, running_agent(peer.url, tmp_path) as agent:
            await peer.send(message)
            await peer.status(message["token"], "running")
            assert work_dir.is_dir()

            await peer.send(_stop(message))

            await until(lambda: not work_dir.parent.exists(), what="the stopped run's directory to be removed")
            assert agent.held_runs() == []
            await peer.next(lambda m: m["type"] == "heartbeat")  # still serving

    run_async(scenario())


def test_the_directory_of_a_run_stopped_after_it_ended_is_removed_while_the_agent_runs_on(tmp_path: Path) -> None:
    message = assign("true")
    work_dir = _work_dir(tmp_path, message)

    async def scenario() -> None:
        # Its final status unacknowledged: the server took the run away meanwhile.
        async with Peer(ack_finals=False) as peer, running_agent(peer.url, tmp_path) as agent:
            await peer.send(message)
            await peer.final(message["token"])
            assert work_dir.is_dir()

            await peer.send(_stop(message))

            await until(lambda: not work_dir.parent.exists(), what="the stopped run's directory to be removed")
            assert agent.held_runs() == []

    run_async(scenario())


def test_the_directory_of_a_stopped_run_is_kept_as_one_of_the_most_recent(tmp_path: Path) -> None:
    message = assign(python(WAITS))
    marker = _work_dir(tmp_path, message) / RUN_FILES / RECENT_MARKER

    async def scenario() -> None:
        async with Peer() as peer, running_agent(peer.url, tmp_path, keep_run_dirs=1):
            await peer.send(message)
            await peer.status(message["token"], "running")

            await peer.send(_stop(message))

            await until(marker.exists, what="the stopped run's directory to be kept as the most recent")

    run_async(scenario())
