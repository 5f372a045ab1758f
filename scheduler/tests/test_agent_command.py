"""`manage.py worker` as a real process: options, the key from the environment, SIGTERM drain, second signal."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from scheduler.management.commands.worker import API_KEY_ENV, worker_url
from scheduler.tests.agent_peer import API_KEY, Peer, assign, gated, python, run_async, until, worker_process


def logged(tmp_path: Path, text: str) -> bool:
    return text in (tmp_path / "worker.log").read_text()


def test_sigterm_drains_finishes_the_running_task_refuses_new_work_and_exits_zero(tmp_path: Path) -> None:
    gate = tmp_path / "gate"

    async def scenario() -> None:
        async with Peer() as peer, worker_process(peer, tmp_path, "--cpus", "3", "--gpus", "0") as worker:
            await peer.connected()
            assert peer.hellos[0]["name"] == "cmd-box"
            assert peer.hellos[0]["capabilities"]["cpu_cores"] == 3
            message = assign(gated(gate))
            await peer.send(message)
            await peer.status(message["token"], "running")

            worker.send_signal(signal.SIGTERM)
            await until(lambda: logged(tmp_path, "SIGTERM: draining"), what="the worker to start draining")
            refused = assign(python("print('never')"))
            await peer.send(refused)
            await until(lambda: logged(tmp_path, f"not taking task {refused['task_id']}"), what="the refusal")
            gate.touch()

            assert await asyncio.wait_for(worker.wait(), 15) == 0
            final = await peer.final(message["token"], timeout=1)
            assert (final["status"], final["output"]) == ("completed", "done")
            assert peer.about(refused["token"]) == []

    run_async(scenario())


def test_second_sigterm_kills_running_tasks_and_reports_them(tmp_path: Path) -> None:
    code = "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)"

    async def scenario() -> None:
        async with Peer() as peer, worker_process(peer, tmp_path, "--gpus", "0") as worker:
            message = assign(gated(tmp_path / "never", code), cancel_grace_seconds=60)
            await peer.send(message)
            await peer.status(message["token"], "running")

            worker.send_signal(signal.SIGTERM)
            await until(lambda: logged(tmp_path, "SIGTERM: draining"), what="the worker to start draining")
            worker.send_signal(signal.SIGTERM)

            assert await asyncio.wait_for(worker.wait(), 15) == 0
            final = await peer.final(message["token"], timeout=1)
            assert (final["status"], final["failure_reason"]) == ("failed", "worker_lost")

    run_async(scenario())


def test_api_key_is_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    with pytest.raises(CommandError, match=API_KEY_ENV):
        call_command("worker", "--server", "http://127.0.0.1:9")


def test_worker_name_must_be_acceptable_to_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(API_KEY_ENV, API_KEY)
    with pytest.raises(CommandError, match="--name"):
        call_command("worker", "--server", "http://127.0.0.1:9", "--name", "bad name!")


@pytest.mark.parametrize(
    ("server", "url"),
    [
        ("http://gpu-head:8000", "ws://gpu-head:8000/ws/worker"),
        ("https://fetchml.example.org/", "wss://fetchml.example.org/ws/worker"),
        ("ws://127.0.0.1:8000", "ws://127.0.0.1:8000/ws/worker"),
        ("wss://host/ws/worker", "wss://host/ws/worker"),
        ("http://host/fetchml", "ws://host/fetchml/ws/worker"),
    ],
)
def test_server_url_becomes_the_worker_websocket_url(server: str, url: str) -> None:
    assert worker_url(server) == url


@pytest.mark.parametrize("server", ["ftp://host", "host:8000", "http://"])
def test_server_url_must_be_http_or_ws(server: str) -> None:
    with pytest.raises(CommandError, match="--server"):
        worker_url(server)


def _read_only(work_dir: Path) -> None:
    work_dir.mkdir()
    work_dir.chmod(0o555)


def _lock_is_a_directory(work_dir: Path) -> None:
    (work_dir / ".agent.lock").mkdir(parents=True)


@pytest.mark.parametrize(
    "spoil",
    [
        pytest.param(
            _read_only,
            id="read-only",
            marks=pytest.mark.skipif(os.geteuid() == 0, reason="root writes a read-only directory all the same"),
        ),
        pytest.param(_lock_is_a_directory, id="lock-is-a-directory"),
    ],
)
def test_a_work_directory_the_agent_cannot_use_is_a_command_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spoil
) -> None:
    work_dir = tmp_path / "work"
    spoil(work_dir)
    monkeypatch.setenv(API_KEY_ENV, API_KEY)

    with pytest.raises(CommandError, match=f"cannot use work directory {work_dir}: "):
        call_command("worker", "--server", "http://127.0.0.1:9", "--workdir", str(work_dir), "--gpus", "0")


@pytest.mark.parametrize(
    "option",
    ["--cpus", "--memory-gb", "--gpus", "--batch-slots", "--service-slots", "--max-unpack-bytes", "--keep-run-dirs"],
)
@pytest.mark.parametrize("value", ["-3", "many", "1.5"])
def test_a_count_option_that_is_not_a_whole_number_0_or_more_says_what_it_must_be(option: str, value: str) -> None:
    with pytest.raises(CommandError) as refused:
        call_command("worker", "--server", "http://127.0.0.1:9", option, value)

    assert str(refused.value) == f"Error: argument {option}: must be a whole number 0 or more, not {value!r}"


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "lots"])
def test_a_dataset_cache_size_that_is_not_a_finite_number_0_or_more_says_what_it_must_be(value: str) -> None:
    with pytest.raises(CommandError) as refused:
        call_command("worker", "--server", "http://127.0.0.1:9", "--dataset-cache-gb", value)

    said = f"Error: argument --dataset-cache-gb: must be a number of GiB, 0 or more, not {value!r}"
    assert str(refused.value) == said
