"""Reads of tasks, the queue and experiments shared by the API, the admin and streams.

Visibility is decided here, once: a regular user sees their own rows only, an
admin sees everyone's. A row the actor may not see is reported as missing.
"""

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypedDict

from django.contrib.auth import get_user_model
from django.db.models import Count, F, Prefetch, Q, QuerySet
from django.utils import timezone

from fetchml.auth import Actor
from fetchml.conf import app_settings
from fetchml.errors import NotFound
from scheduler.models import NodeAssignment, Worker
from tasks.models import Experiment, Task
from tasks.states import ACTIVE_STATES, TaskStatus


def owner_username() -> F:
    """The task's owner's name, to annotate a query with (for audit events, without reading users)."""
    return F(f"owner__{get_user_model().USERNAME_FIELD}")


class TaskFilters(TypedDict, total=False):
    status: str
    user_id: str
    job_name: str
    experiment_id: uuid.UUID
    node_count: int
    reservation_id: uuid.UUID
    limit: int
    offset: int


@dataclass(frozen=True)
class TaskPage:
    tasks: list[Task]
    total: int
    limit: int
    offset: int


def visible_tasks(actor: Actor) -> QuerySet[Task]:
    """The tasks `actor` may know of: its own (an admin's: all)."""
    tasks = Task.objects.all()
    return tasks if actor.is_admin else tasks.filter(owner=actor.user)


def task_render_queryset(tasks: QuerySet[Task]) -> QuerySet[Task]:
    """Everything the Task representation reads, fetched in a fixed number of queries."""
    assignments = NodeAssignment.objects.select_related("worker").order_by("node_id")
    return tasks.select_related("owner", "cancelled_by").prefetch_related(
        Prefetch("node_assignments", queryset=assignments)
    )


def task_list(*, actor: Actor, filters: TaskFilters) -> TaskPage:
    tasks = visible_tasks(actor)
    if status := filters.get("status"):
        tasks = tasks.filter(status=status)
    if user_id := filters.get("user_id"):
        # A regular user naming someone else simply matches nothing of theirs.
        tasks = tasks.filter(owner__username=user_id)
    if job_name := filters.get("job_name"):
        tasks = tasks.filter(job_name=job_name)
    if (experiment_id := filters.get("experiment_id")) is not None:
        tasks = tasks.filter(experiment_id=experiment_id)
    if (node_count := filters.get("node_count")) is not None:
        tasks = tasks.filter(node_count=node_count)
    if (reservation_id := filters.get("reservation_id")) is not None:
        tasks = tasks.filter(reservation_id=reservation_id)
    limit = filters.get("limit", 50)
    offset = filters.get("offset", 0)
    total = tasks.count()
    page = list(task_render_queryset(tasks.order_by("-created_at", "-id"))[offset : offset + limit])
    return TaskPage(tasks=page, total=total, limit=limit, offset=offset)


def task_get_for_actor(*, actor: Actor, task_id: Any) -> Task:
    task = task_render_queryset(visible_tasks(actor)).filter(id=task_id).first()
    if task is None:
        raise NotFound("Task not found")
    return task


def utc_midnight(now: datetime | None = None) -> datetime:
    now = (now or timezone.now()).astimezone(UTC)
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


def queue_stats(*, now: datetime | None = None) -> dict[str, int]:
    """Queue depth, work in flight, today's outcomes (since UTC midnight), active workers."""
    since = utc_midnight(now)
    counts = Task.objects.aggregate(
        queued=Count("id", filter=Q(status=TaskStatus.QUEUED)),
        running=Count("id", filter=Q(status__in=ACTIVE_STATES)),
        completed=Count("id", filter=Q(status=TaskStatus.COMPLETED, ended_at__gte=since)),
        failed=Count("id", filter=Q(status=TaskStatus.FAILED, ended_at__gte=since)),
    )
    counts["workers"] = Worker.objects.filter(status=Worker.Status.ACTIVE).count()
    return counts


def experiment_list(
    *, actor: Actor, status: str | None = None, limit: int | None = None, offset: int = 0
) -> tuple[list[Experiment], int]:
    """A page of the experiments visible to the actor (theirs, everyone's for an admin; deleted
    ones are gone, as for a read of one), and their total."""
    limit = limit or app_settings.MAX_PAGE_SIZE
    experiments = (
        Experiment.objects.select_related("owner")
        .exclude(status=Experiment.Status.DELETED)
        .order_by("-created_at", "-id")
    )
    if not actor.is_admin:
        experiments = experiments.filter(owner=actor.user)
    if status:
        experiments = experiments.filter(status=status)
    return list(experiments[offset : offset + limit]), experiments.count()
