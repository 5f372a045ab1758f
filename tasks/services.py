"""Writes to tasks; experiments have theirs in tasks/experiments.py.

Every state change of a task goes through `task_transition`.
"""

import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction
from django.db.models import Q, prefetch_related_objects
from django.utils import timezone

from artifacts.selectors import dataset_digests, snapshot_readable_by, spec_dataset_name
from audit.services import Entry, appended_together, record, record_many
from fetchml import events
from fetchml.auth import Actor
from fetchml.compiled import compiled_update_per_shape
from fetchml.conf import app_settings
from fetchml.errors import Conflict, Invalid
from fetchml.models import ApiKey
from fetchml.planner import checked_not_searched
from plugins.overrides import validate_task_plugin_configs
from scheduler.agent.datasets import SERVER_PREFIX, DatasetSpec, parse_specs
from scheduler.dispatch import dispatch_at_submission
from scheduler.models import Reservation
from scheduler.policies import Shape, fair_share_offset, unschedulable_reason
from scheduler.reservations import task_fit_refusal
from tasks.attempts import with_attempt_ended
from tasks.models import Experiment, IdempotencyRecord, Task
from tasks.states import ACTIVE_STATES, FINAL_STATES, NO_OUTCOME, TaskStatus, can_transition, sources_of

# Audit event written for each target state (others are not audited).
_AUDITED_TRANSITIONS = {
    TaskStatus.RUNNING: "job_started",
    TaskStatus.COMPLETED: "job_completed",
    TaskStatus.FAILED: "job_completed",
    TaskStatus.CANCELLED: "job_cancelled",
}


def aging_rate_per_second() -> float:
    return app_settings.PRIORITY_AGING_PER_HOUR / 3600.0


def dispatch_key(*, priority: int, queued_at: datetime) -> float:
    """Order key equivalent to `priority + rate x age` (the same for every task at any moment)."""
    return priority - aging_rate_per_second() * queued_at.timestamp()


def priority_aged(task: Task, now: datetime | None = None) -> float:
    if task.status != TaskStatus.QUEUED:
        return float(task.priority)
    age = ((now or timezone.now()) - task.queued_at).total_seconds()
    return round(task.priority + aging_rate_per_second() * max(age, 0.0), 4)


def _owned_experiment(owner: AbstractBaseUser, experiment_id: uuid.UUID) -> Experiment:
    experiment = Experiment.objects.filter(id=experiment_id, owner=owner).exclude(status=Experiment.Status.DELETED)
    found = experiment.first()
    if found is None:
        # The same answer whether it does not exist or is someone else's: no leak.
        raise Invalid(
            "experiment_id does not name one of your experiments",
            details=[{"field": "experiment_id", "message": "Unknown experiment."}],
        )
    if found.status == Experiment.Status.ARCHIVED:
        # Archived means finished with: unarchive it (PATCH status active) to add runs to it.
        raise Invalid(
            "experiment_id names an archived experiment",
            details=[{"field": "experiment_id", "message": "The experiment is archived; unarchive it first."}],
        )
    return found


_USABLE_RESERVATION_STATES = (Reservation.Status.PENDING, Reservation.Status.ACTIVE)


def _owned_reservation(owner: AbstractBaseUser, reservation_id: uuid.UUID) -> Reservation:
    found = Reservation.objects.filter(id=reservation_id, owner=owner).first()
    if found is None:
        raise Invalid(
            "reservation_id does not name one of your reservations",
            details=[{"field": "reservation_id", "message": "Unknown reservation."}],
        )
    if found.status not in _USABLE_RESERVATION_STATES or found.expires_at <= timezone.now():
        raise Invalid(
            f"reservation is {found.status} and cannot take new tasks",
            details=[{"field": "reservation_id", "message": "Reservation is not usable."}],
        )
    return found


def _refuse_unknown_snapshot(owner: AbstractBaseUser, snapshot_id: str) -> None:
    # Checked here, not left to the worker: a wrong id would otherwise fail only at
    # preparation, after the queue wait and every retry.
    if not snapshot_readable_by(user=owner, snapshot_id=snapshot_id):
        raise Invalid(
            "snapshot_id does not name a snapshot you uploaded",
            details=[{"field": "snapshot_id", "message": "Unknown snapshot: upload it with POST /v1/snapshots."}],
        )


def _pinned_datasets(owner: AbstractBaseUser, datasets: list, dataset_specs: list) -> dict[str, str]:
    """The sha256 of each server dataset the task reads, as of its submission (the task and its
    retries read those bytes or fail: a dataset deleted and uploaded again under its name is not
    the one submitted); 422 for datasets it cannot use."""
    # Checked here with the agent's own rule, as the snapshot is: a typo in a name or a source the
    # agent cannot fetch would otherwise fail only at preparation, after the queue wait and every retry.
    # The list alone first, so that an error in it is reported against `datasets`.
    listed = {spec.name for spec in _parsed_datasets("datasets", (), datasets)}
    parsed = _parsed_datasets("dataset_specs", dataset_specs, datasets)
    server_names = [spec.source.removeprefix(SERVER_PREFIX) for spec in parsed if spec.source.startswith(SERVER_PREFIX)]
    digests = dataset_digests(user=owner, names=server_names)
    missing = sorted(set(server_names) - set(digests))
    if missing:
        raise Invalid(
            f"datasets not found: {', '.join(missing)}",
            details=[
                {
                    "field": "datasets" if name in listed else "dataset_specs",
                    "message": f"Unknown dataset {name!r}: upload it with POST /v1/datasets.",
                }
                for name in missing
            ],
        )
    _refuse_contradicted_digests(dataset_specs, digests)
    return digests


def _refuse_contradicted_digests(dataset_specs: list, digests: dict[str, str]) -> None:
    """422 for a spec whose sha256 is not the digest of the server dataset it reads: the agent would
    fail its preparation, after the queue wait and every retry."""
    details = [
        {
            "field": f"dataset_specs.{index}.sha256",
            "message": f"Dataset {name!r} has sha256 {digests[name]}: give that digest or none.",
        }
        for index, spec in enumerate(dataset_specs)
        if (name := spec_dataset_name(spec)) in digests and spec.get("sha256") and spec["sha256"] != digests[name]
    ]
    if details:
        fields = ", ".join(detail["field"] for detail in details)
        raise Invalid(f"sha256 does not match the dataset: {fields}", details=details)


def _parsed_datasets(field: str, specs: list | tuple, names: list) -> list[DatasetSpec]:
    try:
        return parse_specs(tuple(specs), tuple(names))
    except ValueError as exc:
        raise Invalid(f"{field} cannot be used: {exc}", details=[{"field": field, "message": str(exc)}]) from None


def _shape(fields: dict[str, Any]) -> Shape:
    """What one node of the task being submitted needs (the model's defaults for what is not given)."""
    names = ("gpu", "gpu_type", "cpu", "memory_gb", "node_count", "kind")
    return Shape(**{name: fields[name] for name in names if name in fields})


def _refuse_unschedulable(fields: dict[str, Any]) -> None:
    """422 for a task no registered worker could ever run (unless `allow_unschedulable`), naming
    the field the fleet cannot meet."""
    refusal = unschedulable_reason(_shape(fields))
    if refusal:
        field, reason = refusal
        raise Invalid(
            f"no registered worker could ever run this task: {reason}",
            details=[{"field": field, "message": f"{reason}; set allow_unschedulable to true to queue it anyway."}],
        )


def task_submit(
    *,
    owner: AbstractBaseUser,
    actor: Actor | None = None,
    linked: Callable[[Task], None] | None = None,
    **fields: Any,
) -> Task:
    """Create a queued task from validated fields and audit it; then place it at once when a worker is
    free (`FETCHML_DISPATCH_ON_SUBMIT`: a dispatch round in this transaction), or wake the scheduler.

    `linked(task)` runs in the same transaction before the task can be placed: rows that
    its `assign` is built from (a Jupyter service's) point at it by then.

    `experiment_id` / `reservation_id` (as sent by clients) must name the
    owner's own rows (the task must fit in the reservation it names), and
    `plugin_configs` may only change what the plugins allow a task to;
    checked here so every caller gets the checks.
    """
    if fields.get("plugin_configs"):
        validate_task_plugin_configs(fields["plugin_configs"])
    if fields.get("experiment_id") is not None:
        fields["experiment"] = _owned_experiment(owner, fields.pop("experiment_id"))
    fields.pop("experiment_id", None)
    if fields.get("reservation_id") is not None:
        fields["reservation"] = _owned_reservation(owner, fields.pop("reservation_id"))
        if refusal := task_fit_refusal(reservation=fields["reservation"], shape=_shape(fields)):
            raise refusal
    fields.pop("reservation_id", None)
    if fields.get("snapshot_id"):
        _refuse_unknown_snapshot(owner, fields["snapshot_id"])
    if fields.get("datasets") or fields.get("dataset_specs"):
        fields["dataset_digests"] = _pinned_datasets(
            owner, fields.get("datasets") or [], fields.get("dataset_specs") or []
        )
    if not fields.get("allow_unschedulable"):
        _refuse_unschedulable(fields)
    now = timezone.now()
    priority = fields.pop("priority", 5)
    fields.setdefault("max_retries", app_settings.DEFAULT_MAX_RETRIES)
    fields.setdefault("cancel_grace_seconds", app_settings.CANCEL_GRACE_SECONDS)
    # The submission's event and the round's are appended together at the end: the audit
    # chain's head is locked for that append, not through the round as well.
    with transaction.atomic(), appended_together():
        task = Task.objects.create(
            owner=owner,
            priority=priority,
            created_at=now,
            queued_at=now,
            dispatch_key=dispatch_key(priority=priority, queued_at=now)
            - fair_share_offset(owner=owner, priority=priority),
            **fields,
        )
        record(
            event_type="job_queued",
            user=owner,
            resource=f"task:{task.id}",
            action="submit",
            ip_address=actor.ip_address if actor else None,
            metadata={"job_name": task.job_name, "priority": priority, "kind": task.kind},
        )
        events.task_changed(task, event="task_update")
        if linked is not None:
            linked(task)
        if not dispatch_at_submission(task=task):
            events.wake_scheduler("task_submitted")
        # The answer's one related read, made before the commit: a connection lost after it must
        # not turn a created task into an error, which a client would answer by submitting again.
        prefetch_related_objects([task], "node_assignments")
    return task


def task_transition(
    *,
    task_id: Any,
    to: str,
    from_states: frozenset[str] | None = None,
    user: AbstractBaseUser | str | None = None,
    audit_metadata: dict | None = None,
    locked: Task | None = None,
    **fields: Any,
) -> Task | None:
    """Move a task to `to` if it is still in an allowed state; None if someone else won.

    The conditional UPDATE is what makes two writers (an API cancel and a
    worker's completion, two schedulers) unable to both succeed. `locked` is
    the caller's copy of the row, locked in this transaction and loaded with
    its owner: it is brought up to date in memory instead of re-read.
    """
    allowed = from_states if from_states is not None else sources_of(to)
    now = timezone.now()
    _stamp(fields, to, now)
    # No savepoint of its own: inside a caller's transaction a failure here
    # must roll all of it back anyway, and a savepoint costs two round trips.
    with transaction.atomic(savepoint=False):
        won = Task.objects.filter(id=task_id, status__in=allowed).update(status=to, updated_at=now, **fields)
        if not won:
            return None
        if locked is not None and not any(hasattr(value, "resolve_expression") for value in fields.values()):
            task = locked
            task.status, task.updated_at = to, now
            for name, value in fields.items():
                setattr(task, name, value)
        else:
            task = Task.objects.select_related("owner").get(id=task_id)
        _announce_transition(task, to, user=user, audit_metadata=audit_metadata)
    return task


def _stamp(fields: dict[str, Any], to: str, now: datetime) -> None:
    """The times a transition to `to` records, unless the caller gives them."""
    if to in FINAL_STATES:
        fields.setdefault("ended_at", now)
    if to == TaskStatus.RUNNING:
        fields.setdefault("started_at", now)


def _announce_transition(
    task: Task, to: str, *, user: AbstractBaseUser | str | None, audit_metadata: dict | None
) -> None:
    """The audit event, the publication and the scheduler wake-up of one transition (inside its transaction)."""
    entries, notices = _announcements(task, to, user=user, audit_metadata=audit_metadata)
    record_many(entries)
    events.send_all_on_commit(notices)


def _announcements(
    task: Task, to: str, *, user: AbstractBaseUser | str | None, audit_metadata: dict | None
) -> tuple[list[Entry], list[tuple[list[str], dict]]]:
    """What `_announce_transition` records and sends for one transition, to record and send now or
    with others: its audit events and its (groups, message) notices."""
    entries = []
    event_type = _AUDITED_TRANSITIONS.get(to)
    if event_type:
        entries.append(
            Entry(
                event_type=event_type,
                user=user if user is not None else task.owner,
                resource=f"task:{task.id}",
                action=to,
                success=to != TaskStatus.FAILED,
                error=task.error[:1000] if to == TaskStatus.FAILED else "",
                metadata={"status": to, "attempt": task.attempt, **(audit_metadata or {})},
            )
        )
    notices = [events.task_event(task, event="task_complete" if to in FINAL_STATES else "task_update")]
    if to in FINAL_STATES or to == TaskStatus.QUEUED:
        notices.append(events.scheduler_wake(f"task_{to}"))
    return entries, notices


class TasksChanged(Exception):
    """A task moved by `TaskTransitions` was no longer in its state before when written."""


class TaskTransitions:
    """Transitions of many tasks, written together.

    `move` checks the state machine against the row as the caller read it
    (locked or not), updates it in memory and prepares the audit events and
    notices `task_transition` would record and send; `write` then stores
    every moved task with one conditional UPDATE per (state before, changes)
    group, and records and sends what the moves prepared, in their order. A
    task moved twice (preparing -> running -> completed) is written once,
    with both transitions audited and published. Used by a worker's batch of
    run reports, where one UPDATE per transition would cost a round trip per
    task.
    """

    def __init__(self, *, now: datetime) -> None:
        self.now = now
        self._before: dict[uuid.UUID, str] = {}
        self._changes: dict[uuid.UUID, dict[str, Any]] = {}
        # The moves' audit events and notices, recorded and sent by `write` (in the order of the moves).
        self._entries: list[Entry] = []
        self._notices: list[tuple[list[str], dict]] = []

    def move(self, task: Task, to: str, **fields: Any) -> bool:
        """Move locked `task` to `to` if the state machine allows it from where it is."""
        if not can_transition(task.status, to):
            return False
        _stamp(fields, to, self.now)
        self._before.setdefault(task.id, task.status)
        self._changes.setdefault(task.id, {}).update(fields, status=to, updated_at=self.now)
        task.status, task.updated_at = to, self.now
        for name, value in fields.items():
            setattr(task, name, value)
        entries, notices = _announcements(task, to, user=None, audit_metadata=None)
        self._entries.extend(entries)
        self._notices.extend(notices)
        return True

    def write(self) -> None:
        """Store the moves so far; each task must still be in its state before (else `TasksChanged`,
        and the caller's transaction must roll back)."""
        groups: dict[tuple, list[uuid.UUID]] = {}
        for task_id, changes in self._changes.items():
            groups.setdefault((self._before[task_id], tuple(sorted(changes.items()))), []).append(task_id)
        for (before, changes), task_ids in groups.items():
            written = _transitions_written(ids=task_ids, before=before, **dict(changes))
            if written != len(task_ids):
                raise TasksChanged(f"{len(task_ids) - written} task(s) left {before} before the batch was written")
        record_many(self._entries)
        events.send_all_on_commit(self._notices)
        self._before.clear()
        self._changes.clear()
        self._entries, self._notices = [], []


def _transitions_update(*, ids: list[uuid.UUID], before: str, **changes: Any) -> tuple:
    return Task.objects.filter(checked_not_searched(Q(status=before)), id__in=ids), changes


_transitions_written = compiled_update_per_shape(_transitions_update)


def task_cancel(*, task: Task, actor: Actor) -> Task:
    """Cancel at once if queued; if running, ask the worker to stop it (it ends `cancelled`)."""
    with transaction.atomic():
        if task.status == TaskStatus.QUEUED:
            done = task_transition(
                task_id=task.id,
                to=TaskStatus.CANCELLED,
                from_states=frozenset({TaskStatus.QUEUED}),
                user=actor.user,
                cancelled_by=actor.user,
                cancel_requested_at=timezone.now(),
                **{**NO_OUTCOME, "failure_reason": Task.FailureReason.CANCELLED},
            )
            if done:
                return done
            task.refresh_from_db()
        if task.status in ACTIVE_STATES:
            pending = Task.objects.filter(id=task.id, status__in=ACTIVE_STATES, cancel_requested_at__isnull=True)
            updated = pending.update(cancel_requested_at=timezone.now(), cancelled_by=actor.user)
            task.refresh_from_db()
            if updated:
                record(
                    event_type="job_cancelled",
                    user=actor.user,
                    resource=f"task:{task.id}",
                    action="cancel_requested",
                    ip_address=actor.ip_address,
                    metadata={"status": task.status},
                )
                events.task_changed(task, event="task_update", extra={"cancel_requested": True})
                # Imported here: scheduler.services builds on this module.
                from scheduler.services import task_cancel_notify

                task_cancel_notify(task=task)
            return task
        raise Conflict(f"task is already {task.status}")


def task_set_priority(*, task: Task, priority: int, actor: Actor) -> Task:
    if not 1 <= priority <= 10:
        raise Invalid("priority must be between 1 and 10", details=[{"field": "priority", "message": "1..10"}])
    with transaction.atomic():
        locked = Task.objects.select_for_update().get(id=task.id)
        if locked.status in FINAL_STATES:
            raise Conflict(f"task is already {locked.status}")
        previous = locked.priority
        locked.priority = priority
        # Shift the key by the change only, keeping the fair-share offset it was queued with.
        locked.dispatch_key = locked.dispatch_key + (priority - previous)
        locked.save(update_fields=["priority", "dispatch_key", "updated_at"])
        record(
            event_type="job_priority_changed",
            user=actor.user,
            resource=f"task:{locked.id}",
            action="set_priority",
            ip_address=actor.ip_address,
            metadata={"from": previous, "to": priority},
        )
        events.task_changed(locked, event="task_update", extra={"priority_from": previous})
        events.wake_scheduler("priority_changed")
    return locked


def task_requeue(*, task: Task, actor: Actor) -> Task:
    """Operator action: run a failed or cancelled task again from scratch."""
    with transaction.atomic():
        now = timezone.now()
        ended = Task.objects.select_for_update().get(id=task.id)
        earlier = ended.earlier_attempts or []
        # An attempt that was placed, and not kept already (cancelled while queued, re-queued again).
        if ended.attempt and ended.attempt not in {attempt.get("attempt") for attempt in earlier}:
            earlier = with_attempt_ended(
                ended,
                ended_at=ended.ended_at or now,
                reason=ended.failure_reason,
                exit_code=ended.exit_code,
                error=ended.error,
            )
        done = task_transition(
            task_id=task.id,
            to=TaskStatus.QUEUED,
            from_states=frozenset({TaskStatus.FAILED, TaskStatus.CANCELLED}),
            user=actor.user,
            queued_at=now,
            dispatch_key=dispatch_key(priority=task.priority, queued_at=now),
            runnable_after=None,
            retry_count=0,
            worker=None,
            earlier_attempts=earlier,
            **NO_OUTCOME,
            cancel_requested_at=None,
            cancelled_by=None,
            started_at=None,
            ended_at=None,
        )
        if done is None:
            raise Conflict(f"only failed or cancelled tasks can be re-queued (task is {task.status})")
        record(
            event_type="job_requeued",
            user=actor.user,
            resource=f"task:{task.id}",
            action="requeue",
            ip_address=actor.ip_address,
        )
    return done


def _live_idempotency_record(api_key: ApiKey, key: str) -> IdempotencyRecord | None:
    cutoff = timezone.now() - timedelta(hours=app_settings.IDEMPOTENCY_TTL_HOURS)
    return (
        IdempotencyRecord.objects.select_related("task")
        .filter(api_key=api_key, key=key, created_at__gte=cutoff)
        .first()
    )


def _replayed(record: IdempotencyRecord, body_sha256: str) -> Task:
    if record.body_sha256 != body_sha256:
        raise Invalid(
            "Idempotency-Key was already used with a different request body",
            details=[{"field": "Idempotency-Key", "message": "Reused with a different body."}],
        )
    return record.task


def idempotency_prune(*, api_key: ApiKey | None = None, limit: int | None = None) -> int:
    """Delete records older than the TTL (of one key, or all; at most `limit` of them); returns how many."""
    cutoff = timezone.now() - timedelta(hours=app_settings.IDEMPOTENCY_TTL_HOURS)
    stale = IdempotencyRecord.objects.filter(created_at__lt=cutoff)
    if api_key is not None:
        stale = stale.filter(api_key=api_key)
    if limit is not None:
        stale = IdempotencyRecord.objects.filter(pk__in=stale.order_by("created_at").values("pk")[:limit])
    deleted, _ = stale.delete()
    return deleted


def task_submit_idempotent(
    *,
    owner: AbstractBaseUser,
    actor: Actor,
    api_key: ApiKey,
    idempotency_key: str,
    body_sha256: str,
    fields: dict[str, Any],
) -> tuple[Task, bool]:
    """`task_submit` once per (API key, Idempotency-Key); returns (task, replayed).

    A replay with the same body gets the first task back; with another body it
    is refused. Two concurrent first requests race on the unique constraint:
    the loser's transaction (task included) rolls back and it answers with the
    winner's task.
    """
    existing = _live_idempotency_record(api_key, idempotency_key)
    if existing is not None:
        return _replayed(existing, body_sha256), True
    # An expired record would block the insert below; drop this key's stale ones.
    idempotency_prune(api_key=api_key)
    try:
        with transaction.atomic():
            task = task_submit(owner=owner, actor=actor, **fields)
            IdempotencyRecord.objects.create(api_key=api_key, key=idempotency_key, body_sha256=body_sha256, task=task)
    except IntegrityError:
        winner = _live_idempotency_record(api_key, idempotency_key)
        if winner is None:
            raise
        return _replayed(winner, body_sha256), True
    return task, False
