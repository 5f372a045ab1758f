"""Who may read which bytes. Every refusal is a 404, so ids are never confirmed to outsiders."""

import uuid

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.db.models import F, QuerySet

from artifacts.models import Artifact, Dataset, Snapshot
from fetchml.auth import Actor
from fetchml.errors import Invalid, NotFound
from scheduler.models import NodeAssignment
from tasks.models import Task


def dataset_uri(name: str) -> str:
    return f"fetchml://datasets/{name}"


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
    in_specs = any(isinstance(spec, dict) and spec.get("source") == uri for spec in task.dataset_specs or [])
    return in_list or in_specs


def snapshot_readable_by(*, user: AbstractBaseUser, snapshot_id: str) -> bool:
    """Whether `user` uploaded these bytes (what task submission requires of snapshot_id)."""
    return Snapshot.objects.filter(sha256=snapshot_id, owners__user=user).exists()


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
