"""API keys: the only credential of the API and of worker agents."""

import uuid

from django.conf import settings
from django.db import models
from django.utils import timezone


class ApiKey(models.Model):
    class Role(models.TextChoices):
        USER = "user", "user"
        ADMIN = "admin", "admin"
        WORKER = "worker", "worker"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100, blank=True)
    role = models.CharField(max_length=10, choices=Role.choices, default=Role.USER)
    # The public part of the key, used to find the row; the secret is only hashed.
    prefix = models.CharField(max_length=16, unique=True, editable=False)
    secret_hash = models.CharField(max_length=64, editable=False)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        verbose_name = "API key"
        constraints = [
            models.CheckConstraint(condition=models.Q(role__in=["user", "admin", "worker"]), name="apikey_role_valid"),
        ]

    def __str__(self) -> str:
        return f"fetchml_{self.prefix}_… ({self.user}, {self.role})"

    @property
    def is_usable(self) -> bool:
        """The one rule of a key that works: not revoked, not expired, its user active, and an
        admin key's user still staff (an operator who loses that status loses the key's powers).

        Reads `user` (load keys with `select_related("user")` where many are checked).
        """
        now = timezone.now()
        live = self.revoked_at is None and (self.expires_at is None or self.expires_at > now)
        return live and self.user.is_active and (self.role != self.Role.ADMIN or self.user.is_staff)
