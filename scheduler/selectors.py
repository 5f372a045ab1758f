"""Reads of the scheduler: what to send a worker, and "why is my job still queued?"."""

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db.models import Q
from django.utils import timezone

from fetchml.compiled import compiled_per_shape
from fetchml.planner import read_planned_without
from scheduler.dispatch import (
    CAPACITY_FIELDS,
    capacities,
    eligible_nodes,
    held_from,
    hold_for_starving_head,
    pick_nodes,
    runnable_tasks,
    shortfall,
)
from scheduler.models import NodeAssignment, Reservation, Worker
from scheduler.policies import (
    FleetNode,
    active_fleet,
    beyond_the_fleet,
    current_holds,
    nodes_that_could_hold,
    plural,
    task_shape,
    tasks_fleet_could_ever_run,
)
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
    """`cancel` messages for this worker's runs whose task has a pending cancel request, or is
    a multi-node run that another node ended without completing (its outcome is kept on the
    task while it is still active: services._gang_node_failed)."""
    pending = NodeAssignment.objects.filter(
        Q(task__cancel_requested_at__isnull=False) | ~Q(task__failure_reason=""),
        worker_id=worker_id,
        holds_capacity=True,
        task__status__in=ACTIVE_STATES,
    ).values_list(
        "task_id", "token", "task__cancel_requested_at", "task__cancelled_by__username", "task__failure_reason"
    )
    return [
        outgoing("cancel", task_id=str(task_id), token=str(token), reason=_why_cancelled(asked, who, failure))
        for task_id, token, asked, who, failure in pending
    ]


def _why_cancelled(asked: Any, who: str | None, failure_reason: str) -> str:
    if asked is not None:
        return f"cancelled by {who or 'an operator'}"
    return f"another node of the run ended ({failure_reason})"


# --- what a worker has free ------------------------------------------------------------


@dataclass(frozen=True)
class WorkerAvailability:
    """What the dispatcher would give a task naming no reservation on one worker, and what
    active reservations hold there."""

    gpus: int
    batch_slots: int
    service_slots: int
    reserved_gpus: int
    reserved_batch_slots: int


def worker_availability(workers: list[Worker], *, now: datetime | None = None) -> dict[Any, WorkerAvailability]:
    """Free capacity of `workers` as a dispatch round sees it: less what active reservations hold
    on them (the round's own binding, `current_holds`, and accounting, `held_from`), and none on a
    worker a round gives nothing (`Worker.takes_work`: draining, offline, or not connected now).

    A fixed number of queries (the live reservations, the GPUs in use), whatever the fleet's size.
    """
    available = {}
    taking_work = {worker.id for worker in workers if worker.takes_work}
    for node in capacities(workers, current_holds(now or timezone.now())):
        reserved_gpus, reserved_slots = held_from(node, None)
        active = node.worker_id in taking_work
        available[node.worker_id] = WorkerAvailability(
            gpus=max(len(node.gpu_indices) - reserved_gpus, 0) if active else 0,
            batch_slots=max(node.batch_slots - reserved_slots, 0) if active else 0,
            service_slots=max(node.service_slots, 0) if active else 0,
            reserved_gpus=reserved_gpus,
            reserved_batch_slots=reserved_slots,
        )
    return available


# --- why is my job still queued? -------------------------------------------------


_WHOLE_QUEUE = 2**62  # a slice that leaves out nothing


def queue_position(task: Task, *, now: datetime | None = None) -> int:
    """How many runnable tasks the scheduler will consider before this one (0 = next).

    Runnable: queued, past its back-off, and with `node_count` active workers that could each
    hold one node of it when empty; a task no active worker could ever run is passed over by every
    round, so it is not ahead of anyone. With no active worker at all, every runnable task ahead
    counts (the order in which they will start when one connects). Ahead: first in dispatch order,
    `runnable_tasks`'s (dispatch key, then age), counted along the queue's partial index.
    """
    if task.status != TaskStatus.QUEUED:
        return 0
    # `dispatch_key >=` bounds the walk of the index; among equal keys the older task goes first.
    ahead = runnable_tasks(now or timezone.now()).filter(
        Q(dispatch_key__gt=task.dispatch_key) | Q(created_at__lt=task.created_at), dispatch_key__gte=task.dispatch_key
    )
    if fleet := active_fleet():
        ahead = ahead.filter(tasks_fleet_could_ever_run(fleet))
    # Counted as a walk of `task_runnable_by_priority` from the head of the line to this task,
    # whatever the statistics say: the rows are counted in dispatch order (a slice keeps the order
    # in the count's subquery), and with sorting off that walk is the only plan left. Counted
    # without an order, after a burst the statistics had not seen, the planner read every queued
    # task through another index of the queue.
    with read_planned_without("sort"):
        return ahead.values("id")[:_WHOLE_QUEUE].count()


def _never_fits(task: Task, fleet: list[FleetNode]) -> str:
    """Why the active workers could not hold `task` even if they were idle ('' if they could)."""
    shape = task_shape(task)
    could = nodes_that_could_hold(shape, fleet)
    if could >= task.node_count:
        return ""
    if could:
        return (
            f"only {could} active worker(s) could ever hold one of its {task.node_count} nodes; "
            "it waits until more connect"
        )
    return f"no active worker has {beyond_the_fleet(shape, fleet)}; it waits until one connects"


def _need(task: Task) -> str:
    parts = [f"{task.gpu} free GPU(s)" + (f" of type {task.gpu_type}" if task.gpu_type else "")] if task.gpu else []
    if task.cpu:
        parts.append(f"{task.cpu} free CPU core(s)")
    if task.memory_gb:
        parts.append(f"{task.memory_gb} GB of free memory")
    parts.append(f"a free {task.kind} slot")
    return ", ".join(parts)


def _on_its_reservation(task: Task, missing: list[str | None]) -> str:
    """Why a task naming an active reservation does not fit the workers that reservation holds
    (`missing`: each one's shortfall), the only workers it may use until the reservation ends."""
    ends_at = Reservation.objects.filter(id=task.reservation_id).values_list("expires_at", flat=True).first()
    until = f"; it may run only on them until the reservation ends at {ends_at.isoformat()}" if ends_at else ""
    if not missing:
        return f"its reservation is not held on any active worker (too few are connected){until}"
    if len(missing) < task.node_count:
        return f"its reservation holds {plural(len(missing), 'worker')}, fewer than its {task.node_count} nodes{until}"
    if set(missing) == {"gpu_type"}:
        return f"the worker(s) its reservation holds have no GPUs of type {task.gpu_type}{until}"
    others = "; other reservations hold part of them" if "reserved" in missing else ""
    if fitting := missing.count(None):
        need = f"only {fitting} of the {len(missing)} worker(s) its reservation holds have {_need(task)}"
    else:
        need = f"no worker its reservation holds has {_need(task)}"
    return f"{need}{others}{until}"


def pending_reason(task: Task, *, now: datetime | None = None, position: int | None = None) -> str:
    """A sentence saying why a queued task has not started, from the dispatcher's own matching rule.

    `position`: its `queue_position` at `now`, if the caller has it already (it is counted otherwise).
    """
    if task.status != TaskStatus.QUEUED:
        return ""
    now = now or timezone.now()
    if task.runnable_after is not None and task.runnable_after > now:
        return f"waiting for retry back-off until {task.runnable_after.isoformat()}"
    workers = list(Worker.objects.filter(Worker.taking_work()).only(*CAPACITY_FIELDS))
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
        if never := _never_fits(task, [FleetNode.of(worker) for worker in workers]):
            return never
        missing = [shortfall(node, task) for node in eligible_nodes(nodes, task, holds)]
        fitting = missing.count(None)
        held_for_head = not fitting and head is not None and "held" in missing
        if task.reservation_id is not None and task.reservation_id in holds.active and not held_for_head:
            return _on_its_reservation(task, missing)
        nodes_text = f"{task.node_count} workers" if task.node_count > 1 else "worker"
        if fitting:
            held = "; on others it is held by active reservations" if "reserved" in missing else ""
            return f"only {fitting} of {task.node_count} workers have {_need(task)}{held}"
        if held_for_head:
            return f"the workers it could use are held for task {head.id}, which has waited longest"
        if "reserved" in missing:
            return "the capacity it needs is held by active reservations"
        if missing and set(missing) == {"gpu_type"}:
            return f"no active worker has GPUs of type {task.gpu_type}"
        return f"no {nodes_text} with {_need(task)}"
    if position is None:
        position = queue_position(task, now=now)
    if position:
        return f"behind {position} runnable task(s) in dispatch order"
    return "waiting for the next scheduling round"
