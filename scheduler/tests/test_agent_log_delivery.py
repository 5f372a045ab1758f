"""The agent's log lines: counted, held until the server acknowledges them, sent again until it does."""

from __future__ import annotations

import asyncio
from pathlib import Path

from scheduler.agent.client import Agent
from scheduler.tests.agent_peer import (
    Peer,
    agent_config,
    assign,
    ended_while_away,
    python,
    run_async,
    running_agent,
    until,
)

LOG_ACKS = ["batch", "log_ack"]


def _logs(peer: Peer, token: str) -> list[dict]:
    return [m for m in peer.about(token) if m["type"] == "log"]


def _distinct(logs: list[dict]) -> list[dict]:
    """The `log` messages, each once (those sent again left out)."""
    return sorted({m["seq"]: m for m in logs}.values(), key=lambda m: m["seq"])


def test_log_messages_carry_the_place_of_their_first_line(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Peer(features=LOG_ACKS) as peer, running_agent(peer.url, tmp_path) as agent:
            message = assign(python("for n in range(450): print(n)"))
            await peer.send(message)
            await peer.final(message["token"])
            await until(lambda: agent.held_runs() == [], what="the run to be settled")
            logs = _logs(peer, message["token"])
            assert [m["seq"] for m in logs] == [0, 200, 400]
            assert [line["line"] for m in logs for line in m["lines"]] == [str(n) for n in range(450)]

    run_async(scenario())


def test_an_unacknowledged_log_message_is_sent_again_and_holds_the_run_until_acknowledged(tmp_path: Path) -> None:
    async def scenario() -> None:
        peer = Peer(heartbeat_seconds=0.1, features=LOG_ACKS, ack_logs=False)
        async with peer, running_agent(peer.url, tmp_path) as agent:
            message = assign(python("print('epoch 1')"))
            token = message["token"]
            await peer.send(message)
            await peer.final(token)  # acknowledged by the peer
            first = await peer.next(lambda m: m["type"] == "log" and m["token"] == token)
            again = await peer.next(lambda m: m["type"] == "log" and m["token"] == token)
            assert again == first
            assert [run["token"] for run in agent.held_runs()] == [token]

            await peer.ack_log(first)
            await until(lambda: agent.held_runs() == [], what="the run to be forgotten once its lines are stored")
            sent = len(_logs(peer, token))
            await peer.next(lambda m: m["type"] == "heartbeat")
            await peer.next(lambda m: m["type"] == "heartbeat")
            assert len(_logs(peer, token)) == sent

    run_async(scenario())


FINAL = {"completed", "failed", "cancelled"}


def test_the_final_status_waits_for_the_earlier_log_lines_to_be_acknowledged(tmp_path: Path) -> None:
    async def scenario() -> None:
        peer = Peer(heartbeat_seconds=0.1, features=LOG_ACKS, ack_logs=False)
        async with peer, running_agent(peer.url, tmp_path):
            message = assign(python("print('the only line')"))
            token = message["token"]
            await peer.send(message)
            log = await peer.next(lambda m: m["type"] == "log" and m["token"] == token)
            # The agent knows the run ended (its heartbeat says so)...
            ended = {"task_id": message["task_id"], "token": token, "status": "completed"}
            await peer.next(lambda m: m["type"] == "heartbeat" and ended in m["running"])
            # ...and says nothing of the end while the line may still be missing on the server.
            assert not [m for m in peer.about(token) if m["type"] == "status" and m["status"] in FINAL]
            await peer.ack_log(log)
            assert (await peer.final(token))["status"] == "completed"

    run_async(scenario())


def test_the_final_status_goes_a_lease_after_the_end_even_if_the_lines_are_never_acknowledged(tmp_path: Path) -> None:
    async def scenario() -> None:
        peer = Peer(heartbeat_seconds=0.1, features=LOG_ACKS, ack_logs=False)
        async with peer, running_agent(peer.url, tmp_path):
            message = assign(python("print('the only line')"))
            await peer.send(message)
            assert (await peer.final(message["token"]))["status"] == "completed"

    run_async(scenario())


def test_a_forced_shutdown_sends_a_final_status_held_back_for_its_lines(tmp_path: Path) -> None:
    code = "import os, signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint(os.getpid())\ntime.sleep(300)"

    async def scenario() -> None:
        async with Peer(features=LOG_ACKS, ack_logs=False) as peer:
            agent = Agent(agent_config(peer.url, tmp_path, forced_stop_grace_seconds=0.5))
            serving = asyncio.create_task(agent.run())
            message = assign(python(code), cancel_grace_seconds=60)
            await peer.send(message)
            await peer.next(lambda m: m["type"] == "log")  # never acknowledged

            agent.drain()
            agent.shutdown()

            await asyncio.wait_for(serving, 15)
            final = await peer.final(message["token"])
            assert (final["status"], final["failure_reason"]) == ("failed", "worker_lost")

    run_async(scenario())


def test_unacknowledged_log_messages_of_a_finished_run_are_sent_again_after_a_reconnect(tmp_path: Path) -> None:
    async def scenario() -> None:
        # A short lease (6 heartbeats): the final goes after it, its lines still unacknowledged.
        first = Peer(heartbeat_seconds=0.1, features=LOG_ACKS, ack_logs=False)
        async with first, running_agent(first.url, tmp_path) as agent:
            message = assign(python("print('epoch 1')\nprint('epoch 2')"))
            token = message["token"]
            await first.send(message)
            await first.final(token)
            lines = [line["line"] for m in _distinct(_logs(first, token)) for line in m["lines"]]
            assert lines == ["epoch 1", "epoch 2"]
            port = first.port
            await first.close()

            # The new server no longer holds the run (it ended): reconcile says kill.
            async with Peer(port=port, features=LOG_ACKS, kill=[token]) as second:
                await until(lambda: agent.held_runs() == [], what="the run to be settled by the new server")
                again = [line["line"] for m in _logs(second, token) for line in m["lines"]]
                assert again == lines
                assert [m["seq"] for m in _logs(second, token)] == [m["seq"] for m in _distinct(_logs(first, token))]

    run_async(scenario())


def test_log_messages_made_while_the_server_is_away_reach_the_next_one_once(tmp_path: Path) -> None:
    gate = tmp_path / "gate"

    async def scenario() -> None:
        first = Peer(features=LOG_ACKS)
        async with first, running_agent(first.url, tmp_path / "work") as agent:
            command = f"import os, time\nwhile not os.path.exists({str(gate)!r}): time.sleep(0.01)\n"
            message = assign(python(command + "for n in range(450): print(n)"))
            token = message["token"]
            port = await ended_while_away(first, agent, message, gate)
            async with Peer(port=port, features=LOG_ACKS) as second:
                await second.final(token)
                await until(lambda: agent.held_runs() == [], what="the run to be settled by the new server")
                assert [m["seq"] for m in _logs(second, token)] == [0, 200, 400]

    run_async(scenario())


def test_a_server_without_log_acks_settles_a_run_with_its_status_ack(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Peer(heartbeat_seconds=0.1, features=["batch"]) as peer, running_agent(peer.url, tmp_path) as agent:
            message = assign(python("print('epoch 1')"))
            token = message["token"]
            await peer.send(message)
            await peer.final(token)
            await until(lambda: agent.held_runs() == [], what="the run to be forgotten at its status_ack")
            await peer.next(lambda m: m["type"] == "heartbeat")
            await peer.next(lambda m: m["type"] == "heartbeat")
            assert len(_logs(peer, token)) == 1

    run_async(scenario())
