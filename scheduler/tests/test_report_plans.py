"""PostgreSQL-only: a batch of run reports reads its runs by task, however long its worker's history."""

import pytest
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


def test_a_batch_reads_its_runs_by_task_when_the_table_was_never_analyzed():
    # A new database, or a burst the statistics have not seen: the planner takes the worker's
    # index to be the narrower, and would read the worker's whole history through it.
    owner = UserFactory()
    box = worker(cpu_cores=256, memory_gb=256, batch_slots=32)
    _finished_runs(box, owner, 5000)
    tasks = [queued_task(owner=owner) for _ in range(32)]
    assert dispatch_round() == 32
    runs = [(str(task.id), str(assignments_of(task)[0].token)) for task in tasks]
    reports = [
        {"type": "status", "task_id": task_id, "token": token, "status": "completed"}
        | {"exit_code": 0, "failure_reason": "", "error": "", "output": ""}
        for task_id, token in runs
    ]

    with plans_of('SELECT "scheduler_nodeassignment"') as plans:
        outcomes = apply_run_reports(worker_id=box.id, reports=reports)

    assert outcomes == [StatusOutcome(accepted=True)] * 32
    assert len(plans) == 1, plans
    assert "assignment_once_per_node_attempt" in plans[0], plans[0]
