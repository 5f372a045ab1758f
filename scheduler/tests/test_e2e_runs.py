"""End to end over the real HTTP API: a live server with its scheduler and real worker agents running real processes.

Outcomes of single runs: completion with output and logs, failure, cancel, timeout.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from django.db import connection

from fetchml.testing import database_url_for
from scheduler.models import NodeAssignment
from scheduler.tests.live_system import LiveSystem, python_command, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def system(tmp_path: Path, agent_key: str):
    with LiveSystem(tmp_path=tmp_path, database_url=database_url_for(connection)) as live:
        live.start_worker("w1", key=agent_key)
        yield live


def test_submitted_task_completes_with_its_output_and_logs(system: LiveSystem, owner_key: str) -> None:
    code = "import sys\nfor i in range(5): print('epoch', i)\nprint('warn', file=sys.stderr)"
    task = system.submit(owner_key, entrypoint=python_command(code))
    done = system.wait_for_status(owner_key, task["id"], "completed")

    assert done["exit_code"] == 0
    assert done["output"].endswith("epoch 3\nepoch 4")
    assert (done["attempt"], done["retry_count"]) == (1, 0)
    status, logs = system.request("GET", f"/v1/tasks/{task['id']}/logs", key=owner_key)
    assert status == 200
    lines = logs["lines"]
    # Each stream keeps its order; the two streams interleave as the agent read them.
    assert [line["line"] for line in lines if line["stream"] == "stdout"] == [f"epoch {i}" for i in range(5)]
    assert [line["line"] for line in lines if line["stream"] == "stderr"] == ["warn"]


def test_failing_command_fails_with_its_exit_code_and_is_not_retried(system: LiveSystem, owner_key: str) -> None:
    code = "import sys\nprint('boom', file=sys.stderr)\nsys.exit(3)"
    task = system.submit(owner_key, entrypoint=python_command(code))
    failed = system.wait_for_status(owner_key, task["id"], "failed")

    assert (failed["exit_code"], failed["failure_reason"]) == (3, "exit_code")
    assert failed["error"] == "boom"
    assert (failed["attempt"], failed["retry_count"]) == (1, 0)
    assert NodeAssignment.objects.filter(task_id=task["id"]).count() == 1


def test_cancel_of_a_running_task_reaches_the_process_group_with_sigterm(
    system: LiveSystem, owner_key: str, tmp_path: Path
) -> None:
    started, marker = tmp_path / "started", tmp_path / "got-sigterm"
    code = (
        "import pathlib, signal, sys, time\n"
        f"def on_term(*_):\n    pathlib.Path({str(marker)!r}).write_text('bye')\n    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, on_term)\n"
        f"pathlib.Path({str(started)!r}).touch()\n"
        "while True: time.sleep(0.05)"
    )
    task = system.submit(owner_key, entrypoint=python_command(code), cancel_grace_seconds=20)
    system.wait_for_status(owner_key, task["id"], "running")
    wait_until(started.exists, what="the task's process to install its SIGTERM handler")

    asked = time.monotonic()
    status, _ = system.request("DELETE", f"/v1/tasks/{task['id']}", key=owner_key)
    assert status in (202, 204)
    wait_until(marker.exists, timeout=10, what="the SIGTERM handler's marker file")
    # The grace path ran (the handler wrote its marker) and promptly: no SIGKILL, no waiting on a poll.
    assert time.monotonic() - asked < 2.0
    cancelled = system.wait_for_status(owner_key, task["id"], "cancelled")
    assert cancelled["cancelled_by"] == "alice"
    assert cancelled["failure_reason"] == "cancelled"
    assert marker.read_text() == "bye"


def test_run_past_its_timeout_fails_with_reason_timeout(system: LiveSystem, owner_key: str) -> None:
    code = "import time\nprint('working', flush=True)\ntime.sleep(60)"
    task = system.submit(owner_key, entrypoint=python_command(code), timeout_seconds=1, cancel_grace_seconds=1)
    failed = system.wait_for_status(owner_key, task["id"], "failed")

    assert failed["failure_reason"] == "timeout"
    assert failed["retry_count"] == 0
