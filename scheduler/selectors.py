"""Reads of the scheduler: what to send a worker, and "why is my job still queued?"."""

from datetime import datetime
from typing import Any

from django.db.models import Q
from django.utils import timezone

from fetchml.compiled import compiled_per_shape
from scheduler.dispatch import (
    CAPACITY_FIELDS,
    capacities,
    eligible_nodes,
    hold_for_starving_head,
    pick_nodes,
    runnable_tasks,
    shortfall,
)
from scheduler.models import NodeAssignment, Reservation, Worker
from scheduler.policies import current_holds
from scheduler.protocol import outgoing
from tasks.models import Task
from tasks.states import ACTIVE_STATES, TaskStatus


def has_runnable_tasks() -> bool:
    """Whether any task is waiting to be dispatched now (one probe of the queue's index, after every pass)."""
    return next(iter(_first_runnable(now=timezone.now())), None) is not None


_first_runnable = compiled_per_shape(lambda *, now: runnable_tasks(now).only("id")[:1])


def unacked_assignment_ids(*, worker_id: Any) -> list[Any]:
    live = NodeAssignment.objects.filter(
        worker_id=worker_id, holds_capacity=True, status=NodeAssignment.Status.ASSIGNED
    )
    return list(live.order_by("created_at").values_list("id", flat=True))


def unacked_assignments(*, older_than: datetime) -> list[tuple[Any, Any]]:
    """(assignment id, worker id) of assignments sent before `older_than` and not acknowledged."""
    stale = NodeAssignment.objects.filter(
        holds_capacity=True, status=NodeAssignment.Status.ASSIGNED, created_at__lt=older_than
    )
    return list(stale.values_list("id", "worker_id"))


def cancel_messages(*, worker_id: Any) -> list[dict[str, Any]]:
    """`cancel` messages for this worker's runs whose task has a pending cancel request."""
    pending = NodeAssignment.objects.filter(
        worker_id=worker_id,
        holds_capacity=True,
        task__cancel_requested_at__isnull=False,
        task__status__in=ACTIVE_STATES,
    ).values_list("task_id", "token", "task__cancelled_by__username")
    return [
        outgoing("cancel", task_id=str(task_id), token=str(token), reason=f"cancelled by {who or 'an operator'}")
        for task_id, token, who in pending
    ]


# --- why is my job still queued? -------------------------------------------------


def queue_position(task: Task, *, now: datetime | None = None) -> int:
    """How many runnable tasks the scheduler will consider before this one (0 = next)."""
    if task.status != TaskStatus.QUEUED:
        return 0
    ahead = Q(dispatch_key__gt=task.dispatch_key) | Q(dispatch_key=task.dispatch_key, created_at__lt=task.created_at)
    return runnable_tasks(now or timezone.now()).filter(ahead).exclude(id=task.id).count()


def _need(task: Task) -> str:
    parts = [f"{task.gpu} free GPU(s)" + (f" of type {task.gpu_type}" if task.gpu_type else "")] if task.gpu else []
    if task.cpu:
        parts.append(f"{task.cpu} free CPU core(s)")
    if task.memory_gb:
        parts.append(f"{task.memory_gb} GB of free memory")
    parts.append(f"a free {task.kind} slot")
    return ", ".join(parts)


def pending_reason(task: Task, *, now: datetime | None = None, position: int | None = None) -> str:
    """A sentence saying why a queued task has not started, from the dispatcher's own matching rule.

    `position`: its `queue_position` at `now`, if the caller has it already (it is counted otherwise).
    """
    if task.status != TaskStatus.QUEUED:
        return ""
    now = now or timezone.now()
    if task.runnable_after is not None and task.runnable_after > now:
        return f"waiting for retry back-off until {task.runnable_after.isoformat()}"
    workers = list(Worker.objects.filter(status=Worker.Status.ACTIVE).only(*CAPACITY_FIELDS))
    if not workers:
        return "no active worker is connected"
    # The round's own view: capacity held by reservations and for a starving head of the line.
    holds = current_holds(now)
    if task.reservation_id is not None and task.reservation_id in holds.waiting:
        starts_at = Reservation.objects.filter(id=task.reservation_id).values_list("starts_at", flat=True).first()
        return f"waiting for its reservation's window to start at {starts_at.isoformat()}"
    nodes = capacities(workers, holds)
    head = hold_for_starving_head(nodes, holds, now)
    if pick_nodes(nodes, task, holds) is None:
        missing = [shortfall(node, task) for node in eligible_nodes(nodes, task, holds)]
        fitting = missing.count(None)
        nodes_text = f"{task.node_count} workers" if task.node_count > 1 else "worker"
        if fitting:
            return f"only {fitting} of {task.node_count} workers have {_need(task)}"
        if head is not None and "held" in missing:
            return f"the workers it could use are held for task {head.id}, which has waited longest"
        if "reserved" in missing:
            return "the capacity it needs is held by active reservations"
        if missing and set(missing) == {"gpu_type"}:
            return f"no active worker has GPUs of type {task.gpu_type}"
        return f"no {nodes_text} with {_need(task)}"
    if position is None:
        position = queue_position(task, now=now)
    if position:
        return f"behind {position} higher-priority task(s)"
    return "waiting for the next scheduling round"
