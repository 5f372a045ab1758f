"""Writes that belong to the project package: API keys."""

from datetime import datetime

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone

from audit.services import record
from fetchml import apikeys, events
from fetchml.errors import Conflict, Invalid
from fetchml.models import ApiKey


def apikey_create(
    *,
    user: AbstractBaseUser,
    role: str = ApiKey.Role.USER,
    name: str = "",
    expires_at: datetime | None = None,
    created_by: AbstractBaseUser | None = None,
) -> tuple[ApiKey, str]:
    """A new key for `user`; returns the row and the raw key (shown once, never stored)."""
    if role not in ApiKey.Role.values:
        raise Invalid(f"role must be one of {', '.join(ApiKey.Role.values)}")
    if expires_at is not None and expires_at <= timezone.now():
        raise Invalid("expires_at must be in the future")
    minted = apikeys.mint()
    with transaction.atomic():
        key = ApiKey.objects.create(
            user=user,
            role=role,
            name=name[:100],
            prefix=minted.prefix,
            secret_hash=minted.secret_hash,
            expires_at=expires_at,
        )
        record(
            event_type="api_key_created",
            user=created_by or "",  # none: an operator at the console (manage.py), not the key's owner
            resource=f"api_key:{key.prefix}",
            action="create",
            metadata={"owner": user.get_username(), "role": role, "name": key.name},
        )
    return key, minted.raw


def apikey_revoke(*, api_key: ApiKey, revoked_by: AbstractBaseUser | None = None) -> ApiKey:
    """Revoke `api_key`: refused from now on, and every live connection made with it is closed."""
    with transaction.atomic():
        updated = ApiKey.objects.filter(pk=api_key.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
        if not updated:
            raise Conflict("API key is already revoked")
        record(
            event_type="api_key_revoked",
            user=revoked_by or api_key.user,
            resource=f"api_key:{api_key.prefix}",
            action="revoke",
            metadata={"owner": api_key.user.get_username()},
        )
        events.api_key_revoked(api_key.pk)
    api_key.refresh_from_db()
    return api_key


def user_get_or_create(*, username: str, is_staff: bool = False) -> AbstractBaseUser:
    user_model = get_user_model()
    user, created = user_model.objects.get_or_create(username=username, defaults={"is_staff": is_staff})
    if created:
        user.set_unusable_password()
        user.save(update_fields=["password"])
    return user
