"""End to end: what happens to runs when worker agents die, freeze, drain or are stopped."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from django.db import connection

from audit.models import AuditEvent
from fetchml.auth import Actor
from fetchml.testing import database_url_for
from scheduler.models import NodeAssignment, Worker
from scheduler.services import worker_drain
from scheduler.tests.agent_peer import process_gone
from scheduler.tests.live_system import LiveSystem, python_command, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

SHORT_LEASE = {"FETCHML_WORKER_LEASE_SECONDS": "3"}


def gated(tmp_path: Path) -> str:
    """A task that records its pid under pids/<attempt>, waits for the file `gate`, then prints its work dir."""
    (tmp_path / "pids").mkdir(exist_ok=True)
    code = (
        "import os, pathlib, time\n"
        "work = pathlib.Path(os.environ['FETCHML_WORK_DIR'])\n"
        f"pathlib.Path({str(tmp_path / 'pids')!r}, work.name).write_text(str(os.getpid()))\n"
        f"while not os.path.exists({str(tmp_path / 'gate')!r}): time.sleep(0.02)\n"
        "print(work)"
    )
    return python_command(code)


def worker_id(name: str) -> str:
    return str(Worker.objects.get(name=name).id)


def runs_of(task_id: str) -> list[tuple[int, str, str]]:
    rows = NodeAssignment.objects.filter(task_id=task_id).order_by("attempt")
    return [(row.attempt, row.worker.name, row.status) for row in rows.select_related("worker")]


def test_run_of_a_killed_worker_is_retried_on_another_worker_after_the_lease(
    tmp_path: Path, owner_key: str, agent_key: str
) -> None:
    with LiveSystem(tmp_path=tmp_path, database_url=database_url_for(connection), env=SHORT_LEASE) as system:
        first = system.start_worker("a", key=agent_key)
        task = system.submit(owner_key, entrypoint=gated(tmp_path))
        system.wait_for_task(owner_key, task["id"], lambda t: t["status"] == "running")
        child_pid = int(wait_until(lambda: _read(tmp_path / "pids" / "1"), what="the run's pid"))
        system.start_worker("b", key=agent_key)

        first.process.kill()  # kill -9 of the agent: its run dies with it (scheduler/agent/orphans.py)
        first.process.wait()
        wait_until(lambda: process_gone(child_pid), timeout=5, what="the run to die with its agent")
        (tmp_path / "gate").touch()
        done = system.wait_for_status(owner_key, task["id"], "completed")

    assert done["worker_id"] == worker_id("b")
    assert (done["attempt"], done["retry_count"]) == (2, 1)
    assert Path(done["output"]).parts[-3:] == ("work-b", task["id"], "2")
    assert runs_of(task["id"]) == [(1, "a", "lost"), (2, "b", "finished")]


def test_late_completion_of_a_frozen_worker_is_refused_after_its_run_was_reassigned(
    tmp_path: Path, owner_key: str, agent_key: str
) -> None:
    with LiveSystem(tmp_path=tmp_path, database_url=database_url_for(connection), env=SHORT_LEASE) as system:
        frozen = system.start_worker("a", key=agent_key)
        task = system.submit(owner_key, entrypoint=gated(tmp_path))
        system.wait_for_task(owner_key, task["id"], lambda t: t["status"] == "running")
        frozen.signal(signal.SIGSTOP)
        system.start_worker("b", key=agent_key)
        b_id = worker_id("b")
        system.wait_for_task(
            owner_key, task["id"], lambda t: t["status"] == "running" and t["worker_id"] == b_id, timeout=30
        )

        # Both runs finish now; the frozen agent's child too, while its agent cannot report it.
        (tmp_path / "gate").touch()
        done = system.wait_for_status(owner_key, task["id"], "completed")
        frozen.signal(signal.SIGCONT)
        frozen.signal(signal.SIGTERM)  # drain: exits 0 only once its held final report was settled
        assert frozen.wait_exit() == 0
        late = frozen.output()
        final = system.task(owner_key, task["id"])
        server_output = system.server.output()

    assert f"task {task['id']} finished: completed" in late  # it did try to report its run
    # Its connection was closed when its lease expired (4012, which daphne accepts from an application).
    assert "Exception inside application" not in server_output
    assert final == done  # the late report changed nothing
    assert (final["worker_id"], final["attempt"], final["retry_count"]) == (b_id, 2, 1)
    assert Path(final["output"]).parts[-3:] == ("work-b", task["id"], "2")
    assert runs_of(task["id"]) == [(1, "a", "lost"), (2, "b", "finished")]
    completions = AuditEvent.objects.filter(resource=f"task:{task['id']}", event_type="job_completed")
    assert completions.count() == 1


def test_drained_worker_takes_no_new_work_finishes_its_run_and_goes_offline(
    tmp_path: Path, owner_key: str, agent_key: str, admin_user
) -> None:
    with LiveSystem(tmp_path=tmp_path, database_url=database_url_for(connection)) as system:
        system.start_worker("a", key=agent_key, slots=2)
        running = system.submit(owner_key, entrypoint=gated(tmp_path))
        system.wait_for_task(owner_key, running["id"], lambda t: t["status"] == "running")

        worker_drain(worker=Worker.objects.get(name="a"), actor=Actor(user=admin_user, role="admin"))
        # "a" still has a free slot, but the new task waits for "b".
        later = system.submit(owner_key, entrypoint="true")
        system.start_worker("b", key=agent_key)
        moved = system.wait_for_status(owner_key, later["id"], "completed")
        assert moved["worker_id"] == worker_id("b")
        assert system.task(owner_key, running["id"])["status"] == "running"
        assert Worker.objects.get(name="a").status == Worker.Status.DRAINING

        (tmp_path / "gate").touch()
        finished = system.wait_for_status(owner_key, running["id"], "completed")
        wait_until(
            lambda: Worker.objects.get(name="a").status == Worker.Status.OFFLINE, what="the drained worker offline"
        )

    assert finished["worker_id"] == worker_id("a")
    assert runs_of(running["id"]) == [(1, "a", "finished")]


def test_sigterm_of_a_worker_lets_its_run_finish_and_report_then_exits_zero(
    tmp_path: Path, owner_key: str, agent_key: str
) -> None:
    with LiveSystem(tmp_path=tmp_path, database_url=database_url_for(connection)) as system:
        agent = system.start_worker("a", key=agent_key)
        task = system.submit(owner_key, entrypoint=gated(tmp_path))
        system.wait_for_task(owner_key, task["id"], lambda t: t["status"] == "running")

        agent.signal(signal.SIGTERM)
        wait_until(
            lambda: Worker.objects.filter(name="a", status=Worker.Status.DRAINING).exists(),
            what="the agent to announce that it is draining",
        )
        (tmp_path / "gate").touch()
        done = system.wait_for_status(owner_key, task["id"], "completed")
        assert agent.wait_exit() == 0

    assert (done["attempt"], done["retry_count"]) == (1, 0)
    assert runs_of(task["id"]) == [(1, "a", "finished")]


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""
