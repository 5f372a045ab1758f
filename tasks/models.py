"""Experiments, tasks and their logs. The state rules live in tasks/states.py."""

import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

from tasks.states import FINAL_STATES, TaskStatus


class Experiment(models.Model):
    class Status(models.TextChoices):
        ACTIVE = "active"
        ARCHIVED = "archived"
        DELETED = "deleted"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="experiments")
    name = models.CharField(max_length=128)
    description = models.TextField(blank=True, max_length=10_000)
    commit_id = models.CharField(max_length=64, blank=True)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.ACTIVE)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["owner", "-created_at"], name="experiment_owner_recent")]
        constraints = [
            models.CheckConstraint(
                condition=Q(status__in=["active", "archived", "deleted"]), name="experiment_status_valid"
            ),
            # A name identifies an experiment among its owner's: archived ones keep theirs (they can be
            # unarchived), a deleted one gives it up.
            models.UniqueConstraint(
                fields=["owner", "name"], condition=~Q(status="deleted"), name="experiment_owner_name_unique"
            ),
        ]

    def __str__(self) -> str:
        return self.name


class Task(models.Model):
    class Kind(models.TextChoices):
        BATCH = "batch"
        SERVICE = "service"

    class FailureReason(models.TextChoices):
        EXIT_CODE = "exit_code"
        TIMEOUT = "timeout"
        WORKER_LOST = "worker_lost"
        PREPARATION = "preparation"
        CANCELLED = "cancelled"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    # Foreign keys led by an index of Meta.indexes get no index of their own: one index less
    # to write at every change of state (task_owner_recent, task_worker_status).
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="tasks", db_index=False)
    # Nullable foreign keys are indexed only where set (Meta.indexes): most tasks have none of them.
    experiment = models.ForeignKey(
        Experiment, null=True, blank=True, on_delete=models.SET_NULL, related_name="tasks", db_index=False
    )
    job_name = models.CharField(max_length=64)
    kind = models.CharField(max_length=10, choices=Kind.choices, default=Kind.BATCH)
    status = models.CharField(max_length=12, choices=TaskStatus.choices, default=TaskStatus.QUEUED)
    priority = models.PositiveSmallIntegerField(default=5)
    # Order key for dispatch: priority minus aging rate x enqueue time. Linear
    # aging keeps the order of "priority + rate x age" and lets an index serve it.
    dispatch_key = models.FloatField(default=0.0)

    # What to run
    entrypoint = models.TextField(blank=True, max_length=4096)
    args = models.TextField(blank=True, max_length=16_384)
    env = models.JSONField(default=dict, blank=True)
    snapshot_id = models.CharField(max_length=64, blank=True)
    datasets = models.JSONField(default=list, blank=True)
    dataset_specs = models.JSONField(default=list, blank=True)
    # name -> sha256 of each server dataset as of submission: the bytes every attempt must read.
    dataset_digests = models.JSONField(default=dict, blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    plugin_configs = models.JSONField(default=dict, blank=True)

    # Resources (per node)
    cpu = models.PositiveIntegerField(default=0)
    memory_gb = models.PositiveIntegerField(default=0)
    gpu = models.PositiveIntegerField(default=0)
    gpu_type = models.CharField(max_length=64, blank=True)
    node_count = models.PositiveIntegerField(default=1)
    reservation = models.ForeignKey(
        "scheduler.Reservation", null=True, blank=True, on_delete=models.SET_NULL, related_name="tasks", db_index=False
    )
    allow_unschedulable = models.BooleanField(default=False)

    # Run policy
    timeout_seconds = models.PositiveIntegerField(null=True, blank=True)
    cancel_grace_seconds = models.PositiveIntegerField(default=30)
    max_retries = models.PositiveIntegerField(default=3)
    retry_count = models.PositiveIntegerField(default=0)
    retry_on_exit_code = models.BooleanField(default=False)

    # Progress
    attempt = models.PositiveIntegerField(default=0)  # bumped by each dispatch; part of the fencing token
    worker = models.ForeignKey(
        "scheduler.Worker", null=True, blank=True, on_delete=models.SET_NULL, related_name="tasks", db_index=False
    )
    created_at = models.DateTimeField(default=timezone.now)
    queued_at = models.DateTimeField(default=timezone.now)
    runnable_after = models.DateTimeField(null=True, blank=True)  # retry back-off
    started_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)
    cancel_requested_at = models.DateTimeField(null=True, blank=True)
    cancelled_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+", db_index=False
    )
    exit_code = models.IntegerField(null=True, blank=True)
    failure_reason = models.CharField(max_length=12, choices=FailureReason.choices, blank=True)
    error = models.TextField(blank=True)
    output = models.TextField(blank=True)
    plugin_status = models.JSONField(default=dict, blank=True)
    # How each attempt that was retried ended ({attempt, worker_id, ended_at, failure_reason,
    # exit_code, error}), oldest first: the outcome fields above are cleared when the next
    # attempt is placed, and the owner should still see why the first one did not finish.
    earlier_attempts = models.JSONField(default=list, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            # Serves the dispatch query: runnable tasks, best first.
            models.Index(
                fields=["-dispatch_key", "created_at"],
                name="task_runnable_by_priority",
                condition=Q(status="queued"),
            ),
            # Serves the starvation check: the longest-waiting queued tasks first.
            models.Index(fields=["queued_at"], name="task_queued_since", condition=Q(status="queued")),
            # Serves the fair-share count at every submission: the owner's queued tasks at a priority or above.
            models.Index(fields=["owner", "priority"], name="task_queued_by_owner", condition=Q(status="queued")),
            models.Index(fields=["owner", "-created_at"], name="task_owner_recent"),
            models.Index(fields=["status", "ended_at"], name="task_status_ended"),
            models.Index(fields=["worker", "status"], name="task_worker_status"),
            models.Index(fields=["experiment"], condition=Q(experiment__isnull=False), name="task_experiment_set"),
            models.Index(fields=["reservation"], condition=Q(reservation__isnull=False), name="task_reservation_set"),
            models.Index(
                fields=["cancelled_by"], condition=Q(cancelled_by__isnull=False), name="task_cancelled_by_set"
            ),
        ]
        constraints = [
            models.CheckConstraint(condition=Q(priority__gte=1, priority__lte=10), name="task_priority_1_10"),
            models.CheckConstraint(condition=Q(status__in=TaskStatus.values), name="task_status_valid"),
            models.CheckConstraint(condition=Q(kind__in=["batch", "service"]), name="task_kind_valid"),
            models.CheckConstraint(
                condition=Q(cpu__gte=0, memory_gb__gte=0, gpu__gte=0, node_count__gte=1),
                name="task_resources_non_negative",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.job_name} ({self.status})"

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATES


class TaskLogLine(models.Model):
    """Captured stdout/stderr, one row per line, appended by the worker consumer."""

    class Stream(models.TextChoices):
        STDOUT = "stdout"
        STDERR = "stderr"

    id = models.BigAutoField(primary_key=True)
    # Led by tasklog_task_order: no index of its own.
    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="log_lines", db_index=False)
    attempt = models.PositiveIntegerField()
    node_id = models.PositiveIntegerField(default=0)  # rank within a multi-node job
    # The line's place in its node's output, counted by the agent: a batch the agent sends
    # again (its first answer lost) is stored once. Null for lines sent without one.
    seq = models.PositiveIntegerField(null=True, blank=True)
    stream = models.CharField(max_length=6, choices=Stream.choices)
    line = models.TextField()
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [models.Index(fields=["task", "id"], name="tasklog_task_order")]
        constraints = [
            models.UniqueConstraint(
                fields=["task", "attempt", "node_id", "seq"],
                condition=models.Q(seq__isnull=False),
                name="tasklog_line_once",
            )
        ]


class IdempotencyRecord(models.Model):
    """Remembers a POST /v1/tasks by (API key, Idempotency-Key) for safe retries."""

    api_key = models.ForeignKey("fetchml.ApiKey", on_delete=models.CASCADE, related_name="+")
    key = models.CharField(max_length=255)
    body_sha256 = models.CharField(max_length=64)
    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["api_key", "key"], name="idempotency_key_per_api_key")]
        indexes = [models.Index(fields=["created_at"], name="idempotency_created")]  # the scheduler's pruning
