"""End to end: a multi-node run whose one node fails lets rank 0 stop as a cancel would, and keeps
what rank 0 wrote in its grace period (rank 0 stores the run's files)."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.db import connection

from fetchml.testing import database_url_for
from scheduler.tests.live_system import LiveSystem, python_command

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def test_a_failing_node_lets_rank_0_write_its_checkpoint_which_is_stored(
    tmp_path: Path, agent_key: str, owner_key: str
) -> None:
    started = tmp_path / "rank-0-started"
    code = (
        "import os, pathlib, signal, sys, time\n"
        f"started = pathlib.Path({str(started)!r})\n"
        "if os.environ['FETCHML_NODE_RANK'] == '1':\n"
        "    while not started.exists(): time.sleep(0.05)\n"
        "    sys.exit(3)\n"
        "def on_term(*_):\n"
        "    time.sleep(1)\n"
        "    pathlib.Path(os.environ['FETCHML_OUTPUT_DIR'], 'checkpoint.txt').write_text('epoch 7')\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, on_term)\n"
        "started.touch()\n"
        "while True: time.sleep(0.05)"
    )
    with LiveSystem(tmp_path=tmp_path, database_url=database_url_for(connection)) as system:
        system.start_worker("node-a", key=agent_key, artifacts=True)
        system.start_worker("node-b", key=agent_key, artifacts=True)
        task = system.submit(owner_key, entrypoint=python_command(code), node_count=2, cancel_grace_seconds=20)
        failed = system.wait_for_status(owner_key, task["id"], "failed")
        status, artifacts = system.request("GET", f"/v1/tasks/{task['id']}/artifacts", key=owner_key)

    assert (failed["exit_code"], failed["failure_reason"]) == (3, "exit_code")
    assert status == 200
    assert "checkpoint.txt" in [artifact["path"] for artifact in artifacts]
