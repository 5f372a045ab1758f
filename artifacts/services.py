"""Writes of stored bytes: snapshots, datasets, artifacts and their audit trail.

Bodies are spooled to a temporary file (hashing and counting as they come),
stored, and only then recorded in a row, inside one transaction with its
audit event. If the row cannot be written the stored file is removed, so a
refused or failed upload leaves nothing behind.
"""

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar

from django.db import IntegrityError, transaction
from django.db.models import F, Sum

from artifacts import storage
from artifacts.models import Artifact, Dataset, Snapshot, SnapshotOwner
from artifacts.storage import Received
from audit.services import record
from fetchml.auth import Actor
from fetchml.conf import app_settings
from fetchml.errors import Conflict, Forbidden, Invalid, NotFound, PayloadTooLarge
from scheduler.models import NodeAssignment
from tasks.models import Task
from tasks.states import TaskStatus

FILE_ACCESS = "file_access"
# An artifact may be uploaded while the run is alive: the fencing token is
# what proves the uploader's right. `preparing` is included because the
# agent's `running`/`collecting` reports travel over the WebSocket and may be
# applied after its first HTTP upload of a run that ended at once.
_UPLOADING_STATES = (TaskStatus.PREPARING, TaskStatus.RUNNING, TaskStatus.COLLECTING)
T = TypeVar("T")


def file_access_record(
    *, actor: Actor, resource: str, action: str = "download", metadata: dict[str, Any] | None = None
) -> None:
    """Audit one read (or write) of stored bytes through the API."""
    with transaction.atomic():
        record(
            event_type=FILE_ACCESS,
            user=actor.user,
            resource=resource,
            action=action,
            ip_address=actor.ip_address,
            metadata=metadata or {},
        )


def _store_then_record(received: Received, key: str, write_rows: Callable[[str], T]) -> T:
    """Store the body under `key`, then run `write_rows(stored_key)` in a transaction.

    The stored file is deleted again if the rows are not committed.
    """
    stored_key = storage.store(received, key)
    try:
        with transaction.atomic():
            return write_rows(stored_key)
    except BaseException:
        storage.delete_quietly(stored_key)
        raise


# --- snapshots ---------------------------------------------------------------


def snapshot_create(*, actor: Actor, stream: BinaryIO, declared_length: int | None) -> tuple[Snapshot, bool]:
    """Store a code archive; returns it and whether it is new *to the caller*.

    Identical bytes are stored once. Whether someone else uploaded them first
    is not revealed: the answer depends only on the caller's own uploads.
    """
    limit = app_settings.MAX_SNAPSHOT_BYTES
    received = storage.receive(stream, limit=limit, declared_length=declared_length, what="Snapshot")
    try:
        storage.check_tar_gz(received)
        snapshot = Snapshot.objects.filter(sha256=received.sha256).first()
        if snapshot is None:
            # A unique key per upload: a racing duplicate never overwrites (or
            # later deletes) the blob of the upload that won.
            key = f"snapshots/{received.sha256[:2]}/{received.sha256}-{uuid.uuid4().hex[:12]}.tar.gz"
            snapshot = _store_then_record(received, key, lambda stored: _snapshot_row(received, stored))
        with transaction.atomic():
            _, new_to_caller = SnapshotOwner.objects.get_or_create(snapshot=snapshot, user=actor.user)
            if new_to_caller:
                record(
                    event_type=FILE_ACCESS,
                    user=actor.user,
                    resource=f"snapshot:{snapshot.sha256}",
                    action="upload",
                    ip_address=actor.ip_address,
                    metadata={"size": snapshot.size},
                )
    finally:
        received.close()
    return snapshot, new_to_caller


def _snapshot_row(received: Received, stored_key: str) -> Snapshot:
    snapshot, created = Snapshot.objects.get_or_create(
        sha256=received.sha256, defaults={"size": received.size, "storage_key": stored_key}
    )
    if not created:
        # A concurrent upload of the same bytes won; ours is a duplicate blob.
        transaction.on_commit(lambda: storage.delete_quietly(stored_key))
    return snapshot


# --- datasets ----------------------------------------------------------------


def dataset_create(
    *, actor: Actor, name: str, description: str, stream: BinaryIO, declared_length: int | None
) -> Dataset:
    """Store a new dataset. Names are immutable: the same name again is a 409,
    so a task (or its retry) always reads the bytes it was submitted with."""
    if Dataset.objects.filter(owner=actor.user, name=name).exists():
        raise _dataset_exists(name)
    limit = app_settings.MAX_DATASET_BYTES
    received = storage.receive(stream, limit=limit, declared_length=declared_length, what="Dataset")
    try:
        if received.size == 0:
            raise Invalid("The dataset is empty", details=[{"field": None, "message": "the body has no bytes"}])
        key = f"datasets/{actor.user.pk}/{uuid.uuid4().hex}"
        return _store_then_record(
            received, key, lambda stored: _dataset_row(actor, name, description, received, stored)
        )
    finally:
        received.close()


def _dataset_exists(name: str) -> Conflict:
    return Conflict(f"You already have a dataset named {name!r}; datasets are immutable, delete it or pick a new name")


def _dataset_row(actor: Actor, name: str, description: str, received: Received, stored_key: str) -> Dataset:
    try:
        with transaction.atomic():
            dataset = Dataset.objects.create(
                owner=actor.user,
                name=name,
                description=description,
                size=received.size,
                sha256=received.sha256,
                storage_key=stored_key,
            )
    except IntegrityError:
        raise _dataset_exists(name) from None
    record(
        event_type=FILE_ACCESS,
        user=actor.user,
        resource=f"dataset:{name}",
        action="upload",
        ip_address=actor.ip_address,
        metadata={"size": received.size, "sha256": received.sha256},
    )
    return dataset


def dataset_delete(*, actor: Actor, dataset: Dataset) -> None:
    if not (actor.is_admin or dataset.owner_id == actor.user.pk):
        raise NotFound("Dataset not found")
    with transaction.atomic():
        deleted, _ = Dataset.objects.filter(pk=dataset.pk).delete()
        if not deleted:
            raise NotFound("Dataset not found")
        record(
            event_type=FILE_ACCESS,
            user=actor.user,
            resource=f"dataset:{dataset.name}",
            action="delete",
            ip_address=actor.ip_address,
            metadata={"owner": dataset.owner.get_username(), "sha256": dataset.sha256},
        )
        key = dataset.storage_key
        transaction.on_commit(lambda: storage.delete_quietly(key))


# --- artifacts ---------------------------------------------------------------


@dataclass(frozen=True)
class ManifestEntry:
    path: str
    size: int
    sha256: str


def _live_assignment(*, actor: Actor, task_id: uuid.UUID, token: uuid.UUID, lock: bool = False) -> NodeAssignment:
    """The task's current assignment with this token on the caller's worker, or 409."""
    if not actor.is_worker:
        raise Forbidden("Only worker keys may upload artifacts")
    if not Task.objects.filter(pk=task_id).exists():
        raise NotFound("Task not found")
    assignments = NodeAssignment.objects.select_related("task")
    if lock:
        assignments = assignments.select_for_update(of=("self",))
    assignment = assignments.filter(
        task_id=task_id,
        token=token,
        holds_capacity=True,
        worker__api_key__user_id=actor.user.pk,
        attempt=F("task__attempt"),
        task__status__in=_UPLOADING_STATES,
    ).first()
    if assignment is None:
        raise Conflict("The fencing token is not the task's current live assignment on this worker")
    return assignment


def _attempt_bytes(task_id: uuid.UUID, attempt: int, *, except_path: str) -> int:
    used = Artifact.objects.filter(task_id=task_id, attempt=attempt).exclude(path=except_path).aggregate(n=Sum("size"))
    return used["n"] or 0


def _over_budget(path: str, size: int | None, used: int, limit: int) -> PayloadTooLarge:
    shown = "its size" if size is None else f"{size} bytes"
    return PayloadTooLarge(
        f"Artifact {path!r} does not fit the task's artifact budget",
        details=[{"field": path, "message": f"{shown} over the remaining {max(limit - used, 0)} of {limit} bytes"}],
    )


def artifact_upload(
    *,
    actor: Actor,
    task_id: uuid.UUID,
    token: uuid.UUID,
    path: str,
    expected_sha256: str,
    stream: BinaryIO,
    declared_length: int | None,
) -> Artifact:
    """Store one file of the current attempt, uncommitted; the same path again replaces it."""
    assignment = _live_assignment(actor=actor, task_id=task_id, token=token)
    attempt = assignment.attempt
    if Artifact.objects.filter(task_id=task_id, attempt=attempt, path=path, complete=True).exists():
        raise Conflict(f"Artifact {path!r} of this attempt is already committed")
    limit = app_settings.MAX_ARTIFACT_BYTES_PER_TASK
    used = _attempt_bytes(task_id, attempt, except_path=path)
    if declared_length is not None and used + declared_length > limit:
        raise _over_budget(path, declared_length, used, limit)
    try:
        received = storage.receive(stream, limit=limit - used, declared_length=declared_length, what="Artifact")
    except PayloadTooLarge:
        raise _over_budget(path, None, used, limit) from None
    try:
        if received.sha256 != expected_sha256:
            raise Invalid(
                "The body does not match X-Content-SHA256",
                details=[{"field": "X-Content-SHA256", "message": f"body sha256 is {received.sha256}"}],
            )
        key = f"artifacts/{task_id}/{attempt}/{uuid.uuid4().hex}"
        return _store_then_record(
            received, key, lambda stored: _artifact_row(actor, task_id, token, path, received, stored, limit)
        )
    finally:
        received.close()


def _artifact_row(
    actor: Actor, task_id: uuid.UUID, token: uuid.UUID, path: str, received: Received, stored_key: str, limit: int
) -> Artifact:
    # Re-checked under the assignment's lock: the token may have gone stale and
    # parallel uploads may have used the budget while this body streamed in.
    assignment = _live_assignment(actor=actor, task_id=task_id, token=token, lock=True)
    used = _attempt_bytes(task_id, assignment.attempt, except_path=path)
    if used + received.size > limit:
        raise _over_budget(path, received.size, used, limit)
    previous = Artifact.objects.filter(task_id=task_id, attempt=assignment.attempt, path=path).first()
    if previous is not None:
        if previous.complete:
            raise Conflict(f"Artifact {path!r} of this attempt is already committed")
        previous.delete()
        old_key = previous.storage_key
        transaction.on_commit(lambda: storage.delete_quietly(old_key))
    return Artifact.objects.create(
        task_id=task_id,
        attempt=assignment.attempt,
        path=path,
        size=received.size,
        sha256=received.sha256,
        storage_key=stored_key,
    )


def artifact_commit(
    *, actor: Actor, task_id: uuid.UUID, token: uuid.UUID, manifest: list[ManifestEntry]
) -> list[Artifact]:
    """Make exactly the manifest's uploads the task's listed artifacts, at once.

    Everything else stored for the task (other uploads of this attempt, files
    of earlier attempts) is removed: only the committed set stays.
    """
    with transaction.atomic():
        assignment = _live_assignment(actor=actor, task_id=task_id, token=token, lock=True)
        uploaded = {
            artifact.path: artifact
            for artifact in Artifact.objects.select_for_update().filter(task_id=task_id, attempt=assignment.attempt)
        }
        problems = []
        for entry in manifest:
            artifact = uploaded.get(entry.path)
            if artifact is None:
                problems.append({"field": entry.path, "message": "not uploaded in this attempt"})
            elif (artifact.size, artifact.sha256) != (entry.size, entry.sha256):
                problems.append({"field": entry.path, "message": "size or sha256 differs from the upload"})
        if problems:
            raise Invalid("The manifest does not match the uploaded artifacts", details=problems)
        committed_ids = [uploaded[entry.path].pk for entry in manifest]
        Artifact.objects.filter(pk__in=committed_ids).update(complete=True)
        dropped = Artifact.objects.filter(task_id=task_id).exclude(pk__in=committed_ids)
        dropped_keys = list(dropped.values_list("storage_key", flat=True))
        dropped.delete()
        transaction.on_commit(lambda: [storage.delete_quietly(key) for key in dropped_keys])
        record(
            event_type=FILE_ACCESS,
            user=actor.user,
            resource=f"artifact:{task_id}",
            action="commit",
            ip_address=actor.ip_address,
            metadata={
                "attempt": assignment.attempt,
                "files": len(committed_ids),
                "bytes": sum(entry.size for entry in manifest),
            },
        )
        return list(Artifact.objects.filter(pk__in=committed_ids).order_by("path"))
