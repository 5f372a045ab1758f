"""The agent's snapshots, server datasets and artifacts against the real file API on a live daphne.

The WebSocket side is the test peer (it sends the `assign`s); every HTTP call of the agent hits
the real application with a real worker key, for tasks and assignments the test creates.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.db import connection

from artifacts.models import Artifact
from artifacts.tests.factories import live_run, tar_gz
from audit.models import AuditEvent
from fetchml.testing import LiveServer, database_url_for
from scheduler.models import NodeAssignment
from scheduler.tests.agent_peer import Peer, assign, python, run_async, running_agent
from tasks.models import Task
from tasks.states import TaskStatus
from tasks.tests.factories import NodeAssignmentFactory

pytestmark = pytest.mark.django_db(transaction=True)

BUDGET = 200_000
ROWS = b"".join(f"{i},{i % 7}\n".encode() for i in range(5000))
TRAIN = b"""import os
rows = open(os.path.join("data", "rows.csv"), "rb").read().count(b"\\n")
with open(os.path.join(os.environ["FETCHML_OUTPUT_DIR"], "model.txt"), "w") as f:
    f.write(f"model trained on {rows} rows")
print("trained")
"""


@pytest.fixture
def live(tmp_path: Path):
    env = {"FETCHML_STORAGE_DIR": str(tmp_path / "storage"), "FETCHML_MAX_ARTIFACT_BYTES_PER_TASK": str(BUDGET)}
    with LiveServer(database_url=database_url_for(connection), env=env) as server:
        yield server


def call(server: LiveServer, method: str, path: str, key: str, body: bytes | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=15)
    try:
        headers = {"X-API-Key": key, "Content-Type": "application/octet-stream"}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def upload(server: LiveServer, path: str, key: str, body: bytes) -> dict[str, Any]:
    status, data = call(server, "POST", path, key, body)
    assert status in (200, 201), data
    return json.loads(data)


def listing(server: LiveServer, task_id: Any, key: str) -> list[str]:
    status, data = call(server, "GET", f"/v1/tasks/{task_id}/artifacts", key)
    assert status == 200, data
    return [entry["path"] for entry in json.loads(data)]


def assignment_message(run: NodeAssignment, command: str, **fields: Any) -> dict[str, Any]:
    task = run.task
    return assign(
        command,
        task_id=str(task.id),
        token=str(run.token),
        attempt=run.attempt,
        snapshot_id=task.snapshot_id,
        datasets=task.datasets,
        dataset_specs=task.dataset_specs,
        **fields,
    )


def agent_options(live: LiveServer, worker_raw: str) -> dict[str, Any]:
    return {"api_key": worker_raw, "files_url": live.url, "upload_artifacts": True, "transfer_retry_seconds": 5}


ROWS_SPEC = [{"name": "rows", "source": "fetchml://datasets/rows", "mount_path": "data/rows.csv"}]


def test_snapshot_task_reads_a_server_dataset_and_its_output_is_committed_and_downloadable(
    live, user, owner_key, worker, tmp_path
):
    snapshot = upload(live, "/v1/snapshots", owner_key, tar_gz({"train.py": TRAIN}))
    upload(live, "/v1/datasets?name=rows", owner_key, ROWS)
    run = live_run(
        key=worker[0], owner=user, status=TaskStatus.RUNNING, snapshot_id=snapshot["id"], dataset_specs=ROWS_SPEC
    )

    async def scenario() -> dict[str, Any]:
        async with (
            Peer(api_key=worker[1]) as peer,
            running_agent(peer.url, tmp_path / "w", **agent_options(live, worker[1])),
        ):
            message = assignment_message(run, f"{sys.executable} -u train.py")
            await peer.send(message)
            return await peer.final(message["token"])

    final = run_async(scenario())
    assert (final["status"], final["output"]) == ("completed", "trained"), final
    assert listing(live, run.task_id, owner_key) == ["logs/stderr.log", "logs/stdout.log", "model.txt"]
    assert call(live, "GET", f"/v1/tasks/{run.task_id}/artifacts/model.txt", owner_key) == (
        200,
        b"model trained on 5000 rows",
    )
    assert call(live, "GET", f"/v1/tasks/{run.task_id}/artifacts/logs/stdout.log", owner_key) == (200, b"trained\n")


def test_server_dataset_used_by_three_tasks_is_downloaded_once(live, user, owner_key, worker, tmp_path):
    upload(live, "/v1/datasets?name=rows", owner_key, ROWS)
    uri = "fetchml://datasets/rows"
    runs = [live_run(key=worker[0], owner=user, status=TaskStatus.RUNNING, datasets=[uri]) for _ in range(3)]
    count = "import os\nprint(open(os.path.join('datasets', 'rows'), 'rb').read().count(b'\\n'))"

    async def scenario() -> list[dict[str, Any]]:
        async with (
            Peer(api_key=worker[1]) as peer,
            running_agent(peer.url, tmp_path / "w", **agent_options(live, worker[1])),
        ):
            finals = []
            for run in runs:
                message = assignment_message(run, python(count))
                await peer.send(message)
                finals.append(await peer.final(message["token"]))
            return finals

    assert [(f["status"], f["output"]) for f in run_async(scenario())] == [("completed", "5000")] * 3
    downloads = AuditEvent.objects.filter(event_type="file_access", resource="dataset:rows", action="download")
    assert downloads.count() == 1


def test_malicious_snapshots_fail_the_task_as_preparation_naming_the_member(live, user, owner_key, worker, tmp_path):
    import io
    import tarfile

    def crafted(name: str, kind: bytes, linkname: str = "") -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            first = tarfile.TarInfo("train.py")
            first.size = 1
            tar.addfile(first, io.BytesIO(b"#"))
            bad = tarfile.TarInfo(name)
            bad.type, bad.linkname = kind, linkname
            tar.addfile(bad)
        return buffer.getvalue()

    cases = [
        (crafted("../x", tarfile.REGTYPE), "member '../x' escapes the work directory"),
        (crafted("out", tarfile.SYMTYPE, "/etc"), "symlink 'out' -> '/etc' points outside the work directory"),
        (crafted("tty", tarfile.CHRTYPE), "member 'tty' is a device file or FIFO"),
    ]
    runs = []
    for body, expected in cases:
        snapshot_id = upload(live, "/v1/snapshots", owner_key, body)["id"]
        runs.append((live_run(key=worker[0], owner=user, status=TaskStatus.RUNNING, snapshot_id=snapshot_id), expected))

    async def scenario() -> None:
        async with (
            Peer(api_key=worker[1]) as peer,
            running_agent(peer.url, tmp_path / "w", **agent_options(live, worker[1])),
        ):
            for run, expected in runs:
                message = assignment_message(run, f"{sys.executable} train.py")
                await peer.send(message)
                final = await peer.final(message["token"])
                assert (final["status"], final["failure_reason"]) == ("failed", "preparation")
                assert final["error"] == f"snapshot {run.task.snapshot_id}: {expected}"

    run_async(scenario())
    assert not (tmp_path / "x").exists()


def test_artifact_over_the_task_budget_is_skipped_and_reported(live, user, owner_key, worker, tmp_path):
    run = live_run(key=worker[0], owner=user, status=TaskStatus.RUNNING)
    code = (
        "import os\nout = os.environ['FETCHML_OUTPUT_DIR']\n"
        f"open(os.path.join(out, 'big.bin'), 'wb').write(b'x' * {BUDGET + 1})\n"
        "open(os.path.join(out, 'small.txt'), 'w').write('ok')"
    )

    async def scenario() -> dict[str, Any]:
        async with (
            Peer(api_key=worker[1]) as peer,
            running_agent(peer.url, tmp_path / "w", **agent_options(live, worker[1])),
        ):
            message = assignment_message(run, python(code))
            await peer.send(message)
            return await peer.final(message["token"])

    final = run_async(scenario())
    assert final["status"] == "completed"
    assert final["error"] == "artifacts skipped (over budget): big.bin"
    assert final["skipped_artifacts"] == [{"path": "big.bin", "reason": "over_budget"}]
    assert listing(live, run.task_id, owner_key) == ["logs/stderr.log", "logs/stdout.log", "small.txt"]


class CommitHoldingProxy:
    """Forwards HTTP to the live server, but holds every artifact commit and never answers it."""

    def __init__(self, target: LiveServer) -> None:
        self.commit_seen = threading.Event()
        self.release = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _forward(self) -> None:
                if self.command == "POST" and self.path.endswith("/artifacts/commit"):
                    proxy.commit_seen.set()
                    proxy.release.wait(30)
                    self.close_connection = True
                    return
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                upstream = http.client.HTTPConnection(target.host, target.port, timeout=15)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                finally:
                    upstream.close()
                self.send_response(response.status)
                for name, value in response.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = _forward

            def log_message(self, *args: object) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> CommitHoldingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


AGENT_PROCESS = """
import asyncio, sys
from pathlib import Path
from scheduler.agent.capacity import Capacity
from scheduler.agent.client import Agent, AgentConfig
url, key, work, files_url = sys.argv[1:]
capacity = Capacity(cpu_cores=1, memory_gb=1, gpu_count=0, gpu_type="", batch_slots=1, service_slots=0)
config = AgentConfig(server_url=url, api_key=key, name="doomed", capacity=capacity, work_root=Path(work),
                     files_url=files_url, transfer_retry_seconds=5)
asyncio.run(Agent(config).run())
"""


def test_worker_killed_before_its_commit_leaves_nothing_listed_and_the_retry_commits_a_complete_set(
    live, user, owner_key, worker, tmp_path
):
    first = live_run(key=worker[0], owner=user, status=TaskStatus.RUNNING)
    code = (
        "import os, sys\nout = os.environ['FETCHML_OUTPUT_DIR']\n"
        "open(os.path.join(out, 'a.txt'), 'w').write(os.environ['FETCHML_WORK_DIR'])\n"
        "print('attempt done')"
    )

    async def killed_run() -> None:
        with CommitHoldingProxy(live) as proxy:
            async with Peer(api_key=worker[1]) as peer:
                agent = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-c",
                    AGENT_PROCESS,
                    peer.url,
                    worker[1],
                    str(tmp_path / "doomed"),
                    proxy.url,
                    cwd=settings.BASE_DIR,
                    env={**os.environ, "PYTHONPATH": str(settings.BASE_DIR)},
                    stdin=asyncio.subprocess.DEVNULL,
                )
                try:
                    await peer.send(assignment_message(first, python(code)))
                    assert await asyncio.to_thread(proxy.commit_seen.wait, 30)
                finally:
                    agent.send_signal(signal.SIGKILL)
                    await asyncio.wait_for(agent.wait(), 15)

    run_async(killed_run())
    uploaded = Artifact.objects.filter(task_id=first.task_id, attempt=1)
    assert sorted(uploaded.values_list("path", "complete")) == [
        ("a.txt", False),
        ("logs/stderr.log", False),
        ("logs/stdout.log", False),
    ]
    assert listing(live, first.task_id, owner_key) == []

    # What the server does when the worker is lost: the run goes back to the queue and runs again.
    NodeAssignment.objects.filter(pk=first.pk).update(holds_capacity=False, status=NodeAssignment.Status.LOST)
    Task.objects.filter(pk=first.task_id).update(attempt=2)
    second = NodeAssignmentFactory(task=Task.objects.get(pk=first.task_id), worker=first.worker, holds_capacity=True)

    async def retried_run() -> dict[str, Any]:
        async with (
            Peer(api_key=worker[1]) as peer,
            running_agent(peer.url, tmp_path / "w", **agent_options(live, worker[1])),
        ):
            message = assignment_message(second, python(code))
            await peer.send(message)
            return await peer.final(message["token"])

    assert run_async(retried_run())["status"] == "completed"
    assert listing(live, first.task_id, owner_key) == ["a.txt", "logs/stderr.log", "logs/stdout.log"]
    status, body = call(live, "GET", f"/v1/tasks/{first.task_id}/artifacts/a.txt", owner_key)
    assert (status, body.decode()) == (200, str(tmp_path / "w" / str(first.task_id) / "2"))
    assert set(Artifact.objects.filter(task_id=first.task_id).values_list("attempt", "complete")) == {(2, True)}
