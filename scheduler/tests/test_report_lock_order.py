"""Lock order on PostgreSQL: a worker's reports never deadlock with a dispatch round, and a batch of
them read without locks is applied only if nothing changed its runs meanwhile."""

import threading
import time

import psycopg
import pytest
from django.db import connection, connections, transaction

from conftest import requires_postgres
from scheduler import services
from scheduler.dispatch import dispatch_round
from scheduler.services import STALE, StatusOutcome, apply_run_reports, assignment_status, end_run
from scheduler.tests.factories import assignments_of, queued_task, worker
from tasks.models import Task, TaskLogLine
from tasks.states import TaskStatus

pytestmark = [requires_postgres, pytest.mark.django_db(transaction=True)]

WAIT_SECONDS = 20.0


def _report_completed(assignment) -> None:
    outcome = assignment_status(
        worker_id=assignment.worker_id,
        task_id=str(assignment.task_id),
        token=str(assignment.token),
        status=TaskStatus.COMPLETED,
        exit_code=0,
    )
    assert outcome.accepted


def _backends_waiting_on_a_lock(monitor: psycopg.Connection) -> int:
    row = monitor.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    ).fetchone()
    return row[0]


def test_last_node_report_waits_for_a_round_holding_rank_zeros_worker_instead_of_deadlocking():
    for name in ("a", "b"):
        worker(name=name, batch_slots=1)
    gang = queued_task(node_count=2)
    assert dispatch_round() == 1
    rank0_worker = Task.objects.get(id=gang.id).worker_id
    first, last = sorted(assignments_of(gang), key=lambda a: a.worker_id != rank0_worker)
    _report_completed(first)  # rank 0 ends first; the run goes on until its last node ends

    # A dispatch round elsewhere: it has claimed rank 0's worker and will append to the audit chain last.
    params = connection.get_connection_params()
    round_connection = psycopg.connect(**params)
    # Autocommit: a transaction would see one cached snapshot of pg_stat_activity.
    monitor = psycopg.connect(**params, autocommit=True)
    round_connection.execute("SELECT id FROM scheduler_worker WHERE id = %s FOR UPDATE", [rank0_worker])
    failures: list[BaseException] = []

    def report_last_node() -> None:
        try:
            # preparing -> running -> completed: the task row changes twice in one transaction.
            _report_completed(last)
        except BaseException as exc:
            failures.append(exc)
        finally:
            connections.close_all()

    reporter = threading.Thread(target=report_last_node)
    reporter.start()
    try:
        deadline = time.monotonic() + WAIT_SECONDS
        while _backends_waiting_on_a_lock(monitor) == 0:
            assert reporter.is_alive(), failures
            assert time.monotonic() < deadline, "the report never waited for the round's lock"
            time.sleep(0.01)
        round_connection.execute("SELECT id FROM audit_chainhead WHERE id = 1 FOR UPDATE")
        round_connection.commit()
    finally:
        round_connection.close()
        monitor.close()
        reporter.join(WAIT_SECONDS)

    assert not reporter.is_alive()
    assert failures == []
    assert Task.objects.get(id=gang.id).status == TaskStatus.COMPLETED


class _PausedBeforeWriting:
    """Holds the first report batch between its read and its write until `go` is set."""

    def __init__(self, monkeypatch) -> None:
        self.read, self.go = threading.Event(), threading.Event()
        real_write = services._Batched.write
        paused = self

        def write(batch) -> None:
            if not paused.read.is_set():
                paused.read.set()
                assert paused.go.wait(WAIT_SECONDS)
            real_write(batch)

        monkeypatch.setattr(services._Batched, "write", write)

    def run(self, report: dict, worker_id) -> tuple[threading.Thread, list]:
        outcomes: list = []

        def apply() -> None:
            try:
                outcomes.extend(apply_run_reports(worker_id=worker_id, reports=[report]))
            finally:
                connections.close_all()

        thread = threading.Thread(target=apply)
        thread.start()
        assert self.read.wait(WAIT_SECONDS)
        return thread, outcomes


def _completed(assignment) -> dict:
    return {
        "type": "status",
        "task_id": str(assignment.task_id),
        "token": str(assignment.token),
        "status": TaskStatus.COMPLETED,
        "exit_code": 0,
        "failure_reason": "",
        "error": "",
        "output": "",
    }


def test_a_run_taken_away_between_a_batchs_read_and_its_write_is_answered_stale(monkeypatch):
    box = worker(batch_slots=1)
    task = queued_task(max_retries=3)
    assert dispatch_round() == 1
    [assignment] = assignments_of(task)
    paused = _PausedBeforeWriting(monkeypatch)

    thread, outcomes = paused.run(_completed(assignment), box.id)
    try:
        # Meanwhile the server takes the run away (as a lease expiry would) and commits.
        assert end_run(assignment_id=assignment.id, reason=Task.FailureReason.WORKER_LOST, error="lease")
    finally:
        paused.go.set()
        thread.join(WAIT_SECONDS)

    assert not thread.is_alive()
    assert outcomes == [STALE]
    task.refresh_from_db()
    assert (task.status, task.retry_count) == (TaskStatus.QUEUED, 1)
    box.refresh_from_db()
    assert box.used_batch_slots == 0  # freed once, by the server


def test_a_round_claims_the_worker_while_a_batch_of_its_reports_is_being_read(monkeypatch):
    box = worker(batch_slots=2)
    first = queued_task()
    assert dispatch_round() == 1
    [assignment] = assignments_of(first)
    paused = _PausedBeforeWriting(monkeypatch)

    thread, outcomes = paused.run(_completed(assignment), box.id)
    try:
        second = queued_task()
        assert dispatch_round() == 1  # the worker is not locked by the batch
    finally:
        paused.go.set()
        thread.join(WAIT_SECONDS)

    assert not thread.is_alive()
    assert outcomes == [StatusOutcome(accepted=True)]
    assert Task.objects.get(id=first.id).status == TaskStatus.COMPLETED
    assert Task.objects.get(id=second.id).status == TaskStatus.PREPARING
    box.refresh_from_db()
    assert box.used_batch_slots == 1


def _log_report(assignment, line: str, seq: int) -> dict:
    lines = [{"stream": "stdout", "line": line}]
    return {
        "type": "log",
        "task_id": str(assignment.task_id),
        "token": str(assignment.token),
        "lines": lines,
        "seq": seq,
    }


def test_a_nodes_log_lines_wait_for_another_nodes_uncommitted_lines_of_the_same_task():
    for name in ("a", "b"):
        worker(name=name, batch_slots=1)
    gang = queued_task(node_count=2)
    assert dispatch_round() == 1
    first, second = sorted(assignments_of(gang), key=lambda a: a.node_id)
    monitor = psycopg.connect(**connection.get_connection_params(), autocommit=True)
    stored, release = threading.Event(), threading.Event()
    failures: list[BaseException] = []

    def append(assignment, line: str, *, hold: bool) -> None:
        try:
            # Held open after storing its lines: a commit that comes late.
            with transaction.atomic():
                assert apply_run_reports(worker_id=assignment.worker_id, reports=[_log_report(assignment, line, 0)])
                if hold:
                    stored.set()
                    release.wait(WAIT_SECONDS)
        except BaseException as exc:
            failures.append(exc)
        finally:
            connections.close_all()

    slow = threading.Thread(target=append, args=(first, "from rank 0"), kwargs={"hold": True})
    slow.start()
    try:
        assert stored.wait(WAIT_SECONDS), failures
        quick = threading.Thread(target=append, args=(second, "from rank 1"), kwargs={"hold": False})
        quick.start()
        deadline = time.monotonic() + WAIT_SECONDS
        while _backends_waiting_on_a_lock(monitor) == 0:
            # Committed while rank 0's lines were not: a follower past them would never see those.
            assert quick.is_alive(), "rank 1's lines were committed before rank 0's, which have lower ids"
            assert time.monotonic() < deadline, "rank 1's append never waited"
            time.sleep(0.01)
    finally:
        release.set()
        slow.join()
        monitor.close()
    quick.join()

    assert failures == []
    lines = TaskLogLine.objects.filter(task_id=gang.id).order_by("id")
    assert [(line.node_id, line.line) for line in lines] == [(0, "from rank 0"), (1, "from rank 1")]
