"""End to end: the embedded `serve` with its own worker, a server crash, and the scheduler losing its database."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from django.db import connection, connections, transaction

from audit.models import AuditEvent
from conftest import requires_postgres
from fetchml.testing import ThreadedGate, database_url_for
from scheduler.models import NodeAssignment, Worker
from scheduler.tests.live_system import (
    SCHEDULER_APPLICATION_NAME,
    SERVER_APPLICATION_NAME,
    LiveSystem,
    python_command,
    wait_until,
)
from tasks.models import Task

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def _gated_command(gate: Path, output: str = "done") -> str:
    """A run that waits until `gate` exists, then prints `output`."""
    return python_command(
        f"import os, time\nwhile not os.path.exists({str(gate)!r}): time.sleep(0.02)\nprint({output!r})"
    )


def _running_gated_tasks(
    system: LiveSystem, owner_key: str, agent_key: str, gate: Path, *, count: int, output: str = "done"
) -> list[dict]:
    """Two workers of two slots each, running `count` tasks that wait for `gate`."""
    system.start_worker("a", key=agent_key, slots=2)
    system.start_worker("b", key=agent_key, slots=2)
    tasks = [system.submit(owner_key, entrypoint=_gated_command(gate, output)) for _ in range(count)]
    for task in tasks:
        system.wait_for_task(owner_key, task["id"], lambda t: t["status"] == "running")
    return tasks


def test_serve_with_one_local_worker_runs_a_submitted_task_under_its_var_directory(
    tmp_path: Path, owner_key: str
) -> None:
    with LiveSystem(tmp_path=tmp_path, database_url=database_url_for(connection), serve_workers=1) as system:
        task = system.submit(owner_key, entrypoint=python_command("import os; print(os.environ['FETCHML_WORK_DIR'])"))
        done = system.wait_for_status(owner_key, task["id"], "completed", timeout=60)

    worker_name = Worker.objects.get(id=done["worker_id"]).name
    assert worker_name.endswith("-local-1")
    # FETCHML_VAR_DIR holds the local workers' runs too: two checkouts on one machine share nothing.
    assert Path(done["output"]).is_relative_to((tmp_path / "var" / "work" / worker_name).resolve())
    assert (tmp_path / "var" / "local-worker.key").exists()


@requires_postgres
def test_runs_survive_a_crash_and_restart_of_the_server(tmp_path: Path, owner_key: str, agent_key: str) -> None:
    gate = tmp_path / "gate"
    with LiveSystem(tmp_path=tmp_path, database_url=database_url_for(connection)) as system:
        tasks = _running_gated_tasks(system, owner_key, agent_key, gate, count=3, output="survived")

        system.kill_server()
        crashed_at = time.time()
        system.start_server()  # same port: the agents reconnect on their own
        wait_until(
            lambda: all(w.connected_at.timestamp() > crashed_at for w in Worker.objects.all()),
            what="both workers to reconnect",
        )
        after = system.submit(owner_key, entrypoint=_gated_command(gate, "survived"))
        gate.touch()
        done = [system.wait_for_status(owner_key, task["id"], "completed") for task in [*tasks, after]]

    assert [task["output"] for task in done] == ["survived"] * 4
    # Nothing was lost or retried: each run is the first and only attempt.
    assert [(task["attempt"], task["retry_count"]) for task in done] == [(1, 0)] * 4
    for task in done:
        assert list(NodeAssignment.objects.filter(task_id=task["id"]).values_list("status", flat=True)) == ["finished"]


def _terminate_backends(application_name: str) -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = %s",
            [application_name],
        )
        return cursor.fetchone()[0]


@requires_postgres
def test_runs_finishing_while_the_server_loses_its_database_connections_complete_once(
    tmp_path: Path, owner_key: str, agent_key: str
) -> None:
    gate = tmp_path / "gate"
    # Staggered ends, so that reports keep arriving while the connections are being killed.
    code = (
        "import os, sys, time\n"
        f"while not os.path.exists({str(gate)!r}): time.sleep(0.02)\n"
        "print('begin', sys.argv[1])\ntime.sleep(float(sys.argv[1]))\nprint('done', sys.argv[1])"
    )
    with LiveSystem(tmp_path=tmp_path, database_url=database_url_for(connection)) as system:
        system.start_worker("a", key=agent_key, slots=6)
        system.start_worker("b", key=agent_key, slots=6)
        delays = [f"{0.1 * i:.1f}" for i in range(12)]
        tasks = [system.submit(owner_key, entrypoint=python_command(code), args=delay) for delay in delays]
        for task in tasks:
            system.wait_for_task(owner_key, task["id"], lambda t: t["status"] == "running")
        watch = system.watch(owner_key)  # a client told of each run's end, as the runs end
        for task in tasks:
            watch.subscribe(task["id"])

        gate.touch()
        terminated = []
        try:
            for _ in range(100):  # about two seconds: through every run's end
                terminated.append(_terminate_backends(SERVER_APPLICATION_NAME))
                time.sleep(0.02)
        finally:
            connections.close_all()
        done = [system.wait_for_status(owner_key, task["id"], "completed") for task in tasks]
        try:
            watch.wait_for_completions([task["id"] for task in tasks])
        finally:
            watch.close()
        # Every line reaches the log API once, though some batches had to be sent again.
        logs = [system.request("GET", f"/v1/tasks/{task['id']}/logs", key=owner_key)[1]["lines"] for task in tasks]

    assert sum(terminated) > 0, "no server connection was terminated"
    assert [task["output"].split() for task in done] == [["begin", delay, "done", delay] for delay in delays]
    assert [sorted((line["seq"], line["line"]) for line in lines) for lines in logs] == [
        [(0, f"begin {delay}"), (1, f"done {delay}")] for delay in delays
    ]
    assert [(task["attempt"], task["retry_count"]) for task in done] == [(1, 0)] * len(tasks)
    for task in done:
        assert list(NodeAssignment.objects.filter(task_id=task["id"]).values_list("status", flat=True)) == ["finished"]
    assert not Worker.objects.exclude(used_batch_slots=0).exists()


@requires_postgres
@pytest.mark.skipif(not os.environ.get("REDIS_URL"), reason="a separate scheduler process needs REDIS_URL")
def test_runs_on_a_server_frozen_past_the_lease_are_retried_and_complete_once(
    tmp_path: Path, owner_key: str, agent_key: str
) -> None:
    gate = tmp_path / "gate"
    system = LiveSystem(
        tmp_path=tmp_path,
        database_url=database_url_for(connection),
        separate_scheduler=True,
        env={"FETCHML_WORKER_LEASE_SECONDS": "3"},
    )
    with system:
        tasks = _running_gated_tasks(system, owner_key, agent_key, gate, count=4)
        system.server.signal(signal.SIGSTOP)
        try:
            # Nobody hears the workers: the scheduler takes their runs away when the lease runs out.
            wait_until(lambda: not Worker.objects.filter(status=Worker.Status.ACTIVE).exists(), what="the lease")
        finally:
            system.server.signal(signal.SIGCONT)
        gate.touch()  # the first runs end too, and report to a server that took them away
        done = [system.wait_for_status(owner_key, task["id"], "completed", timeout=60) for task in tasks]
        server_output = system.server.output()

    for task in done:
        runs = list(NodeAssignment.objects.filter(task_id=task["id"]).values_list("attempt", "status"))
        assert runs == [(1, "lost"), (2, "finished")], (task["id"], runs)
    assert AuditEvent.objects.filter(event_type="job_completed").count() == len(tasks)
    assert not Worker.objects.exclude(used_batch_slots=0).exists()
    assert "Exception inside application" not in server_output


def _placement_violations() -> list[str]:
    """Tasks not either queued without a live assignment or active with exactly one, in one snapshot."""
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        live: dict[str, list[int]] = {}
        for task_id, attempt in NodeAssignment.objects.filter(holds_capacity=True).values_list("task_id", "attempt"):
            live.setdefault(str(task_id), []).append(attempt)
        problems = []
        for task_id, status, attempt in Task.objects.values_list("id", "status", "attempt"):
            held = live.get(str(task_id), [])
            if status == "queued" and held:
                problems.append(f"{task_id} queued but holds {held}")
            if status in ("preparing", "running", "collecting") and held != [attempt]:
                problems.append(f"{task_id} {status} attempt {attempt} holds {held}")
        return problems


@requires_postgres
@pytest.mark.skipif(not os.environ.get("REDIS_URL"), reason="a separate scheduler process needs REDIS_URL")
def test_scheduler_losing_its_database_connections_mid_dispatch_places_each_task_once_and_recovers(
    tmp_path: Path, owner_key: str, agent_key: str
) -> None:
    with LiveSystem(tmp_path=tmp_path, database_url=database_url_for(connection), separate_scheduler=True) as system:
        system.start_worker("a", key=agent_key, slots=3)
        system.start_worker("b", key=agent_key, slots=3)
        terminated, violations = [], []
        stop = threading.Event()

        def kill_repeatedly() -> None:
            try:
                while not stop.is_set() and len(terminated) < 12:
                    terminated.append(_terminate_backends(SCHEDULER_APPLICATION_NAME))
                    violations.extend(_placement_violations())
                    stop.wait(0.15)
            finally:
                connections.close_all()

        killer = threading.Thread(target=kill_repeatedly)
        killer.start()
        try:
            tasks = [system.submit(owner_key, entrypoint="sleep 0.1") for _ in range(40)]
        finally:
            killer.join(timeout=30)
            stop.set()
            killer.join()
        done = [system.wait_for_status(owner_key, task["id"], "completed", timeout=60) for task in tasks]

    assert sum(terminated) > 0, "no scheduler connection was terminated"
    assert violations == []
    assert _placement_violations() == []
    for task in done:
        runs = list(NodeAssignment.objects.filter(task_id=task["id"]).values_list("attempt", "status"))
        assert runs == [(task["attempt"], "finished")], (task["id"], runs)
    assert not Worker.objects.exclude(used_batch_slots=0).exists()


@requires_postgres
@pytest.mark.skipif(not os.environ.get("REDIS_URL"), reason="needs REDIS_URL: the channel layer is what goes away")
def test_runs_go_on_while_redis_is_out_of_reach_for_longer_than_the_lease(
    tmp_path: Path, owner_key: str, agent_key: str
) -> None:
    gate_file = tmp_path / "gate"
    lease = 3.0
    with ThreadedGate(os.environ["REDIS_URL"]) as redis_gate:
        system = LiveSystem(
            tmp_path=tmp_path,
            database_url=database_url_for(connection),
            separate_scheduler=True,
            env={"REDIS_URL": redis_gate.url, "FETCHML_WORKER_LEASE_SECONDS": str(lease)},
        )
        with system:
            tasks = _running_gated_tasks(system, owner_key, agent_key, gate_file, count=4)
            redis_gate.shut()
            try:
                gone_at = time.monotonic()
                while time.monotonic() < gone_at + 2 * lease:  # the scheduler checks the leases meanwhile
                    assert Worker.objects.filter(status=Worker.Status.ACTIVE).count() == 2, system.outputs()
                    time.sleep(0.2)
            finally:
                redis_gate.open()
            gate_file.touch()
            done = [system.wait_for_status(owner_key, task["id"], "completed") for task in tasks]

    assert [(task["attempt"], task["retry_count"]) for task in done] == [(1, 0)] * len(tasks)
    for task in done:
        assert list(NodeAssignment.objects.filter(task_id=task["id"]).values_list("status", flat=True)) == ["finished"]


@requires_postgres
@pytest.mark.skipif(not os.environ.get("REDIS_URL"), reason="needs REDIS_URL: the channel layer is what falls silent")
def test_a_task_submitted_while_redis_is_silent_is_accepted_and_runs_once_it_answers(
    tmp_path: Path, owner_key: str, agent_key: str
) -> None:
    with ThreadedGate(os.environ["REDIS_URL"]) as redis_gate:
        system = LiveSystem(
            tmp_path=tmp_path,
            database_url=database_url_for(connection),
            separate_scheduler=True,
            env={"REDIS_URL": redis_gate.url},
        )
        with system:
            worker = system.start_worker("a", key=agent_key)
            # Welcomed, not only registered: the welcome follows the connection's group join,
            # which a silent Redis would hold up past the lease.
            wait_until(lambda: "connected to" in worker.output(), what="the agent to be welcomed")
            redis_gate.mute()  # connections stay open, nothing comes back
            try:
                # Answered within the client's 15 s: the publication after its commit gives up
                # after a short time-out (the receive's own socket waits 15 s, twice for two kinds).
                task = system.submit(owner_key, entrypoint="true")
                assert Worker.objects.filter(status=Worker.Status.ACTIVE).count() == 1
            finally:
                redis_gate.mute(False)
            done = system.wait_for_status(owner_key, task["id"], "completed", timeout=60)

    assert (done["attempt"], done["retry_count"]) == (1, 0)


@requires_postgres
def test_runs_go_on_while_the_database_is_out_of_reach_for_longer_than_the_lease(
    tmp_path: Path, owner_key: str, agent_key: str
) -> None:
    gate_file = tmp_path / "gate"
    lease = 3.0
    with ThreadedGate(database_url_for(connection)) as database_gate:
        system = LiveSystem(
            tmp_path=tmp_path, database_url=database_gate.url, env={"FETCHML_WORKER_LEASE_SECONDS": str(lease)}
        )
        with system:
            tasks = _running_gated_tasks(system, owner_key, agent_key, gate_file, count=4)
            database_gate.shut()
            time.sleep(2 * lease)  # the outage: no heartbeat can be recorded
            database_gate.open()
            gate_file.touch()
            done = [system.wait_for_status(owner_key, task["id"], "completed", timeout=60) for task in tasks]

    # Silent to a scheduler that could not hear them either, the workers kept their leases and runs.
    assert [(task["attempt"], task["retry_count"]) for task in done] == [(1, 0)] * len(tasks)
    for task in done:
        assert list(NodeAssignment.objects.filter(task_id=task["id"]).values_list("status", flat=True)) == ["finished"]


def _cut_redis_connections(client_name: str) -> int:
    """Close every Redis connection named `client_name` from the server's side, as a restart of Redis would."""
    import redis

    with redis.Redis.from_url(os.environ["REDIS_URL"]) as admin:
        return sum(
            admin.client_kill_filter(_id=client["id"])
            for client in admin.client_list()
            if client["name"] == client_name
        )


@requires_postgres
@pytest.mark.skipif(not os.environ.get("REDIS_URL"), reason="needs REDIS_URL: the channel layer is what is cut")
def test_tasks_submitted_while_the_channel_layer_connections_are_cut_each_run_once(
    tmp_path: Path, owner_key: str, agent_key: str
) -> None:
    name = "fetchml-e2e-layer"
    redis_url = os.environ["REDIS_URL"] + ("&" if "?" in os.environ["REDIS_URL"] else "?") + f"client_name={name}"
    system = LiveSystem(
        tmp_path=tmp_path,
        database_url=database_url_for(connection),
        separate_scheduler=True,
        env={"REDIS_URL": redis_url},
    )
    with system:
        system.start_worker("a", key=agent_key, slots=3)
        system.start_worker("b", key=agent_key, slots=3)
        cut, stop = [], threading.Event()

        def cut_repeatedly() -> None:
            while not stop.is_set():
                cut.append(_cut_redis_connections(name))
                stop.wait(0.1)

        # A client watching its tasks, as a CLI waiting for them would: told of each one's end.
        watch = system.watch(owner_key)
        cutter = threading.Thread(target=cut_repeatedly)
        cutter.start()
        try:
            tasks = []
            for _ in range(40):
                tasks.append(system.submit(owner_key, entrypoint="sleep 0.1"))
                watch.subscribe(tasks[-1]["id"])
        finally:
            stop.set()
            cutter.join()
        done = [system.wait_for_status(owner_key, task["id"], "completed", timeout=60) for task in tasks]
        try:
            watch.wait_for_completions([task["id"] for task in tasks])
        finally:
            watch.close()

    assert sum(cut) > 0, "no channel-layer connection was cut"
    for task in done:
        runs = list(NodeAssignment.objects.filter(task_id=task["id"]).values_list("attempt", "status"))
        assert runs == [(task["attempt"], "finished")], (task["id"], runs)
    assert not Worker.objects.exclude(used_batch_slots=0).exists()
