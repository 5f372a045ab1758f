"""Output files whose names the server refuses are skipped and reported; the run keeps its other files.

A real agent runs a real child process that writes the files; its uploads go to the file API of a
live server, for tasks and assignments the test creates. The WebSocket side is the test peer.
"""

from __future__ import annotations

import http.client
import json
import os
from pathlib import Path
from typing import Any

import pytest

from artifacts.tests.factories import live_run
from fetchml.testing import LiveServer
from scheduler.agent.artifacts import output_files
from scheduler.models import NodeAssignment
from scheduler.tests.agent_peer import Peer, assign, python, run_async, running_agent
from tasks.states import TaskStatus

pytestmark = pytest.mark.django_db(transaction=True)

KEPT = ["kept.txt", "logs/stderr.log", "logs/stdout.log"]


def listing(server: LiveServer, task_id: Any, key: str) -> list[str]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=15)
    try:
        conn.request("GET", f"/v1/tasks/{task_id}/artifacts", headers={"X-API-Key": key})
        response = conn.getresponse()
        status, data = response.status, response.read()
    finally:
        conn.close()
    assert status == 200, data
    return [entry["path"] for entry in json.loads(data)]


def final_of(
    live: LiveServer, worker: tuple[Any, str], run: NodeAssignment, work_root: Path, code: str
) -> dict[str, Any]:
    """The final status of `run` executing `code` on a real agent that uploads to `live`."""
    options = {"api_key": worker[1], "files_url": live.url, "upload_artifacts": True, "transfer_retry_seconds": 5}

    async def scenario() -> dict[str, Any]:
        async with Peer(api_key=worker[1]) as peer, running_agent(peer.url, work_root, **options):
            message = assign(python(code), task_id=str(run.task_id), token=str(run.token), attempt=run.attempt)
            await peer.send(message)
            return await peer.final(message["token"])

    return run_async(scenario())


def writing(name: bytes) -> str:
    """A task writing `kept.txt` and a file named by the bytes `name` into its output directory."""
    return (
        "import os\nout = os.fsencode(os.environ['FETCHML_OUTPUT_DIR'])\n"
        "open(os.path.join(out, b'kept.txt'), 'w').write('ok')\n"
        f"open(os.path.join(out, {name!r}), 'w').write('lost?')\n"
    )


@pytest.mark.parametrize(
    ("name", "shown", "reason"),
    [
        (b"new\nline.txt", "new\\nline.txt", "name contains a control character"),
        (b"bad\xffname.bin", "bad\\xffname.bin", "name is not UTF-8"),
    ],
    ids=["a newline", "not UTF-8"],
)
def test_an_output_the_server_cannot_name_is_skipped_and_the_run_completes_with_its_other_files(
    live, user, owner_key, worker, tmp_path, name, shown, reason
):
    run = live_run(key=worker[0], owner=user, status=TaskStatus.RUNNING)

    final = final_of(live, worker, run, tmp_path / "w", writing(name))

    assert final["status"] == "completed", final
    assert final["error"] == f"artifacts skipped: {shown} ({reason})"
    assert final["skipped_artifacts"] == [{"path": shown, "reason": reason}]
    assert listing(live, run.task_id, owner_key) == KEPT


def test_files_under_a_directory_whose_name_is_not_utf8_are_skipped_each(tmp_path):
    (tmp_path / "ok.txt").write_text("ok")
    directory = tmp_path / os.fsdecode(b"d\xfe")
    directory.mkdir()
    (directory / "a.txt").write_text("a")

    found, skipped = output_files(tmp_path)

    assert [relative for relative, _ in found] == ["ok.txt"]
    assert [s.as_dict() for s in skipped] == [{"path": "d\\xfe/a.txt", "reason": "name is not UTF-8"}]
