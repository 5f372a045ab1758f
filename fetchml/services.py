"""Writes that belong to the project package: API keys, and user accounts changed in the operator console."""

from datetime import datetime
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone

from audit.services import Entry, record, record_many
from fetchml import apikeys, events
from fetchml.auth import Actor
from fetchml.errors import Conflict, Invalid
from fetchml.models import ApiKey


def apikey_create(
    *,
    user: AbstractBaseUser,
    role: str = ApiKey.Role.USER,
    name: str = "",
    expires_at: datetime | None = None,
    created_by: AbstractBaseUser | None = None,
    ip_address: str | None = None,
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
            ip_address=ip_address,
            metadata={"owner": user.get_username(), "role": role, "name": key.name},
        )
    return key, minted.raw


def apikey_revoke(
    *, api_key: ApiKey, revoked_by: AbstractBaseUser | None = None, ip_address: str | None = None
) -> ApiKey:
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
            ip_address=ip_address,
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


# --- user accounts changed in the operator console ---------------------------------------------
#
# The admin's user pages (fetchml.admin.AuditedUserAdmin) write through these, so a deactivation
# (which refuses every key of the account), a change of staff or superuser status, a password set
# and an account added or deleted are in the chain, not only in Django's LogEntry.

_PASSWORD_FIELDS = frozenset({"password", "password1", "password2", "usable_password"})
_SECURITY_FLAGS = ("is_active", "is_staff", "is_superuser")


def _user_resource(user: AbstractBaseUser) -> str:
    return f"user:{user.get_username()}"


def _changed_fields(fields: list[str]) -> list[str]:
    """Names of the changed fields, the password's form fields all named `password` (their values
    are never recorded)."""
    return sorted({"password" if name in _PASSWORD_FIELDS else name for name in fields})


def user_save(
    *,
    user: AbstractBaseUser,
    operator: AbstractBaseUser,
    ip_address: str | None = None,
    created: bool,
    changed_fields: list[str],
    previous_username: str = "",
) -> AbstractBaseUser:
    """Save a user added or edited in the operator console, and record who changed which fields.

    The metadata names the changed fields and gives the new value of the security flags among them
    (`is_active`, `is_staff`, `is_superuser`; all three for a new account); never a password or
    its hash. A save that changed nothing is not recorded.
    """
    changed = _changed_fields(changed_fields)
    with transaction.atomic():
        user.save()
        if not created and not changed:
            return user
        metadata: dict[str, Any] = {"changed": changed}
        for flag in _SECURITY_FLAGS:
            if created or flag in changed:
                metadata[flag] = bool(getattr(user, flag, False))
        if previous_username and previous_username != user.get_username():
            metadata["previous_username"] = previous_username
        record(
            event_type="user_changed",
            user=operator,
            resource=_user_resource(user),
            action="create" if created else "change",
            ip_address=ip_address,
            metadata=metadata,
        )
        if "is_active" in changed and not user.is_active:
            _close_connections_of(user)
            _wind_down_work_of(user, operator=operator, ip_address=ip_address)
    return user


def _wind_down_work_of(user: AbstractBaseUser, *, operator: AbstractBaseUser, ip_address: str | None) -> None:
    """A deactivated account's queued tasks are cancelled (they would start on no one's behalf) and
    its Jupyter services stopped (their token would still open them); its running batch tasks
    finish, their results kept. Each change is the operator's, audited as such."""
    # Imported here: the task and service apps build on this module.
    from jupyter.models import JupyterService
    from jupyter.services import LIVE, jupyter_stop
    from tasks.models import Task
    from tasks.services import task_cancel
    from tasks.states import TaskStatus

    actor = Actor(user=operator, role=ApiKey.Role.ADMIN, ip_address=ip_address)
    for service in JupyterService.objects.filter(owner=user, status__in=LIVE):
        jupyter_stop(service=service, actor=actor)
    for task in Task.objects.filter(owner=user, status=TaskStatus.QUEUED):
        task_cancel(task=task, actor=actor)


def _close_connections_of(user: AbstractBaseUser) -> None:
    """After commit, end the live connections made with any key of `user`: a deactivated or
    deleted account's keys are refused from now on (their periodic re-check would find it later)."""
    for key_id in ApiKey.objects.filter(user=user).values_list("pk", flat=True):
        events.api_key_revoked(key_id)


def user_delete(*, users: list[AbstractBaseUser], operator: AbstractBaseUser, ip_address: str | None = None) -> None:
    """Delete users (with their API keys, which cascade) and record each deletion."""
    entries = [
        Entry(
            event_type="user_changed",
            user=operator,
            resource=_user_resource(user),
            action="delete",
            ip_address=ip_address,
            metadata={"changed": []},
        )
        for user in users
    ]
    with transaction.atomic():
        for user in users:
            _close_connections_of(user)
            user.delete()
        record_many(entries)


def user_password_set(*, user: AbstractBaseUser, operator: AbstractBaseUser, ip_address: str | None = None) -> None:
    """Record a password set (or password logins disabled) by an operator for `user`.

    Django's password page saves the password itself; call this in that page's transaction.
    """
    with transaction.atomic():
        record(
            event_type="user_changed",
            user=operator,
            resource=_user_resource(user),
            action="set_password",
            ip_address=ip_address,
            metadata={"changed": ["password"], "usable_password": user.has_usable_password()},
        )
