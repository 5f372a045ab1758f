"""Workers, their assignments (with fencing tokens) and capacity reservations."""

import uuid

from django.conf import settings
from django.db import models
from django.db.models import F, Q
from django.utils import timezone


class Worker(models.Model):
    class Status(models.TextChoices):
        ACTIVE = "active"
        DRAINING = "draining"
        OFFLINE = "offline"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=128, unique=True)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.OFFLINE)
    version = models.CharField(max_length=32, blank=True)
    hostname = models.CharField(max_length=255, blank=True)  # rank-0 address for multi-node jobs
    api_key = models.ForeignKey("fetchml.ApiKey", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    channel_name = models.CharField(max_length=255, blank=True)  # current WebSocket connection
    # The agent process behind that connection (its `hello.instance`): the same agent coming back
    # on a new connection replaces its old one at once, a second agent under the name does not.
    agent_instance = models.CharField(max_length=64, blank=True)
    # The agent process a drain was asked of: that process reconnecting goes on draining, even once
    # taken offline with nothing left to run. An operator's drain holds for a new process too until
    # the worker has drained; the agent's own (its SIGTERM) does not: a new process takes work.
    drained_instance = models.CharField(max_length=64, blank=True)
    drained_by_agent = models.BooleanField(default=False)

    # Capacity as reported in `hello`
    cpu_cores = models.PositiveIntegerField(default=0)
    memory_gb = models.PositiveIntegerField(default=0)
    gpu_count = models.PositiveIntegerField(default=0)
    gpu_type = models.CharField(max_length=64, blank=True)
    batch_slots = models.PositiveIntegerField(default=1)
    service_slots = models.PositiveIntegerField(default=0)

    # Capacity as the agent last declared it in `hello`. The capacity above never drops below what
    # running work holds (its `used_*` counter: the CHECK constraint); declared lower, it shrinks
    # back to this as those runs end (scheduler/counters.py). None: no hello since these fields
    # exist, and the capacity above stands.
    declared_cpu_cores = models.PositiveIntegerField(null=True, blank=True)
    declared_memory_gb = models.PositiveIntegerField(null=True, blank=True)
    declared_gpu_count = models.PositiveIntegerField(null=True, blank=True)
    declared_batch_slots = models.PositiveIntegerField(null=True, blank=True)
    declared_service_slots = models.PositiveIntegerField(null=True, blank=True)

    # Capacity in use, changed in the same transaction as the assignments that
    # hold it; the CHECK constraints make overcommit impossible at the database.
    used_cpu = models.PositiveIntegerField(default=0)
    used_memory_gb = models.PositiveIntegerField(default=0)
    used_gpus = models.PositiveIntegerField(default=0)
    used_batch_slots = models.PositiveIntegerField(default=0)
    used_service_slots = models.PositiveIntegerField(default=0)

    connected_at = models.DateTimeField(null=True, blank=True)
    last_heartbeat = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]
        indexes = [models.Index(fields=["status", "last_heartbeat"], name="worker_status_heartbeat")]
        constraints = [
            models.CheckConstraint(
                condition=Q(status__in=["active", "draining", "offline"]), name="worker_status_valid"
            ),
            models.CheckConstraint(
                condition=Q(
                    used_cpu__lte=F("cpu_cores"),
                    used_memory_gb__lte=F("memory_gb"),
                    used_gpus__lte=F("gpu_count"),
                    used_batch_slots__lte=F("batch_slots"),
                    used_service_slots__lte=F("service_slots"),
                ),
                name="worker_never_overcommitted",
            ),
        ]

    def __str__(self) -> str:
        return self.name

    @staticmethod
    def taking_work() -> Q:
        """The workers a dispatch round may give work: active, and connected now. One whose
        connection closed keeps its lease (and its runs) until it is back or the lease ends, but
        a run placed on it meanwhile would wait that long for nothing, and then count as a retry."""
        return Q(status=Worker.Status.ACTIVE) & ~Q(channel_name="")

    @property
    def takes_work(self) -> bool:
        return self.status == Worker.Status.ACTIVE and self.channel_name != ""


class Reservation(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending"  # booked for a future window
        ACTIVE = "active"
        CLAIMED = "claimed"
        EXPIRED = "expired"
        CANCELLED = "cancelled"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="reservations")
    gpu_count = models.PositiveIntegerField()
    gpu_type = models.CharField(max_length=64, blank=True)
    node_count = models.PositiveIntegerField(default=1)
    starts_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.ACTIVE)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["status", "expires_at"], name="reservation_status_expiry")]
        constraints = [
            models.CheckConstraint(condition=Q(gpu_count__gte=1, node_count__gte=1), name="reservation_positive"),
            models.CheckConstraint(condition=Q(expires_at__gt=F("starts_at")), name="reservation_window_valid"),
        ]

    def __str__(self) -> str:
        return f"{self.gpu_count}x{self.gpu_type or 'GPU'} on {self.node_count} node(s) for {self.owner}"


class NodeAssignment(models.Model):
    """One node of one attempt of a task on one worker.

    `token` is the fencing token: the worker quotes it in every message about
    the run, and a message whose token is not the current one is refused.
    """

    class Status(models.TextChoices):
        ASSIGNED = "assigned"
        ACKED = "acked"
        RUNNING = "running"
        FINISHED = "finished"
        LOST = "lost"
        CANCELLED = "cancelled"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    # Both foreign keys lead an index of Meta (assignment_once_per_node_attempt, assignment_worker_live):
    # no index of their own, one less to write at every change of an assignment.
    task = models.ForeignKey("tasks.Task", on_delete=models.CASCADE, related_name="node_assignments", db_index=False)
    attempt = models.PositiveIntegerField()
    node_id = models.PositiveIntegerField(default=0)  # rank within a multi-node job
    worker = models.ForeignKey(Worker, on_delete=models.CASCADE, related_name="assignments", db_index=False)
    token = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.ASSIGNED)
    # Capacity this assignment holds on its worker while `holds_capacity`.
    holds_capacity = models.BooleanField(default=True)
    slot_kind = models.CharField(max_length=10, default="batch")
    cpu = models.PositiveIntegerField(default=0)
    memory_gb = models.PositiveIntegerField(default=0)
    gpus = models.PositiveIntegerField(default=0)
    gpu_indices = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    acked_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["task", "attempt", "node_id"]
        indexes = [models.Index(fields=["worker", "holds_capacity"], name="assignment_worker_live")]
        constraints = [
            models.UniqueConstraint(fields=["task", "attempt", "node_id"], name="assignment_once_per_node_attempt"),
        ]

    def __str__(self) -> str:
        return f"{self.task_id} attempt {self.attempt} node {self.node_id} on {self.worker_id}"
