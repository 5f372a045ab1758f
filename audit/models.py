"""The audit chain: append-only events, each hashing the one before it."""

from django.db import models


class EventType(models.TextChoices):
    # The spec's values
    JOB_QUEUED = "job_queued"
    JOB_STARTED = "job_started"
    JOB_COMPLETED = "job_completed"
    FILE_ACCESS = "file_access"
    AUTH_ATTEMPT = "auth_attempt"
    PLUGIN_CONFIGURED = "plugin_configured"
    SCHEDULER_DRAIN = "scheduler_drain"
    AUDIT_VERIFIED = "audit_verified"
    # FetchML's additions
    JOB_CANCELLED = "job_cancelled"
    JOB_PRIORITY_CHANGED = "job_priority_changed"
    JOB_REQUEUED = "job_requeued"
    RESERVATION_CHANGED = "reservation_changed"
    API_KEY_CREATED = "api_key_created"
    API_KEY_REVOKED = "api_key_revoked"
    WORKER_CHANGED = "worker_changed"
    JUPYTER_CHANGED = "jupyter_changed"
    USER_CHANGED = "user_changed"


class AuditEvent(models.Model):
    sequence_num = models.BigIntegerField(primary_key=True)
    timestamp = models.DateTimeField()
    event_type = models.CharField(max_length=32, choices=EventType.choices)
    user_id = models.CharField(max_length=150, blank=True)
    resource = models.CharField(max_length=255, blank=True)
    action = models.CharField(max_length=64, blank=True)
    success = models.BooleanField(default=True)
    ip_address = models.CharField(max_length=45, blank=True)
    error = models.TextField(blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    prev_hash = models.CharField(max_length=64)
    event_hash = models.CharField(max_length=64)

    class Meta:
        ordering = ["sequence_num"]
        indexes = [
            models.Index(fields=["timestamp"], name="audit_timestamp"),
            models.Index(fields=["event_type", "timestamp"], name="audit_type_time"),
            models.Index(fields=["user_id", "timestamp"], name="audit_user_time"),
            # "Everything that happened to task X": a resource's events in chain order.
            models.Index(fields=["resource", "sequence_num"], name="audit_resource_seq"),
        ]

    def __str__(self) -> str:
        return f"#{self.sequence_num} {self.event_type}"


class ChainHead(models.Model):
    """A single row locked by every append, so concurrent writers never fork the chain."""

    id = models.PositiveSmallIntegerField(primary_key=True, default=1)
    sequence_num = models.BigIntegerField(default=0)
    event_hash = models.CharField(max_length=64, default="0" * 64)

    class Meta:
        constraints = [models.CheckConstraint(condition=models.Q(id=1), name="audit_single_chain_head")]
