"""Operator console: API keys, user accounts, and the read-only base the other apps' admins share.

A key is created through `fetchml.services.apikey_create`; its raw secret is
shown once, in a message right after creation, and never again (only the
prefix is stored in clear). Keys are revoked, never deleted, so the audit
trail keeps pointing at something.

Django's user pages are replaced by `AuditedUserAdmin`, which writes through fetchml.services, so
each change of an account (deactivation, staff or superuser status, password, added or deleted)
is in the audit chain as `user_changed`.

Password logins (this console's, and the browsable API's at /api-auth/login/) go through
`LoginLimitMixin`: failed ones count against the client IP's limit on failed password logins (the
same limit as wrong API keys', counted apart: fetchml.ratelimits), and are audited as
`auth_attempt` like theirs.
"""

import logging
import re
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.admin.utils import unquote
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import UserAdmin, sensitive_post_parameters_m
from django.contrib.auth.base_user import AbstractBaseUser
from django.contrib.auth.forms import AuthenticationForm
from django.db import router, transaction
from django.db.models import IntegerField, Model, Q, QuerySet, UUIDField
from django.http import HttpRequest, HttpResponse
from django.utils import timezone

from audit.services import record
from fetchml.auth import Actor, client_ip
from fetchml.errors import ApplicationError
from fetchml.models import ApiKey
from fetchml.ratelimits import auth_failures_exceeded, count_auth_failure
from fetchml.services import apikey_create, apikey_revoke, user_delete, user_password_set, user_save

logger = logging.getLogger("fetchml.auth")


def admin_actor(request: HttpRequest) -> Actor:
    """The operator, acting with the admin role, as the services expect."""
    return Actor(user=request.user, role=ApiKey.Role.ADMIN, ip_address=client_ip(request.META))


def apply_to_each(
    modeladmin: admin.ModelAdmin,
    request: HttpRequest,
    rows: Iterable[Model],
    verb: str,
    apply: Callable[[Model, Actor], object],
    *,
    noun: str,
) -> None:
    """Run one service call per selected row, reporting successes and each failure.

    `verb` completes "Could not … <row>" and "Done: … <n> <noun>(s)".
    """
    actor = admin_actor(request)
    done = 0
    for row in rows:
        try:
            apply(row, actor)
        except ApplicationError as exc:
            modeladmin.message_user(request, f"Could not {verb} {row}: {exc.message}", messages.ERROR)
        else:
            done += 1
    if done:
        modeladmin.message_user(request, f"Done: {verb} {done} {noun}(s).", messages.SUCCESS)


# Fewer hex digits than this are taken as words only: too many ids would share them.
ID_PREFIX_MIN_DIGITS = 6
_HEX = re.compile(r"[0-9a-f]+")
_INTEGER = re.compile(r"[0-9]{1,18}")
_UUID_GROUPS = ((0, 8), (8, 12), (12, 16), (16, 20), (20, 32))


def uuid_prefix(term: str) -> str | None:
    """`term` as the start of a UUID's text form (hyphens where that form has them), or None."""
    digits = term.strip().lower().replace("-", "")
    if not (ID_PREFIX_MIN_DIGITS <= len(digits) <= 32 and _HEX.fullmatch(digits)):
        return None
    return "-".join(digits[start:end] for start, end in _UUID_GROUPS if digits[start:end])


def id_query(model: type[Model], term: str) -> Q | None:
    """The rows whose primary key `term` names: a whole id, a UUID's first digits, or a number."""
    term = term.strip()
    pk = model._meta.pk
    if isinstance(pk, UUIDField):
        try:
            return Q(pk=uuid.UUID(term))
        except ValueError:
            prefix = uuid_prefix(term)
            return Q(pk__startswith=prefix) if prefix else None
    if isinstance(pk, IntegerField) and _INTEGER.fullmatch(term):
        return Q(pk=int(term))
    return None


class IdSearchMixin(admin.ModelAdmin):
    """The search box also finds a row by its id, as the API, logs and audit rows print it:
    whole, or for UUIDs its first few digits (at least ID_PREFIX_MIN_DIGITS)."""

    def get_search_results(self, request: HttpRequest, queryset: QuerySet, search_term: str) -> tuple[QuerySet, bool]:
        results, may_have_duplicates = super().get_search_results(request, queryset, search_term)
        by_id = id_query(self.model, search_term)
        if by_id is None:
            return results, may_have_duplicates
        return results | queryset.filter(by_id), may_have_duplicates


class ReadOnlyModelAdmin(admin.ModelAdmin):
    """Lists and detail pages only: rows change through services (admin actions).

    The model-level change permission is kept so actions stay available, but a
    row's form is never saved (a blind save would overwrite concurrent state).
    """

    hidden_fields: tuple[str, ...] = ()

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return obj is None and super().has_change_permission(request)

    def get_fields(self, request: HttpRequest, obj: Model | None = None) -> list[str]:
        return [field.name for field in self.model._meta.fields if field.name not in self.hidden_fields]

    def get_readonly_fields(self, request: HttpRequest, obj: Model | None = None) -> list[str]:
        return self.get_fields(request, obj)


# How a key is referred to elsewhere: its masked form in this console (`fetchml_<prefix>_…`),
# a whole key, or an audit row's resource (`api_key:<prefix>`).
_KEY_REFERENCE = re.compile(r"(?:fetchml_|api_key:)([a-z0-9]+)(?:_\S*)?")


class ApiKeyCreationForm(forms.ModelForm):
    class Meta:
        model = ApiKey
        fields = ("user", "role", "name", "expires_at")

    def clean_user(self):
        user = self.cleaned_data.get("user")
        if user is not None and not user.is_active:
            raise forms.ValidationError("This user is inactive: their keys are refused. Reactivate them first.")
        return user

    def clean(self):
        cleaned = super().clean()
        user, role = cleaned.get("user"), cleaned.get("role")
        if user is not None and role == ApiKey.Role.ADMIN and not user.is_staff:
            self.add_error("role", "An admin key works only for a staff user: give them staff status first.")
        return cleaned

    def clean_expires_at(self):
        expires_at = self.cleaned_data.get("expires_at")
        if expires_at is not None and expires_at <= timezone.now():
            raise forms.ValidationError("Must be in the future.")
        return expires_at


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = (
        "masked",
        "name",
        "user",
        "role",
        "usable",
        "created_at",
        "expires_at",
        "revoked_at",
        "last_used_at",
    )
    list_filter = ("role", "revoked_at", "expires_at")
    list_select_related = ("user",)
    search_fields = ("prefix", "name", "user__username")
    search_help_text = "Key prefix (or the key as shown here or in audit rows), key name, or owner's username."
    ordering = ("-created_at",)
    actions = ["revoke_keys"]
    add_fields = ("user", "role", "name", "expires_at")
    shown_fields = ("masked", "user", "role", "name", "created_at", "expires_at", "revoked_at", "last_used_at")

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[ApiKey], search_term: str
    ) -> tuple[QuerySet[ApiKey], bool]:
        results, may_have_duplicates = super().get_search_results(request, queryset, search_term)
        reference = _KEY_REFERENCE.fullmatch(search_term.strip())
        if reference is None:
            return results, may_have_duplicates
        return results | queryset.filter(prefix=reference.group(1)), may_have_duplicates

    @admin.display(description="key")
    def masked(self, key: ApiKey) -> str:
        return f"fetchml_{key.prefix}_…"

    @admin.display(boolean=True, description="usable")
    def usable(self, key: ApiKey) -> bool:
        return key.is_usable

    def get_form(self, request: HttpRequest, obj: ApiKey | None = None, change: bool = False, **kwargs):
        if obj is None:
            kwargs["form"] = ApiKeyCreationForm
        return super().get_form(request, obj, change=change, **kwargs)

    def get_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> tuple[str, ...]:
        return self.add_fields if obj is None else self.shown_fields

    def get_readonly_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> tuple[str, ...]:
        return () if obj is None else self.shown_fields

    def has_change_permission(self, request: HttpRequest, obj: ApiKey | None = None) -> bool:
        return obj is None and super().has_change_permission(request)

    def has_delete_permission(self, request: HttpRequest, obj: ApiKey | None = None) -> bool:
        return False

    def save_model(self, request: HttpRequest, obj: ApiKey, form: forms.ModelForm, change: bool) -> None:
        if change:
            return  # existing keys are immutable; revoke and create a new one instead
        data = form.cleaned_data
        key, raw = apikey_create(
            user=data["user"],
            role=data["role"],
            name=data.get("name") or "",
            expires_at=data.get("expires_at"),
            created_by=request.user,
            ip_address=client_ip(request.META),
        )
        # The admin goes on with `obj` (log entry, redirect): make it the created row.
        for field in ApiKey._meta.concrete_fields:
            setattr(obj, field.attname, getattr(key, field.attname))
        obj._state.adding = False
        obj._state.db = key._state.db
        self.message_user(
            request,
            f"API key for {key.user.get_username()} ({key.role}): {raw} — copy it now, it will not be shown again.",
            messages.WARNING,
        )

    @admin.action(description="Revoke selected API keys", permissions=["change"])
    def revoke_keys(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        apply_to_each(
            self,
            request,
            queryset.select_related("user"),
            "revoke",
            lambda key, actor: apikey_revoke(api_key=key, revoked_by=actor.user, ip_address=actor.ip_address),
            noun="API key",
        )


# --- user accounts ---------------------------------------------------------------


class AuditedUserAdmin(UserAdmin):
    """Django's user pages, with every change of an account in the audit chain (`user_changed`).

    Deactivating a user refuses all their keys, and staff or superuser status is what the admin and
    admin keys act with: such changes, a password set, and accounts added or deleted are recorded
    with the operator, the request's address and the changed fields (never a password or hash),
    in the transaction of the change (through fetchml.services).
    """

    def save_model(self, request: HttpRequest, obj: AbstractBaseUser, form: forms.ModelForm, change: bool) -> None:
        user_save(
            user=obj,
            operator=request.user,
            ip_address=client_ip(request.META),
            created=not change,
            changed_fields=form.changed_data,
            previous_username=str(form.initial.get("username") or "") if change else "",
        )

    def delete_model(self, request: HttpRequest, obj: AbstractBaseUser) -> None:
        user_delete(users=[obj], operator=request.user, ip_address=client_ip(request.META))

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet) -> None:
        user_delete(users=list(queryset), operator=request.user, ip_address=client_ip(request.META))

    @sensitive_post_parameters_m
    def user_change_password(self, request: HttpRequest, id: str, form_url: str = "") -> HttpResponse:
        # Django's view saves the password itself: it runs here in a transaction that also
        # records the change, if the stored password (its hash) is no longer what it was.
        with transaction.atomic(using=router.db_for_write(self.model)):
            before = self.get_object(request, unquote(id)) if request.method == "POST" else None
            response = super().user_change_password(request, id, form_url)
            if before is not None:
                after = self.get_object(request, unquote(id))
                if after is not None and after.password != before.password:
                    user_password_set(user=after, operator=request.user, ip_address=client_ip(request.META))
        return response


admin.site.unregister(get_user_model())
admin.site.register(get_user_model(), AuditedUserAdmin)


# --- password logins ------------------------------------------------------------


def _record_password_login(
    *, success: bool, username: str, user: AbstractBaseUser | None, ip: str | None, path: str, error: str = ""
) -> None:
    """An `auth_attempt` of a password login. The username typed is the resource (the account
    tried); the password never leaves the form."""
    with transaction.atomic():
        record(
            event_type="auth_attempt",
            user=user,
            resource=f"user:{username}",
            action="login",
            success=success,
            ip_address=ip,
            error=error,
            metadata={"path": path},
        )


class LoginLimitMixin:
    """A Django login form held to the per-IP limit on failed authentications.

    While the client IP has used up its failed password logins (fetchml.ratelimits; wrong API keys
    are counted apart), the form is refused with an error before any password is checked, so a
    right password is refused too until the window passes: otherwise the answer would tell a
    guesser when it hit. A wrong username or password (or an inactive account's, which Django
    answers the same) is counted and audited; an accepted login is audited (the view then logs the
    user in). A right password refused by the admin because the account is not staff is neither:
    no password was guessed. The one rule for the limit stays in fetchml.ratelimits.
    """

    request: HttpRequest | None
    user_cache: AbstractBaseUser | None

    def clean(self) -> dict[str, Any]:
        ip = client_ip(self.request.META) if self.request is not None else None
        path = self.request.path if self.request is not None else ""
        wait = auth_failures_exceeded(ip, kind="password")
        if wait is not None:
            raise forms.ValidationError(
                "Too many failed login attempts from your address. Try again in %(wait)d seconds.",
                code="throttled",
                params={"wait": wait},
            )
        username = str(self.cleaned_data.get("username") or "")
        try:
            cleaned = super().clean()
        except forms.ValidationError:
            if self.user_cache is None:  # the username or password was wrong
                count_auth_failure(ip, kind="password")
                _record_password_login(
                    success=False, username=username, user=None, ip=ip, path=path, error="invalid username or password"
                )
                logger.info("password login failed (ip=%s, path=%s)", ip, path)
            raise
        if self.user_cache is not None:
            _record_password_login(success=True, username=username, user=self.user_cache, ip=ip, path=path)
        return cleaned


class LimitedAdminLoginForm(LoginLimitMixin, AdminAuthenticationForm):
    """/admin/login/."""


class LimitedLoginForm(LoginLimitMixin, AuthenticationForm):
    """/api-auth/login/, the browsable API's login (fetchml/urls.py)."""


admin.site.login_form = LimitedAdminLoginForm
