"""Lock order on PostgreSQL: a worker's report never deadlocks with a dispatch round."""

import threading
import time

import psycopg
import pytest
from django.db import connection, connections

from conftest import requires_postgres
from scheduler.dispatch import dispatch_round
from scheduler.services import assignment_status
from scheduler.tests.factories import assignments_of, queued_task, worker
from tasks.models import Task
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
