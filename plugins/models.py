"""Operator configuration of tracking plugins (the plugin classes live in code)."""

from django.conf import settings as django_settings
from django.db import models
from django.db.models import Q
from django.utils import timezone


class PluginConfig(models.Model):
    class Mode(models.TextChoices):
        SIDECAR = "sidecar"
        REMOTE = "remote"
        DISABLED = "disabled"

    name = models.CharField(max_length=64, primary_key=True)
    enabled = models.BooleanField(default=False)
    mode = models.CharField(max_length=10, choices=Mode.choices, default=Mode.DISABLED)
    image = models.CharField(max_length=255, blank=True)
    settings = models.JSONField(default=dict, blank=True)
    updated_at = models.DateTimeField(default=timezone.now)
    updated_by = models.ForeignKey(
        django_settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        verbose_name = "plugin"
        constraints = [
            models.CheckConstraint(condition=Q(mode__in=["sidecar", "remote", "disabled"]), name="plugin_mode_valid"),
        ]

    def __str__(self) -> str:
        return self.name
