"""Reads behind the Scheduler API: fleet status, workers, reservations (with their visibility rules)."""

from datetime import timedelta
from typing import Any

from django.db.models import Count, Prefetch, Q, QuerySet
from django.utils import timezone

from fetchml.auth import Actor
from fetchml.errors import NotFound
from scheduler.models import NodeAssignment, Reservation, Worker
from scheduler.selectors import worker_availability
from tasks.models import Task
from tasks.selectors import visible_tasks
from tasks.states import ACTIVE_STATES, TaskStatus


def scheduler_status() -> dict[str, Any]:
    """Counts for GET /v1/scheduler/status: a fixed number of aggregate queries."""
    now = timezone.now()
    workers = Worker.objects.aggregate(
        total=Count("id"),
        active=Count("id", filter=Q(status=Worker.Status.ACTIVE)),
        draining=Count("id", filter=Q(status=Worker.Status.DRAINING)),
    )
    queued = Task.objects.filter(status=TaskStatus.QUEUED).aggregate(
        batch=Count("id", filter=Q(kind=Task.Kind.BATCH)),
        service=Count("id", filter=Q(kind=Task.Kind.SERVICE)),
    )
    return {
        "workers_total": workers["total"],
        "workers_active": workers["active"],
        "workers_draining": workers["draining"],
        "batch_queue_depth": queued["batch"],
        "service_queue_depth": queued["service"],
        "tasks_running": Task.objects.filter(status__in=ACTIVE_STATES).count(),
        "tasks_completed_24h": Task.objects.filter(
            status=TaskStatus.COMPLETED, ended_at__gte=now - timedelta(hours=24)
        ).count(),
        "reservations_active": Reservation.objects.filter(
            status=Reservation.Status.ACTIVE, starts_at__lte=now, expires_at__gt=now
        ).count(),
        "timestamp": now,
    }


def _workers(actor: Actor) -> QuerySet[Worker]:
    """Workers with their live assignments of the tasks `actor` may know of (`live_assignments`):
    another user's task ids are not told, as nowhere else."""
    live = NodeAssignment.objects.filter(holds_capacity=True).order_by("created_at")
    if not actor.is_admin:  # an admin sees every task: no subquery over the whole table
        live = live.filter(task__in=visible_tasks(actor))
    return Worker.objects.prefetch_related(Prefetch("assignments", queryset=live, to_attr="live_assignments"))


def _with_availability(workers: list[Worker]) -> list[Worker]:
    # What the dispatcher would give an ordinary task, reservations deducted: `worker.availability`.
    available = worker_availability(workers)
    for worker in workers:
        worker.availability = available[worker.id]
    return workers


def worker_list(*, actor: Actor) -> list[Worker]:
    return _with_availability(list(_workers(actor).order_by("name")))


def worker_get(*, actor: Actor, worker_id: Any) -> Worker:
    worker = _workers(actor).filter(id=worker_id).first()
    if worker is None:
        raise NotFound("Worker not found")
    return _with_availability([worker])[0]


def _visible_reservations(actor: Actor) -> QuerySet[Reservation]:
    reservations = Reservation.objects.select_related("owner")
    return reservations if actor.is_admin else reservations.filter(owner=actor.user)


def reservation_list(*, actor: Actor, include_ended: bool = False) -> list[Reservation]:
    """The caller's reservations (an admin's: everyone's); live ones unless `include_ended`."""
    reservations = _visible_reservations(actor)
    if not include_ended:
        reservations = reservations.filter(
            status__in=(Reservation.Status.PENDING, Reservation.Status.ACTIVE, Reservation.Status.CLAIMED)
        )
    return list(reservations.order_by("-created_at")[:1000])


def reservation_get(*, actor: Actor, reservation_id: Any) -> Reservation:
    reservation = _visible_reservations(actor).filter(id=reservation_id).first()
    if reservation is None:
        raise NotFound("Reservation not found")
    return reservation
