"""Plugins in runs, agent side: sidecars start beside the task, are probed over HTTP, reported
and stopped with it; `{output_dir}` and `{port}` are replaced; a broken sidecar never fails a task."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import urllib.request
from pathlib import Path

import pytest

from scheduler.agent.sidecars import Sidecar, parse_sidecar
from scheduler.tests.agent_peer import (
    Peer,
    assign,
    gated,
    process_gone,
    python,
    run_async,
    running_agent,
    until,
    worker_process,
)

HTTP_SIDECAR = {
    "name": "httpside",
    "version": "1.2.0",
    "command": [sys.executable, "-m", "http.server", "{port}", "--bind", "127.0.0.1", "--directory", "{output_dir}"],
    "image": "",
    "health_path": "/",
}


def _plugin_status(name: str, status: str):
    return lambda m: m["type"] == "plugin_status" and m["name"] == name and m["status"] == status


def _sidecar_pid(port: str) -> int:
    """The pid of the process whose command line serves `port` (our sidecar)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv[1:3] == [b"-m", b"http.server"] and port.encode() in argv:  # not its launcher's watchdog
                return int(entry.name)
    raise AssertionError(f"no sidecar process serves port {port}")


def test_sidecar_is_started_healthy_reachable_and_stopped_with_its_task(tmp_path: Path) -> None:
    gate = tmp_path / "gate"

    async def scenario() -> None:
        async with Peer() as peer, running_agent(peer.url, tmp_path / "work"):
            message = assign(gated(gate), sidecars=[HTTP_SIDECAR])
            await peer.send(message)
            healthy = await peer.next(_plugin_status("httpside", "healthy"))
            assert healthy["token"] == message["token"]
            assert healthy["url"].startswith("http://127.0.0.1:")
            with urllib.request.urlopen(healthy["url"] + "/", timeout=5) as response:
                assert response.status == 200
            pid = _sidecar_pid(healthy["url"].rsplit(":", 1)[1])

            gate.touch()
            assert (await peer.final(message["token"]))["status"] == "completed"
            stopped = [m for m in peer.about(message["token"]) if m["type"] == "plugin_status"][-1]
            assert (stopped["status"], stopped["url"]) == ("stopped", healthy["url"])
            await until(lambda: process_gone(pid), what="the sidecar to be gone")

    run_async(scenario())


def test_sidecar_is_reported_stopped_before_the_final_status(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Peer() as peer, running_agent(peer.url, tmp_path):
            message = assign(python("import time; time.sleep(0.5)"), sidecars=[HTTP_SIDECAR])
            await peer.send(message)
            await peer.final(message["token"])
            kinds = [m.get("status") for m in peer.about(message["token"]) if m["type"] in {"status", "plugin_status"}]
            assert kinds.index("stopped") < kinds.index("completed")

    run_async(scenario())


def test_output_dir_is_replaced_in_env_values(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Peer() as peer, running_agent(peer.url, tmp_path):
            code = "import os; print(os.environ['TRACK_DIR'] == os.environ['FETCHML_OUTPUT_DIR'] + '/track')"
            message = assign(python(code), env={"TRACK_DIR": "{output_dir}/track"})
            await peer.send(message)
            assert (await peer.final(message["token"]))["output"] == "True"

    run_async(scenario())


def test_sidecar_that_cannot_start_is_unhealthy_and_the_task_still_completes(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-program"
    broken = {**HTTP_SIDECAR, "name": "broken", "command": [str(missing), "{port}"]}

    async def scenario() -> None:
        async with Peer() as peer, running_agent(peer.url, tmp_path / "work"):
            message = assign(python("print('trained')"), sidecars=[broken])
            await peer.send(message)
            unhealthy = await peer.next(_plugin_status("broken", "unhealthy"))
            assert unhealthy["token"] == message["token"]
            assert unhealthy["url"] == ""  # nothing serves there
            assert (
                unhealthy["error"]
                == f"{str(missing)!r} was not found on this worker (is it installed, and on the agent's PATH?)"
            )
            assert (await peer.final(message["token"]))["status"] == "completed"

    run_async(scenario())


def test_sidecar_that_exits_before_answering_is_unhealthy_with_its_exit_code_and_last_words(tmp_path: Path) -> None:
    code = "import sys; print('starting'); sys.exit('No module named tensorboard')"
    quitter = {**HTTP_SIDECAR, "name": "quitter", "command": [sys.executable, "-c", code]}
    gate = tmp_path / "gate"

    async def scenario() -> None:
        async with Peer() as peer, running_agent(peer.url, tmp_path / "work"):
            message = assign(gated(gate), sidecars=[quitter])
            await peer.send(message)
            unhealthy = await peer.next(_plugin_status("quitter", "unhealthy"))
            assert (unhealthy["url"], unhealthy["error"]) == ("", "exited with code 1: No module named tensorboard")
            gate.touch()
            assert (await peer.final(message["token"]))["status"] == "completed"

    run_async(scenario())


def test_sidecar_that_never_answers_is_unhealthy_once_its_health_time_is_up(tmp_path: Path) -> None:
    mute = parse_sidecar(
        {**HTTP_SIDECAR, "name": "mute", "command": [sys.executable, "-c", "import time; time.sleep(60)"]}
    )
    (tmp_path / ".fetchml").mkdir()
    reports: list[dict] = []

    async def scenario() -> None:
        sidecar = Sidecar(
            mute,
            task_id="t1",
            token="k1",
            work_dir=tmp_path,
            output_dir=tmp_path,
            env=os.environ,
            emit=reports.append,
            host="127.0.0.1",
            health_timeout=0.5,
        )
        sidecar.start()
        try:
            await until(lambda: any(r["status"] == "unhealthy" for r in reports), what="the unhealthy report")
        finally:
            await sidecar.stop()

    run_async(scenario())
    unhealthy = next(r for r in reports if r["status"] == "unhealthy")
    assert (unhealthy["url"], unhealthy["error"]) == ("", "did not answer HTTP within 0.5 s")


def test_malformed_sidecar_is_unhealthy_with_what_is_wrong_and_the_task_still_completes(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Peer() as peer, running_agent(peer.url, tmp_path):
            message = assign(python("print('ok')"), sidecars=[{"name": "odd", "command": "not a list"}])
            await peer.send(message)
            unhealthy = await peer.next(_plugin_status("odd", "unhealthy"))
            assert unhealthy["error"] == "sidecar odd: 'command' must be a non-empty list of strings"
            assert (await peer.final(message["token"]))["status"] == "completed"

    run_async(scenario())


def test_config_message_is_recorded_by_the_agent(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="scheduler.agent.client")

    async def scenario() -> None:
        async with Peer() as peer, running_agent(peer.url, tmp_path) as agent:
            plugin = {"name": "mlflow", "version": "1.0.0", "enabled": True, "mode": "remote", "image": ""}
            await peer.send({"type": "config", "plugins": [plugin], "restart_required": True})
            await until(lambda: "mlflow" in agent.plugins, what="the agent to take the configuration")
            assert agent.plugins["mlflow"]["mode"] == "remote"

    run_async(scenario())
    assert any("plugin mlflow is now enabled" in record.getMessage() for record in caplog.records)


def test_assign_env_is_never_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    async def scenario() -> None:
        async with Peer() as peer, running_agent(peer.url, tmp_path):
            message = assign(python("print('ok')"), env={"WANDB_API_KEY": "very-secret-value"})
            await peer.send(message)
            await peer.final(message["token"])

    run_async(scenario())
    assert not any("very-secret-value" in record.getMessage() for record in caplog.records)


def test_sidecar_process_group_is_killed_when_the_agent_stops(tmp_path: Path) -> None:
    gate = tmp_path / "gate"

    async def scenario() -> int:
        async with Peer() as peer, running_agent(peer.url, tmp_path / "work"):
            message = assign(gated(gate), sidecars=[HTTP_SIDECAR])
            await peer.send(message)
            healthy = await peer.next(_plugin_status("httpside", "healthy"))
            return _sidecar_pid(healthy["url"].rsplit(":", 1)[1])

    pid = run_async(scenario())
    asyncio.run(until(lambda: process_gone(pid), what="the sidecar to be gone"))
    assert not os.path.exists(f"/proc/{pid}/cmdline") or process_gone(pid)


def test_sidecar_dies_with_its_agent_killed_outright(tmp_path: Path) -> None:
    gate = tmp_path / "gate"  # never opened: the run and its sidecar are still going when the agent dies

    async def scenario() -> None:
        async with Peer() as peer, worker_process(peer, tmp_path, "--gpus", "0") as worker:
            await peer.connected()
            await peer.send(assign(gated(gate), sidecars=[HTTP_SIDECAR]))
            healthy = await peer.next(_plugin_status("httpside", "healthy"))
            pid = _sidecar_pid(healthy["url"].rsplit(":", 1)[1])

            try:
                worker.kill()  # kill -9: no stop of its runs, no word to the server
                await worker.wait()

                await until(lambda: process_gone(pid), what="the sidecar to die with its agent")
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)  # what a failing run of this test left

    run_async(scenario())


def test_the_last_plugin_status_is_said_again_while_the_run_goes_on_and_not_after(tmp_path: Path) -> None:
    gate = tmp_path / "gate"

    async def scenario() -> None:
        peer = Peer(heartbeat_seconds=0.05)
        async with peer, running_agent(peer.url, tmp_path / "work", standing_report_seconds=0.2):
            message = assign(gated(gate), sidecars=[HTTP_SIDECAR])
            await peer.send(message)
            healthy = await peer.next(_plugin_status("httpside", "healthy"))
            assert await peer.next(_plugin_status("httpside", "healthy")) == healthy  # said again, unchanged

            gate.touch()
            await peer.final(message["token"])
            said = len([m for m in peer.about(message["token"]) if m["type"] == "plugin_status"])
            for _ in range(8):  # heartbeats, which say standing reports again: past two of their intervals
                await peer.next(lambda m: m["type"] == "heartbeat")
            assert len([m for m in peer.about(message["token"]) if m["type"] == "plugin_status"]) == said

    run_async(scenario())


def test_the_last_plugin_status_is_said_again_after_a_reconnect(tmp_path: Path) -> None:
    gate = tmp_path / "gate"

    async def scenario() -> None:
        async with Peer() as first, running_agent(first.url, tmp_path / "work"):
            message = assign(gated(gate), sidecars=[HTTP_SIDECAR])
            await first.send(message)
            healthy = await first.next(_plugin_status("httpside", "healthy"))
            await first.close()  # the server restarts, maybe without having applied it
            async with Peer(port=first.port) as second:
                assert await second.next(_plugin_status("httpside", "healthy")) == healthy
                gate.touch()
                await second.final(message["token"])

    run_async(scenario())
