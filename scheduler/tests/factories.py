"""Factories and small helpers for the scheduler's tests."""

from datetime import datetime

from django.utils import timezone

from fetchml.tests.factories import UserFactory
from scheduler.dispatch import dispatch_round
from scheduler.models import NodeAssignment, Worker
from scheduler.services import assignment_status
from tasks.models import Task
from tasks.services import dispatch_key
from tasks.tests.factories import TaskFactory, WorkerFactory

__all__ = ["TaskFactory", "UserFactory", "WorkerFactory", "assignments_of", "queued_task", "run_started", "worker"]


def queued_task(*, priority: int = 5, queued_at: datetime | None = None, **fields) -> Task:
    """A queued task with the dispatch key `task_submit` would give it."""
    queued_at = queued_at or timezone.now()
    return TaskFactory(
        priority=priority,
        created_at=queued_at,
        queued_at=queued_at,
        dispatch_key=dispatch_key(priority=priority, queued_at=queued_at),
        **fields,
    )


def worker(**fields) -> Worker:
    """An active worker with a fresh heartbeat; no GPUs and one batch slot unless told."""
    defaults = {"cpu_cores": 8, "memory_gb": 32, "gpu_count": 0, "batch_slots": 1, "service_slots": 0}
    return WorkerFactory(**{**defaults, **fields})


def assignments_of(task: Task) -> list[NodeAssignment]:
    return list(NodeAssignment.objects.filter(task=task).order_by("attempt", "node_id"))


def run_started(task: Task) -> NodeAssignment:
    """Dispatch `task` and report it running; returns its assignment."""
    dispatch_round()
    assignment = assignments_of(task)[-1]
    assert assignment_status(
        worker_id=assignment.worker_id, task_id=str(task.id), token=str(assignment.token), status="running"
    ).accepted
    return assignment
