"""The agent's session with the server: hello, heartbeats, at-least-once finals, reconnects, reconcile, drain."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from scheduler.agent.client import Agent, Backoff
from scheduler.tests.agent_peer import (
    TEST_CAPACITY,
    Peer,
    agent_config,
    assign,
    gated,
    process_gone,
    python,
    run_async,
    running_agent,
    until,
)


def test_hello_reports_name_capabilities_and_address(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Peer() as peer, running_agent(peer.url, tmp_path):
            await peer.connected()
            hello = peer.hellos[0]
            assert (hello["type"], hello["version"], hello["name"]) == ("hello", 1, "test-box")
            assert hello["capabilities"] == TEST_CAPACITY.as_capabilities()
            assert hello["hostname"] == "127.0.0.1"
            assert hello["running"] == []

    run_async(scenario())


def test_hello_says_the_agent_accepts_batch_frames_and_acknowledges_logs(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Peer() as peer, running_agent(peer.url, tmp_path):
            await peer.connected()
            assert peer.hellos[0]["features"] == ["batch", "log_ack"]

    run_async(scenario())


def test_messages_queued_together_go_out_in_one_batch_frame_to_a_server_that_accepts_them(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Peer(features=["batch"]) as peer, running_agent(peer.url, tmp_path):
            first, second = assign(python("print(1)")), assign(python("print(2)"))
            await peer.send_batch([first, second])
            await peer.finals(first["token"], second["token"])
            # Both assigns were handled before the agent sent anything: their acks share a frame.
            assert ["ack", "ack"] in [[kind for kind in frame if kind == "ack"] for frame in peer.frames]

    run_async(scenario())


def test_a_server_that_does_not_accept_batch_frames_gets_one_message_per_frame(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Peer() as peer, running_agent(peer.url, tmp_path):
            first, second = assign(python("print(1)")), assign(python("print(2)"))
            await peer.send_batch([first, second])
            await peer.finals(first["token"], second["token"])
            assert [len(frame) for frame in peer.frames] == [1] * len(peer.frames)
            assert sum(1 for m in peer.messages if m["type"] == "ack") == 2

    run_async(scenario())


def test_a_bad_message_in_a_batch_frame_does_not_cost_the_others(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Peer(features=["batch"]) as peer, running_agent(peer.url, tmp_path):
            good = assign(python("print('ok')"))
            await peer.send_batch([{"type": "teleport"}, assign(""), good])
            final = await peer.final(good["token"])
            assert final["status"] == "completed"

    run_async(scenario())


def test_heartbeats_list_the_runs_the_agent_holds_with_their_progress(tmp_path: Path) -> None:
    gate = tmp_path / "gate"

    async def scenario() -> None:
        async with Peer(heartbeat_seconds=0.1) as peer, running_agent(peer.url, tmp_path / "work"):
            message = assign(gated(gate))
            await peer.send(message)
            await peer.status(message["token"], "running")
            beat = await peer.next(lambda m: m["type"] == "heartbeat" and m["running"])
            assert beat["running"] == [{"task_id": message["task_id"], "token": message["token"], "status": "running"}]
            gate.touch()
            await peer.final(message["token"])
            await peer.next(lambda m: m["type"] == "heartbeat" and m["running"] == [])

    run_async(scenario())


def test_final_status_is_resent_until_acknowledged(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Peer(heartbeat_seconds=0.1, ack_finals=False) as peer, running_agent(peer.url, tmp_path) as agent:
            message = assign(python("print('result')"))
            token = message["token"]
            await peer.send(message)
            first = await peer.final(token)
            again = await peer.final(token)
            assert again == first
            assert [run["token"] for run in agent.held_runs()] == [token]

            await peer.send({"type": "status_ack", "task_id": message["task_id"], "token": token, "accepted": True})
            await until(lambda: agent.held_runs() == [], what="the acknowledged run to be forgotten")
            sent = sum(1 for m in peer.about(token) if m.get("status") == "completed")
            await peer.next(lambda m: m["type"] == "heartbeat")
            await peer.next(lambda m: m["type"] == "heartbeat")
            assert sum(1 for m in peer.about(token) if m.get("status") == "completed") == sent

    run_async(scenario())


def test_outcome_of_a_run_finished_while_disconnected_is_reported_after_reconnect(tmp_path: Path) -> None:
    gate = tmp_path / "gate"

    async def scenario() -> None:
        async with Peer() as first, running_agent(first.url, tmp_path / "work") as agent:
            message = assign(gated(gate))
            token = message["token"]
            await first.send(message)
            await first.status(token, "running")
            port = first.port
            await first.close()  # the server goes away

            gate.touch()
            await until(lambda: agent.held_runs()[0]["status"] == "completed", what="the run to finish offline")
            async with Peer(port=port) as second:
                final = await second.final(token)
                assert final["status"] == "completed"
                assert final["output"] == "done"
                assert second.hellos[0]["running"] == [
                    {"task_id": message["task_id"], "token": token, "status": "completed"}
                ]
                await until(lambda: agent.held_runs() == [], what="the ack to be processed")

    run_async(scenario())


def test_run_keeps_going_across_a_server_restart_and_is_listed_in_hello(tmp_path: Path) -> None:
    gate = tmp_path / "gate"

    async def scenario() -> None:
        async with Peer() as first, running_agent(first.url, tmp_path / "work"):
            message = assign(gated(gate))
            token = message["token"]
            await first.send(message)
            await first.status(token, "running")
            port = first.port
            await first.close()
            async with Peer(port=port) as second:
                await second.connected()
                assert second.hellos[0]["running"] == [
                    {"task_id": message["task_id"], "token": token, "status": "running"}
                ]
                gate.touch()
                final = await second.final(token)
                assert final["status"] == "completed"
                assert [m["status"] for m in second.about(token) if m["type"] == "status"] == [
                    "collecting",
                    "completed",
                ]

    run_async(scenario())


def test_reconcile_kill_stops_the_run_without_reporting_it(tmp_path: Path) -> None:
    code = "import os, time\nprint(os.getpid())\ntime.sleep(300)"

    async def scenario() -> None:
        async with Peer() as first, running_agent(first.url, tmp_path) as agent:
            message = assign(python(code))
            token = message["token"]
            await first.send(message)
            pid = int((await first.next(lambda m: m["type"] == "log" and m["token"] == token))["lines"][0]["line"])
            port = first.port
            await first.close()

            async with Peer(port=port, kill=[token], heartbeat_seconds=0.1) as second:
                await second.connected()
                assert second.hellos[0]["running"][0]["token"] == token
                await until(lambda: process_gone(pid), timeout=5, what="the reconciled run to die")
                await second.next(lambda m: m["type"] == "heartbeat" and m["running"] == [])
                assert agent.held_runs() == []
                assert second.about(token) == []

    run_async(scenario())


def test_server_drain_refuses_new_work_and_ends_once_runs_are_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gate = tmp_path / "gate"

    async def scenario() -> None:
        async with Peer() as peer:
            agent = Agent(agent_config(peer.url, tmp_path / "work"))
            serving = asyncio.create_task(agent.run())
            message = assign(gated(gate))
            await peer.send(message)
            await peer.status(message["token"], "running")

            await peer.send({"type": "drain"})
            refused = assign(python("print('never')"))
            await peer.send(refused)
            await until(lambda: "not taking task " + refused["task_id"] in caplog.text, what="the refusal")
            gate.touch()

            assert await asyncio.wait_for(serving, 15) == 0
            assert (await peer.final(message["token"]))["status"] == "completed"
            assert peer.about(refused["token"]) == []
            assert [m["type"] for m in peer.messages].count("draining") == 1
            assert not (tmp_path / "work" / refused["task_id"]).exists()

    with caplog.at_level(logging.INFO, logger="scheduler.agent"):
        run_async(scenario())


def test_a_draining_agent_stops_its_service_with_sigterm_and_still_lets_its_batch_run_finish(tmp_path: Path) -> None:
    gate, stopped = tmp_path / "gate", tmp_path / "service-stopped"
    # A service that never ends by itself and, like Jupyter, shuts down on SIGTERM.
    service_code = (
        "import signal, sys, time\n"
        f"signal.signal(signal.SIGTERM, lambda *_: (open({str(stopped)!r}, 'w').close(), sys.exit(0)))\n"
        "print('serving')\n"
        "while True: time.sleep(0.05)"
    )

    async def scenario() -> None:
        async with Peer() as peer:
            agent = Agent(agent_config(peer.url, tmp_path / "work"))
            serving = asyncio.create_task(agent.run())
            service = assign(python(service_code), kind="service", cancel_grace_seconds=30)
            batch = assign(gated(gate))
            await peer.send(service)
            await peer.send(batch)
            # Its signal handler is set once it has said so.
            await peer.next(lambda m: m["type"] == "log" and m["token"] == service["token"])

            agent.drain()  # what the first SIGTERM does

            final = await peer.final(service["token"])
            assert not serving.done()  # the batch run goes on
            gate.touch()
            assert await asyncio.wait_for(serving, 15) == 0
            assert (await peer.final(batch["token"]))["status"] == "completed"
            return final

    final = run_async(scenario())
    assert (final["status"], final["failure_reason"]) == ("failed", "worker_lost")
    assert final["error"].startswith("worker drained")
    assert stopped.exists()  # ended by SIGTERM, given its grace


def test_idle_agent_told_to_drain_says_so_before_it_exits(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Peer() as peer:
            agent = Agent(agent_config(peer.url, tmp_path / "work"))
            serving = asyncio.create_task(agent.run())
            await peer.connected()

            agent.drain()  # what the first SIGTERM does

            assert await asyncio.wait_for(serving, 15) == 0
            assert (await peer.next(lambda m: m["type"] == "draining"))["version"] == 1

    run_async(scenario())


def test_a_drained_agent_logs_that_it_exits_drained(tmp_path: Path, caplog) -> None:
    async def scenario() -> int:
        async with Peer() as peer:
            agent = Agent(agent_config(peer.url, tmp_path / "work"))
            serving = asyncio.create_task(agent.run())
            await peer.connected()
            agent.drain()
            return await asyncio.wait_for(serving, 15)

    with caplog.at_level(logging.INFO, logger="scheduler.agent.client"):
        assert run_async(scenario()) == 0
    assert "drained: every run finished and reported; exiting" in caplog.text


def test_draining_agent_says_so_again_after_a_reconnect(tmp_path: Path) -> None:
    gate = tmp_path / "gate"

    async def scenario() -> None:
        async with Peer() as peer, running_agent(peer.url, tmp_path / "work") as agent:
            message = assign(gated(gate))
            await peer.send(message)
            await peer.status(message["token"], "running")
            agent.drain()
            await peer.next(lambda m: m["type"] == "draining")
            await peer.close()  # the server restarts
            async with Peer(port=peer.port) as restarted:
                await restarted.next(lambda m: m["type"] == "draining")
                gate.touch()
                assert (await restarted.final(message["token"]))["status"] == "completed"

    run_async(scenario())


def test_a_draining_agent_says_so_again_with_every_heartbeat(tmp_path: Path) -> None:
    gate = tmp_path / "gate"

    async def scenario() -> None:
        async with Peer(heartbeat_seconds=0.1) as peer, running_agent(peer.url, tmp_path / "work") as agent:
            message = assign(gated(gate))
            await peer.send(message)
            await peer.status(message["token"], "running")
            agent.drain()
            for _ in range(3):  # the first at once, then one beside each heartbeat
                await peer.next(lambda m: m["type"] == "draining")
                await peer.next(lambda m: m["type"] == "heartbeat")
            gate.touch()
            assert (await peer.final(message["token"]))["status"] == "completed"

    run_async(scenario())


def test_cancel_of_a_run_the_agent_does_not_hold_is_answered_cancelled(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Peer() as peer, running_agent(peer.url, tmp_path):
            await peer.send({"type": "cancel", "task_id": "t-1", "token": "tok-1", "reason": "cancelled by alice"})
            final = await peer.final("tok-1")
            assert (final["task_id"], final["status"]) == ("t-1", "cancelled")

    run_async(scenario())


def test_assign_arriving_after_its_cancel_starts_nothing(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Peer() as peer, running_agent(peer.url, tmp_path):
            marker = tmp_path / "ran"
            message = assign(python(f"open({str(marker)!r}, 'w').close()"))
            token = message["token"]
            await peer.send({"type": "cancel", "task_id": message["task_id"], "token": token, "reason": "x"})
            await peer.final(token)
            await peer.send(message)
            await peer.final(token)  # answered cancelled again
            later = assign(python("print('next')"))
            await peer.send(later)
            await peer.final(later["token"])

            assert not marker.exists()
            assert [m["type"] for m in peer.about(token)] == ["status", "status"]

    run_async(scenario())


def test_forced_shutdown_kills_runs_and_reports_them_as_worker_lost(tmp_path: Path) -> None:
    code = "import os, signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint(os.getpid())\ntime.sleep(300)"

    async def scenario() -> None:
        async with Peer() as peer:
            agent = Agent(agent_config(peer.url, tmp_path, forced_stop_grace_seconds=0.5))
            serving = asyncio.create_task(agent.run())
            message = assign(python(code), cancel_grace_seconds=60)
            await peer.send(message)
            pid = int((await peer.next(lambda m: m["type"] == "log"))["lines"][0]["line"])

            agent.drain()
            agent.shutdown()

            assert await asyncio.wait_for(serving, 15) == 0
            final = await peer.final(message["token"])
            assert (final["status"], final["failure_reason"]) == ("failed", "worker_lost")
            assert process_gone(pid)

    run_async(scenario())


def test_forced_shutdown_without_a_server_exits_non_zero(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Peer() as peer:
            agent = Agent(agent_config(peer.url, tmp_path, shutdown_report_seconds=0.3))
            serving = asyncio.create_task(agent.run())
            message = assign(python("import time\nprint('up')\ntime.sleep(300)"))
            await peer.send(message)
            await peer.next(lambda m: m["type"] == "log")
        agent.shutdown()
        assert await asyncio.wait_for(serving, 15) == 1

    run_async(scenario())


def test_refused_credentials_stop_the_agent(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Peer() as peer:
            agent = Agent(agent_config(peer.url, tmp_path, api_key="fetchml_wrong_key"))
            assert await asyncio.wait_for(agent.run(), 10) == 2
            assert peer.hellos == []

    run_async(scenario())


def test_refused_credentials_are_explained_when_the_agent_stops(tmp_path: Path, caplog) -> None:
    async def scenario() -> int:
        async with Peer(refuse_hello=(4403, "")) as peer:
            return await asyncio.wait_for(Agent(agent_config(peer.url, tmp_path)).run(), 10)

    assert run_async(scenario()) == 2
    assert "the API key is not a worker key" in caplog.text
    assert "(close code 4403)" in caplog.text


def test_a_name_in_use_is_explained_with_the_name_and_retried(tmp_path: Path, caplog) -> None:
    async def scenario() -> None:
        async with Peer(refuse_hello=(4409, "")) as peer, running_agent(peer.url, tmp_path):
            await until(lambda: len(peer.hellos) >= 2, what="a second attempt")

    caplog.set_level(logging.INFO, logger="scheduler.agent")
    run_async(scenario())
    refusals = [r.getMessage() for r in caplog.records if "(close code 4409)" in r.getMessage()]
    assert refusals, caplog.text
    assert "another worker named 'test-box' is connected to this server" in refusals[0]
    assert "--name" in refusals[0]
    assert "reconnecting in" in caplog.text


def test_the_servers_close_reason_is_logged_with_the_explanation(tmp_path: Path, caplog) -> None:
    reason = "another live connection uses this worker name"

    async def scenario() -> None:
        async with Peer(refuse_hello=(4409, reason)) as peer, running_agent(peer.url, tmp_path):
            await until(lambda: len(peer.hellos) >= 2, what="a second attempt")

    run_async(scenario())
    assert f"(close code 4409, the server said: {reason})" in caplog.text


def test_agent_retries_until_the_server_appears(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Peer() as probe:
            port = probe.port
        async with running_agent(f"ws://127.0.0.1:{port}/ws/worker", tmp_path) as agent:
            await until(lambda: agent.failed_attempts >= 2, what="attempts against the closed port")
            async with Peer(port=port) as peer:
                await peer.connected()
                assert peer.hellos[0]["name"] == "test-box"

    run_async(scenario())


def test_hello_names_the_agent_process_the_same_across_reconnects(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Peer() as first, running_agent(first.url, tmp_path):
            await first.connected()
            port = first.port
            await first.close()
            async with Peer(port=port) as second:
                await second.connected()
                assert second.hellos[0]["instance"] == first.hellos[0]["instance"]
        async with Peer() as other, running_agent(other.url, tmp_path / "other"):
            await other.connected()
            assert other.hellos[0]["instance"] != first.hellos[0]["instance"]

    run_async(scenario())


def test_a_server_that_stops_answering_is_left_for_a_new_connection_before_the_lease_runs_out(
    tmp_path: Path, caplog
) -> None:
    async def scenario() -> None:
        # A lease of 6 heartbeats (1.2 s): the agent must be back within it, its run still going.
        peer = Peer(heartbeat_seconds=0.2)
        async with peer, running_agent(peer.url, tmp_path, close_timeout=0.2):
            message = assign(gated(tmp_path / "gate"))
            await peer.send(message)
            await peer.status(message["token"], "running")
            peer.freeze()
            await until(lambda: len(peer.hellos) == 2, what="the agent to connect again")
            assert [run["token"] for run in peer.hellos[1]["running"]] == [message["token"]]
            (tmp_path / "gate").touch()
            assert (await peer.final(message["token"]))["status"] == "completed"

    run_async(scenario())
    assert "did not answer a ping within 0.4 s" in caplog.text  # a third of the lease


def test_backoff_grows_with_jitter_up_to_the_cap() -> None:
    backoff = Backoff(initial=0.5, maximum=10.0)
    delays = [backoff.next_delay() for _ in range(10)]
    assert 0.25 <= delays[0] <= 0.5
    assert 0.5 <= delays[1] <= 1.0
    assert all(5.0 <= d <= 10.0 for d in delays[6:])
    backoff.reset()
    assert backoff.next_delay() <= 0.5


def test_out_of_touch_the_agent_tries_again_at_least_every_third_of_the_lease(tmp_path: Path, caplog) -> None:
    async def scenario() -> None:
        peer = Peer(heartbeat_seconds=0.25)  # a lease of 1.5 s
        async with peer, running_agent(peer.url, tmp_path, backoff_initial=0.25, backoff_max=10.0) as agent:
            await peer.connected()
            await peer.close()  # the server is gone: attempt after attempt is refused
            await until(lambda: agent.failed_attempts >= 4, what="four refused attempts")

    caplog.set_level(logging.INFO, logger="scheduler.agent")
    run_async(scenario())
    delays = [float(r.getMessage().split()[2]) for r in caplog.records if r.getMessage().startswith("reconnecting in")]
    assert len(delays) >= 4
    assert max(delays) <= 0.5, delays  # uncapped, the fourth would wait 1 to 2 s
