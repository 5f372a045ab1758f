"""Cancelled and timed-out runs still store their files, and finished runs' work directories go away.

The WebSocket side is the test peer (it sends `assign` and `cancel`, and acknowledges final
statuses); the agent's uploads go to the real file API of a live server, or, where an upload is to
fail, to a port nothing listens on.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command

from artifacts.tests.factories import live_run
from fetchml.testing import LiveServer
from scheduler.management.commands.worker import API_KEY_ENV
from scheduler.models import NodeAssignment
from scheduler.tests.agent_peer import Peer, assign, python, run_async, running_agent, until
from tasks.states import TaskStatus

# Saves a checkpoint when asked to stop, as a training loop that is preempted would.
CHECKPOINTING = (
    "import os, signal, sys, time\n"
    "def save(*_):\n"
    "    open(os.path.join(os.environ['FETCHML_OUTPUT_DIR'], 'ckpt.txt'), 'w').write('step 7')\n"
    "    print('checkpoint saved', flush=True)\n"
    "    sys.exit(0)\n"
    "signal.signal(signal.SIGTERM, save)\n"
    "print('ready', flush=True)\n"
    "while True: time.sleep(0.05)"
)


def get(server: LiveServer, path: str, key: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=15)
    try:
        conn.request("GET", path, headers={"X-API-Key": key})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def listing(server: LiveServer, task_id: Any, key: str) -> list[str]:
    status, data = get(server, f"/v1/tasks/{task_id}/artifacts", key)
    assert status == 200, data
    return [entry["path"] for entry in json.loads(data)]


def message_for(run: NodeAssignment, command: str, **fields: Any) -> dict[str, Any]:
    return assign(command, task_id=str(run.task_id), token=str(run.token), attempt=run.attempt, **fields)


def uploading_to(url: str, worker_raw: str, **overrides: Any) -> dict[str, Any]:
    return {"api_key": worker_raw, "files_url": url, "upload_artifacts": True, "transfer_retry_seconds": 5} | overrides


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def cancelled_when_ready(peer: Peer, message: dict[str, Any]) -> dict[str, Any]:
    """Start the run, cancel it once it printed 'ready'; its final status."""
    await peer.send(message)
    await peer.next(lambda m: m["type"] == "log" and m["token"] == message["token"])
    await peer.send({"type": "cancel", "task_id": message["task_id"], "token": message["token"]})
    return await peer.final(message["token"])


@pytest.mark.django_db(transaction=True)
def test_a_cancelled_run_stores_the_checkpoint_it_writes_in_its_grace_period_and_its_logs(
    user, owner_key, worker, live, tmp_path
):
    run = live_run(key=worker[0], owner=user, status=TaskStatus.RUNNING)

    async def scenario() -> dict[str, Any]:
        async with (
            Peer(api_key=worker[1]) as peer,
            running_agent(peer.url, tmp_path / "w", **uploading_to(live.url, worker[1])),
        ):
            return await cancelled_when_ready(peer, message_for(run, python(CHECKPOINTING), cancel_grace_seconds=30))

    final = run_async(scenario())

    assert final["status"] == "cancelled", final
    assert final["output"] == "ready\ncheckpoint saved"
    assert listing(live, run.task_id, owner_key) == ["ckpt.txt", "logs/stderr.log", "logs/stdout.log"]
    assert get(live, f"/v1/tasks/{run.task_id}/artifacts/ckpt.txt", owner_key) == (200, b"step 7")
    assert get(live, f"/v1/tasks/{run.task_id}/artifacts/logs/stdout.log", owner_key) == (
        200,
        b"ready\ncheckpoint saved\n",
    )


@pytest.mark.django_db(transaction=True)
def test_a_timed_out_run_stores_its_checkpoint_and_fails_with_timeout(user, owner_key, worker, live, tmp_path):
    run = live_run(key=worker[0], owner=user, status=TaskStatus.RUNNING)

    async def scenario() -> dict[str, Any]:
        async with (
            Peer(api_key=worker[1]) as peer,
            running_agent(peer.url, tmp_path / "w", **uploading_to(live.url, worker[1])),
        ):
            message = message_for(run, python(CHECKPOINTING), timeout_seconds=3, cancel_grace_seconds=30)
            await peer.send(message)
            return await peer.final(message["token"])

    final = run_async(scenario())

    assert (final["status"], final["failure_reason"]) == ("failed", "timeout"), final
    assert final["output"] == "ready\ncheckpoint saved"
    assert listing(live, run.task_id, owner_key) == ["ckpt.txt", "logs/stderr.log", "logs/stdout.log"]


def test_a_cancelled_run_whose_upload_fails_is_reported_cancelled_saying_so(tmp_path):
    unreachable = f"http://127.0.0.1:{unused_port()}"

    async def scenario() -> dict[str, Any]:
        options = uploading_to(unreachable, "key", transfer_retry_seconds=0.5)
        async with Peer(api_key="key") as peer, running_agent(peer.url, tmp_path / "w", **options):
            return await cancelled_when_ready(peer, assign(python(CHECKPOINTING), cancel_grace_seconds=30))

    final = run_async(scenario())

    assert final["status"] == "cancelled", final
    assert final["error"].startswith("artifacts not stored: artifact logs/stdout.log:"), final
    assert final["output"] == "ready\ncheckpoint saved"


@pytest.mark.django_db(transaction=True)
def test_a_finished_run_directory_is_removed_once_its_end_is_acknowledged(user, worker, live, tmp_path):
    run = live_run(key=worker[0], owner=user, status=TaskStatus.RUNNING)
    work_dir = tmp_path / "w" / str(run.task_id) / "1"
    code = "import os\nopen(os.path.join(os.environ['FETCHML_OUTPUT_DIR'], 'model.txt'), 'w').write('weights')"

    async def scenario() -> None:
        async with (
            Peer(api_key=worker[1]) as peer,
            running_agent(peer.url, tmp_path / "w", **uploading_to(live.url, worker[1])),
        ):
            message = message_for(run, python(code))
            await peer.send(message)
            await peer.status(message["token"], "running")
            assert work_dir.is_dir()
            assert (await peer.final(message["token"]))["status"] == "completed"
            await until(lambda: not work_dir.parent.exists(), what="the run's directory to be removed")

    run_async(scenario())


@pytest.mark.django_db(transaction=True)
def test_the_most_recent_finished_run_directories_are_kept_as_asked(user, worker, live, tmp_path):
    first, second = (live_run(key=worker[0], owner=user, status=TaskStatus.RUNNING) for _ in range(2))
    first_dir, second_dir = (tmp_path / "w" / str(run.task_id) / "1" for run in (first, second))

    async def scenario() -> None:
        options = uploading_to(live.url, worker[1], keep_run_dirs=1)
        async with Peer(api_key=worker[1]) as peer, running_agent(peer.url, tmp_path / "w", **options):
            for run in (first, second):
                message = message_for(run, python("print('done')"))
                await peer.send(message)
                assert (await peer.final(message["token"]))["status"] == "completed"
            await until(lambda: not first_dir.exists(), what="the older run's directory to be removed")
            assert (second_dir / ".fetchml" / "stdout.log").read_text() == "done\n"

    run_async(scenario())


async def _final_of_a_kept_run(message: dict[str, Any], work_root: Path, options: dict[str, Any], caplog) -> dict:
    """The final status of `message`'s run, once the agent has said it keeps the run's directory."""
    async with Peer(api_key="key") as peer, running_agent(peer.url, work_root, **options):
        await peer.send(message)
        final = await peer.final(message["token"])
        await until(lambda: "keeping its work directory" in caplog.text, what="the worker to say it keeps it")
        return final


def test_the_directory_of_a_run_whose_upload_failed_is_kept_and_the_worker_says_so(tmp_path, caplog):
    unreachable = f"http://127.0.0.1:{unused_port()}"
    code = "import os\nopen(os.path.join(os.environ['FETCHML_OUTPUT_DIR'], 'model.txt'), 'w').write('weights')"
    message = assign(python(code))
    work_dir = tmp_path / "w" / message["task_id"] / "1"
    caplog.set_level(logging.WARNING, logger="scheduler.agent.artifacts")

    options = uploading_to(unreachable, "key", transfer_retry_seconds=0.5)
    final = run_async(_final_of_a_kept_run(message, tmp_path / "w", options, caplog))

    assert (final["status"], final["failure_reason"]) == ("failed", "worker_lost"), final
    assert (work_dir / "output" / "model.txt").read_text() == "weights"
    assert f"task {message['task_id']}: keeping its work directory {work_dir}: its upload failed" in caplog.text


def test_the_directory_of_a_non_zero_rank_that_wrote_outputs_is_kept_as_only_rank_0_stores(tmp_path, caplog):
    code = "import os\nopen(os.path.join(os.environ['FETCHML_OUTPUT_DIR'], 'shard-1.pt'), 'w').write('shard')"
    message = assign(python(code), node={"rank": 1, "count": 2, "master_addr": "127.0.0.1", "master_port": 29500})
    work_dir = tmp_path / "w" / message["task_id"] / "1"
    caplog.set_level(logging.WARNING, logger="scheduler.agent.artifacts")

    options = uploading_to(f"http://127.0.0.1:{unused_port()}", "key")
    final = run_async(_final_of_a_kept_run(message, tmp_path / "w", options, caplog))

    assert final["status"] == "completed", final
    assert (work_dir / "output" / "shard-1.pt").read_text() == "shard"
    assert "rank 1 wrote output files, which only rank 0 stores" in caplog.text


def test_a_negative_number_of_run_directories_to_keep_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(API_KEY_ENV, "key")
    with pytest.raises(CommandError, match="argument --keep-run-dirs:"):
        call_command("worker", "--server", "http://127.0.0.1:9", "--keep-run-dirs", "-1")
