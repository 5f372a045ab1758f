"""Rows describing stored bytes: keys into the file storage and sha256 digests, never the bytes."""

import uuid

from django.conf import settings
from django.db import models
from django.utils import timezone

# Digests and names are validated by the services (the API's only way in).
ARTIFACT_PATH_MAX_BYTES = 1024


class Snapshot(models.Model):
    """A code archive (.tar.gz), content-addressed: its id is the sha256 of its bytes."""

    sha256 = models.CharField(primary_key=True, max_length=64)
    size = models.PositiveBigIntegerField()
    storage_key = models.CharField(max_length=255, unique=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return self.sha256


class SnapshotOwner(models.Model):
    """Who uploaded these bytes. Identical bytes are stored once, but reading
    them is granted only to those who uploaded them (and admins)."""

    snapshot = models.ForeignKey(Snapshot, on_delete=models.CASCADE, related_name="owners")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["snapshot", "user"], name="snapshot_owner_once")]

    def __str__(self) -> str:
        return f"{self.snapshot_id} of {self.user_id}"


class Dataset(models.Model):
    """A named, immutable blob in its owner's namespace (`fetchml://datasets/<name>`)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="datasets")
    name = models.CharField(max_length=128)
    description = models.TextField(blank=True, max_length=10_000)
    size = models.PositiveBigIntegerField()
    sha256 = models.CharField(max_length=64)
    storage_key = models.CharField(max_length=255, unique=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(fields=["owner", "name"], name="dataset_name_per_owner"),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def uri(self) -> str:
        return f"fetchml://datasets/{self.name}"


class Artifact(models.Model):
    """One file produced by one attempt of a task.

    Uploaded rows start incomplete; the attempt's commit marks exactly the
    manifest's rows complete, and only complete rows are ever listed.
    """

    id = models.BigAutoField(primary_key=True)
    task = models.ForeignKey("tasks.Task", on_delete=models.CASCADE, related_name="artifacts")
    attempt = models.PositiveIntegerField()
    path = models.CharField(max_length=ARTIFACT_PATH_MAX_BYTES)
    size = models.PositiveBigIntegerField()
    sha256 = models.CharField(max_length=64)
    storage_key = models.CharField(max_length=255, unique=True)
    created_at = models.DateTimeField(default=timezone.now)
    complete = models.BooleanField(default=False)

    class Meta:
        ordering = ["path"]
        indexes = [models.Index(fields=["task", "complete", "attempt"], name="artifact_task_listing")]
        constraints = [
            models.UniqueConstraint(fields=["task", "attempt", "path"], name="artifact_path_per_attempt"),
        ]

    def __str__(self) -> str:
        return f"{self.task_id}/{self.path} (attempt {self.attempt})"
