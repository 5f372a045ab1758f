"""Who may read which bytes. Every refusal is a 404, so ids are never confirmed to outsiders."""

import uuid
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.db.models import F, QuerySet

from artifacts.models import Artifact, Dataset, Snapshot
from fetchml.auth import Actor
from fetchml.errors import Invalid, NotFound
from scheduler.agent.datasets import SERVER_PREFIX
from scheduler.models import NodeAssignment
from tasks.models import Task


def dataset_uri(name: str) -> str:
    return f"{SERVER_PREFIX}{name}"


def spec_dataset_name(spec: Any) -> str | None:
    """The server dataset a `dataset_specs` entry reads, or None for another source.

    The one server-side reading of an entry's source: an empty (or missing) source means
    `fetchml://datasets/<name>` (docs/files-protocol.md), as the agent reads it. Tasks stored
    with such entries keep them as submitted, so every reader goes through here.
    """
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        return None
    source = spec.get("source") or dataset_uri(spec["name"])
    if not isinstance(source, str) or not source.startswith(SERVER_PREFIX):
        return None
    return source.removeprefix(SERVER_PREFIX)


def worker_live_tasks(*, actor: Actor) -> list[Task]:
    """Tasks with a live assignment on a worker registered with the caller's key user.

    The key's user is the unit of trust: agents sharing one worker account can
    already connect under each other's names, so matching the exact key would
    not separate them any further.
    """
    assignments = (
        NodeAssignment.objects.filter(
            holds_capacity=True,
            worker__api_key__user_id=actor.user.pk,
            attempt=F("task__attempt"),
        )
        .select_related("task", "task__owner")
        .order_by("created_at")
    )
    return [assignment.task for assignment in assignments]


def task_references_dataset(task: Task, name: str) -> bool:
    uri = dataset_uri(name)
    # `datasets` holds server dataset names; the URI form is accepted too.
    in_list = any(entry in (name, uri) for entry in task.datasets or [] if isinstance(entry, str))
    return in_list or any(spec_dataset_name(spec) == name for spec in task.dataset_specs or [])


def snapshot_readable_by(*, user: AbstractBaseUser, snapshot_id: str) -> bool:
    """Whether `user` uploaded these bytes (what task submission requires of snapshot_id)."""
    return Snapshot.objects.filter(sha256=snapshot_id, owners__user=user).exists()


def snapshot_list(*, actor: Actor, limit: int, offset: int = 0) -> tuple[list[Snapshot], int]:
    """A page of the snapshots the actor uploaded (every snapshot for an admin), newest first, and
    their total."""
    snapshots = Snapshot.objects.order_by("-created_at", "sha256")
    if not actor.is_admin:
        snapshots = snapshots.filter(owners__user=actor.user)
    return list(snapshots[offset : offset + limit]), snapshots.count()


def snapshot_for_download(*, actor: Actor, snapshot_id: str) -> Snapshot:
    snapshot = Snapshot.objects.filter(sha256=snapshot_id).first()
    if snapshot is None:
        raise NotFound("Snapshot not found")
    if actor.is_admin or snapshot_readable_by(user=actor.user, snapshot_id=snapshot_id):
        return snapshot
    if actor.is_worker:
        # Only for a task whose owner may read the snapshot: knowing a digest
        # must not let anyone run (and so read) someone else's code.
        for task in worker_live_tasks(actor=actor):
            if task.snapshot_id == snapshot_id and snapshot_readable_by(user=task.owner, snapshot_id=snapshot_id):
                return snapshot
    raise NotFound("Snapshot not found")


def dataset_digests(*, user: AbstractBaseUser, names: list[str]) -> dict[str, str]:
    """The sha256 of each of `names` that is a dataset of `user` (whose namespace a task's server
    datasets come from); a name missing from the answer is no dataset of theirs."""
    return dict(Dataset.objects.filter(owner=user, name__in=set(names)).values_list("name", "sha256"))


def pinned_datasets_changed(*, task: Task) -> dict[str, str | None]:
    """The server datasets `task` pinned at submission that no longer hold the pinned bytes: name ->
    the digest the dataset has now, or None when it is gone. (Deleted and uploaded again under its
    name, a dataset is not the one submitted; a retry could only fail its preparation again.)"""
    pinned = task.dataset_digests or {}
    if not pinned:
        return {}
    current = dict(
        Dataset.objects.filter(owner_id=task.owner_id, name__in=sorted(pinned)).values_list("name", "sha256")
    )
    return {name: current.get(name) for name, digest in sorted(pinned.items()) if current.get(name) != digest}


def dataset_list(*, actor: Actor) -> QuerySet[Dataset]:
    datasets = Dataset.objects.select_related("owner").order_by("name", "owner__username")
    return datasets if actor.is_admin else datasets.filter(owner=actor.user)


def dataset_for_reader(
    *, actor: Actor, name: str, owner_username: str | None = None, task_id: uuid.UUID | None = None
) -> Dataset:
    """The dataset `name` as the caller sees it.

    Names live in their owner's namespace. Users read their own; admins read
    their own or `owner_username`'s; a worker names the task it prepares, and
    gets the dataset of that task's owner if the task references it and is
    live on the worker.
    """
    owner: AbstractBaseUser | None = None
    if actor.is_worker:
        if task_id is None:
            raise Invalid(
                "Worker keys must name the task they prepare",
                details=[{"field": "task_id", "message": "required for worker keys"}],
            )
        task = next((t for t in worker_live_tasks(actor=actor) if t.pk == task_id), None)
        if task is not None and task_references_dataset(task, name):
            owner = task.owner
    elif owner_username is None or owner_username == actor.user.get_username():
        owner = actor.user
    elif actor.is_admin:
        owner = get_user_model().objects.filter(username=owner_username).first()
    dataset = Dataset.objects.select_related("owner").filter(owner=owner, name=name).first() if owner else None
    if dataset is None:
        raise NotFound("Dataset not found")
    return dataset


def task_for_reader(*, actor: Actor, task_id: uuid.UUID) -> Task:
    """A task whose outputs the caller may read: its owner or an admin."""
    tasks = Task.objects.select_related("owner")
    if not actor.is_admin:
        tasks = tasks.filter(owner=actor.user)
    task = tasks.filter(pk=task_id).first()
    if task is None:
        raise NotFound("Task not found")
    return task


def _latest_committed_attempt(task: Task) -> int | None:
    complete = Artifact.objects.filter(task=task, complete=True)
    return complete.order_by("-attempt").values_list("attempt", flat=True).first()


def artifact_list(*, task: Task) -> list[Artifact]:
    """Complete artifacts of the latest committed attempt, by path."""
    attempt = _latest_committed_attempt(task)
    if attempt is None:
        return []
    return list(Artifact.objects.filter(task=task, attempt=attempt, complete=True).order_by("path"))


def artifact_for_download(*, task: Task, path: str) -> Artifact:
    attempt = _latest_committed_attempt(task)
    artifact = Artifact.objects.filter(task=task, attempt=attempt, complete=True, path=path).first()
    if attempt is None or artifact is None:
        raise NotFound("Artifact not found")
    return artifact
