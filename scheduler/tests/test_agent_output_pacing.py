"""Flow control of a run's output: connected to a server that acknowledges `log` messages, the agent
keeps at most LOG_WINDOW of a run's messages unacknowledged and stops reading the run's pipes
meanwhile, so the task waits on its own writes instead of flooding the server; while the server is
away, the run reads on (docs/worker-protocol.md, "Delivery of log lines")."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from django.db import connection

from fetchml.testing import HOST, database_url_for
from scheduler.agent.client import LOG_WINDOW, Agent
from scheduler.models import NodeAssignment
from scheduler.tests.agent_peer import Peer, assign, ended_while_away, run_async, running_agent
from scheduler.tests.live_system import LiveSystem
from tasks.logs import log_lines
from tasks.models import Task

LOG_ACKS = ["batch", "log_ack"]
# `seq` prints 6-7 bytes a line: 100,000 lines are 500 `log` messages (the window many times over),
# and far more than the window, one read and a full pipe hold together.
LINES = 100_000
# Through a real server, which stores them: 100 `log` messages, the window three times over.
STORED_LINES = 20_000


def _printing(lines: int, done: Path) -> str:
    """A command printing the numbers 1 to `lines`, one a line, then creating `done`."""
    return f"sh -c 'seq 1 {lines} && touch {done}'"


def _watch_unacknowledged_logs(agent: Agent, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """After each `log` message a run of `agent` emits: how many of that run's messages then wait
    for the server's acknowledgement. Install before the agent is sent its run."""
    counts: list[int] = []
    emit = agent._emit

    def counting(message: dict[str, Any]) -> None:
        emit(message)
        if message["type"] == "log":
            counts.append(agent.unacknowledged_logs(message["token"]))

    monkeypatch.setattr(agent, "_emit", counting)
    return counts


def _distinct_lines(peer: Peer, token: str) -> list[str]:
    """The run's lines as the peer received them, each `log` message once (those sent again left out)."""
    logs = {m["seq"]: m for m in peer.about(token) if m["type"] == "log"}
    return [line["line"] for seq in sorted(logs) for line in logs[seq]["lines"]]


@pytest.mark.django_db(transaction=True)
def test_a_run_printing_far_more_than_the_window_completes_once_with_every_line_stored_in_order(
    tmp_path: Path, agent_key: str, owner_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with LiveSystem(tmp_path=tmp_path, database_url=database_url_for(connection)) as system:
        task = system.submit(owner_key, entrypoint=_printing(STORED_LINES, tmp_path / "printed"))

        async def serve_until_completed() -> tuple[dict[str, Any], list[int]]:
            url = f"ws://{HOST}:{system.port}/ws/worker"
            async with running_agent(url, tmp_path / "work", api_key=agent_key, name="pacing") as agent:
                unacknowledged = _watch_unacknowledged_logs(agent, monkeypatch)
                done = await asyncio.to_thread(system.wait_for_status, owner_key, task["id"], "completed")
            return done, unacknowledged

        done, unacknowledged = run_async(serve_until_completed())

    assert (done["attempt"], done["retry_count"]) == (1, 0)
    assert NodeAssignment.objects.filter(task_id=task["id"]).count() == 1
    stored = log_lines(task=Task.objects.get(id=task["id"]))
    assert [line.line for line in stored] == [str(n) for n in range(1, STORED_LINES + 1)]
    assert len(unacknowledged) == STORED_LINES // 200
    assert max(unacknowledged) == LOG_WINDOW


def test_while_the_server_withholds_log_acks_the_task_waits_on_its_own_output(tmp_path: Path) -> None:
    printed = tmp_path / "printed"

    async def scenario() -> None:
        # A long lease: a run is held at most a lease without acknowledgements (the test below).
        peer = Peer(heartbeat_seconds=0.1, lease_seconds=60, features=LOG_ACKS, ack_logs=False)
        async with peer, running_agent(peer.url, tmp_path / "work"):
            message = assign(_printing(LINES, printed))
            token = message["token"]
            await peer.send(message)
            first = await peer.next(lambda m: m["type"] == "log" and m["token"] == token)
            # Sent again twice: two heartbeat intervals in which the agent could have read on.
            await peer.next(lambda m: m == first)
            await peer.next(lambda m: m == first)
            sent = sorted({m["seq"] for m in peer.about(token) if m["type"] == "log"})
            assert sent == [200 * n for n in range(LOG_WINDOW)]
            assert not printed.exists()

            peer.ack_logs = True
            for seq in sent:
                await peer.ack_log({"task_id": message["task_id"], "token": token, "seq": seq})
            assert (await peer.final(token, timeout=30))["status"] == "completed"
            assert _distinct_lines(peer, token) == [str(n) for n in range(1, LINES + 1)]

    run_async(scenario())


def test_a_run_whose_log_messages_are_never_acknowledged_reads_on_to_its_end_after_a_lease(tmp_path: Path) -> None:
    async def scenario() -> None:
        peer = Peer(heartbeat_seconds=0.1, lease_seconds=0.6, features=LOG_ACKS, ack_logs=False)
        async with peer, running_agent(peer.url, tmp_path / "work"):
            message = assign(_printing(LINES, tmp_path / "printed"))
            await peer.send(message)
            assert (await peer.final(message["token"], timeout=30))["status"] == "completed"

    run_async(scenario())


def test_a_run_reads_on_to_its_end_while_the_server_is_away(tmp_path: Path) -> None:
    gate, printed = tmp_path / "gate", tmp_path / "printed"
    command = f"sh -c 'while [ ! -e {gate} ]; do sleep 0.01; done; seq 1 {LINES} && touch {printed}'"

    async def scenario() -> None:
        first = Peer(heartbeat_seconds=0.1, features=LOG_ACKS)
        async with first, running_agent(first.url, tmp_path / "work") as agent:
            message = assign(command)
            token = message["token"]
            port = await ended_while_away(first, agent, message, gate)
            assert printed.exists()

            async with Peer(port=port, features=LOG_ACKS) as second:
                assert (await second.final(token))["status"] == "completed"
                assert _distinct_lines(second, token) == [str(n) for n in range(1, LINES + 1)]

    run_async(scenario())
