"""A draining agent says so: no new work for it, and runs it never acknowledged go straight back."""

import pytest

from audit.models import AuditEvent
from fetchml.auth import Actor
from scheduler.dispatch import dispatch_round
from scheduler.models import NodeAssignment, Worker
from scheduler.services import assignment_ack, assignment_status, worker_announced_drain, worker_heartbeat
from scheduler.tests.factories import assignments_of, queued_task, worker
from tasks.models import Task
from tasks.services import task_cancel
from tasks.states import TaskStatus

pytestmark = pytest.mark.django_db


def _dispatched(task: Task) -> NodeAssignment:
    assert dispatch_round() >= 1
    return assignments_of(task)[-1]


def test_unacknowledged_run_goes_back_to_the_queue_without_a_retry():
    box = worker(batch_slots=1)
    task = queued_task()
    assignment = _dispatched(task)

    assert worker_announced_drain(worker_id=box.id) == 1

    task.refresh_from_db()
    assignment.refresh_from_db()
    box.refresh_from_db()
    assert (task.status, task.retry_count, task.worker_id) == (TaskStatus.QUEUED, 0, None)
    assert (assignment.status, assignment.holds_capacity) == (NodeAssignment.Status.LOST, False)
    assert (box.status, box.used_batch_slots) == (Worker.Status.OFFLINE, 0)
    assert AuditEvent.objects.filter(event_type="job_requeued", action="handed_back").count() == 1


def test_handed_back_run_starts_on_another_worker_and_its_late_ack_is_stale():
    box = worker(name="a", batch_slots=1)
    task = queued_task()
    first = _dispatched(task)
    worker_announced_drain(worker_id=box.id)
    other = worker(name="b", batch_slots=1)

    second = _dispatched(task)

    assert second.worker_id == other.id
    assert not assignment_ack(worker_id=box.id, task_id=str(task.id), token=str(first.token))


def test_acknowledged_runs_keep_going_and_the_worker_takes_nothing_new():
    box = worker(batch_slots=2)
    task = queued_task()
    assignment = _dispatched(task)
    assert assignment_ack(worker_id=box.id, task_id=str(task.id), token=str(assignment.token))

    assert worker_announced_drain(worker_id=box.id) == 0

    later = queued_task()
    assert dispatch_round() == 0
    box.refresh_from_db()
    assert box.status == Worker.Status.DRAINING
    outcome = assignment_status(worker_id=box.id, task_id=str(task.id), token=str(assignment.token), status="running")
    assert outcome.accepted
    assert Task.objects.get(id=later.id).status == TaskStatus.QUEUED


def test_drain_announced_again_is_audited_once():
    box = worker()
    queued_task()
    _dispatched(Task.objects.get())

    worker_announced_drain(worker_id=box.id)
    worker_announced_drain(worker_id=box.id)

    events = AuditEvent.objects.filter(event_type="scheduler_drain")
    assert [(e.resource, e.action, e.metadata) for e in events] == [(f"worker:{box.name}", "drain", {"by": "agent"})]


def test_an_unacknowledged_run_with_a_cancel_pending_ends_cancelled_not_queued_to_start_elsewhere():
    box = worker(name="a", batch_slots=1)
    task = queued_task()
    _dispatched(task)
    task_cancel(task=Task.objects.get(id=task.id), actor=Actor(user=task.owner, role="user"))

    assert worker_announced_drain(worker_id=box.id) == 1

    worker(name="b", batch_slots=1)
    assert dispatch_round() == 0
    task.refresh_from_db()
    assert (task.status, task.failure_reason, task.retry_count) == (TaskStatus.CANCELLED, "cancelled", 0)
    assert task.cancelled_by == task.owner


def test_a_run_a_heartbeat_lists_counts_as_acknowledged_so_a_drain_keeps_it():
    # The agent's `ack` was lost (its batch failed on the server); its heartbeat lists the run.
    box = worker(batch_slots=1)
    task = queued_task()
    assignment = _dispatched(task)
    run_ref = {"task_id": str(task.id), "token": str(assignment.token), "status": "preparing"}
    worker_heartbeat(worker_id=box.id, running=[run_ref])

    assert worker_announced_drain(worker_id=box.id) == 0

    assignment.refresh_from_db()
    task.refresh_from_db()
    assert (assignment.status, task.status) == (NodeAssignment.Status.ACKED, TaskStatus.PREPARING)
