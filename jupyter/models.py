"""Jupyter services: long-running service-slot tasks with a URL and a token."""

import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone


class JupyterService(models.Model):
    class Status(models.TextChoices):
        STARTING = "starting"
        RUNNING = "running"
        STOPPING = "stopping"
        STOPPED = "stopped"
        ERROR = "error"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="jupyter_services")
    name = models.CharField(max_length=64)
    workspace = models.CharField(max_length=1024, blank=True)
    image = models.CharField(max_length=255, blank=True)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.STARTING)
    task = models.OneToOneField("tasks.Task", null=True, blank=True, on_delete=models.SET_NULL, related_name="jupyter")
    url = models.URLField(blank=True)
    # The notebook token, sealed by jupyter.services (never stored in clear);
    # shown to the owner only.
    token_sealed = models.TextField(blank=True)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    last_activity_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(
                condition=Q(status__in=["starting", "running", "stopping", "stopped", "error"]),
                name="jupyter_status_valid",
            ),
        ]

    def __str__(self) -> str:
        return self.name
