"""PostgreSQL-only: a batch of run reports finds its rows by key, whatever the planner's statistics say."""

import pytest
from django.db import connection
from django.utils import timezone

from conftest import requires_postgres
from scheduler.dispatch import dispatch_round
from scheduler.models import NodeAssignment
from scheduler.services import StatusOutcome, apply_run_reports
from scheduler.tests.factories import UserFactory, assignments_of, queued_task, worker
from scheduler.tests.plans import plans_of
from tasks.models import Task

pytestmark = [requires_postgres, pytest.mark.django_db]


def _finished_runs(box, owner, count: int) -> None:
    now = timezone.now()
    tasks = Task.objects.bulk_create(
        [Task(owner=owner, job_name=f"done-{i}", status="completed", dispatch_key=0.0) for i in range(count)]
    )
    NodeAssignment.objects.bulk_create(
        [
            NodeAssignment(task=task, attempt=1, worker=box, status="finished", holds_capacity=False, ended_at=now)
            for task in tasks
        ]
    )


def _live_runs_elsewhere(owner, count: int) -> None:
    """`count` tasks preparing on another worker, each with its live run."""
    elsewhere = worker(name="elsewhere", cpu_cores=4096, memory_gb=4096, batch_slots=count, used_batch_slots=count)
    tasks = Task.objects.bulk_create(
        [Task(owner=owner, job_name=f"busy-{i}", status="preparing", dispatch_key=0.0) for i in range(count)]
    )
    NodeAssignment.objects.bulk_create([NodeAssignment(task=task, attempt=1, worker=elsewhere) for task in tasks])


def _completions_of_dispatched(owner, count: int) -> list[dict]:
    tasks = [queued_task(owner=owner) for _ in range(count)]
    assert dispatch_round() == count
    return [
        {"type": "status", "task_id": str(task.id), "token": str(assignments_of(task)[0].token)}
        | {"status": "completed", "exit_code": 0, "failure_reason": "", "error": "", "output": ""}
        for task in tasks
    ]


def test_a_batch_reads_its_runs_by_task_when_the_table_was_never_analyzed():
    # A new database, or a burst the statistics have not seen: the planner takes the worker's
    # index to be the narrower, and would read the worker's whole history through it.
    owner = UserFactory()
    box = worker(cpu_cores=256, memory_gb=256, batch_slots=32)
    _finished_runs(box, owner, 5000)
    reports = _completions_of_dispatched(owner, 32)

    with plans_of('SELECT "scheduler_nodeassignment"') as plans:
        outcomes = apply_run_reports(worker_id=box.id, reports=reports)

    assert outcomes == [StatusOutcome(accepted=True)] * 32
    assert len(plans) == 1, plans
    assert "assignment_once_per_node_attempt" in plans[0], plans[0]


@pytest.mark.parametrize("table", ["tasks_task", "scheduler_nodeassignment"])
def test_a_batch_writes_its_tasks_and_runs_by_primary_key_when_the_statistics_have_not_seen_a_burst(table):
    # Statistics taken while nothing ran, then thousands of tasks started: the planner takes
    # "preparing" (and "holds capacity") for a handful of rows and would find the batch's rows
    # through the index of states (or of live runs), reading every task started since.
    owner = UserFactory()
    box = worker(cpu_cores=256, memory_gb=256, batch_slots=32)
    _finished_runs(box, owner, 200)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE tasks_task; ANALYZE scheduler_nodeassignment")
    _live_runs_elsewhere(owner, 3000)
    reports = _completions_of_dispatched(owner, 32)

    with plans_of(f'UPDATE "{table}"') as plans:
        outcomes = apply_run_reports(worker_id=box.id, reports=reports)

    assert outcomes == [StatusOutcome(accepted=True)] * 32
    assert len(plans) == 1, plans
    assert f"Index Scan on {table}_pkey" in plans[0], plans[0]
    assert "Seq Scan" not in plans[0] and "BitmapAnd" not in plans[0], plans[0]
