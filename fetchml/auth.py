"""The one authentication check of FetchML: the X-API-Key header.

Used by DRF (`ApiKeyAuthentication`), by the WebSocket consumers
(`authenticate_raw_key`) and by SSE views, so every entry point applies the
same rules: well-formed, known, not revoked, not expired, and failed attempts
limited per client IP (a valid key is never refused for another's failures).
"""

import logging
from dataclasses import dataclass
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone
from rest_framework import authentication, exceptions

from fetchml import apikeys
from fetchml.conf import app_settings
from fetchml.models import ApiKey
from fetchml.ratelimits import (
    auth_failures_exceeded,
    count_api_key_request,
    count_auth_failure,
    first_use_in,
    seconds_until_reset,
)
from fetchml.shared_reads import SharedRead

logger = logging.getLogger("fetchml.auth")
HEADER = "HTTP_X_API_KEY"
_NO_HASH = "0" * 64


@dataclass(frozen=True)
class Actor:
    """Who is acting: passed to services so they can authorise and audit."""

    user: AbstractBaseUser
    role: str
    api_key_id: str | None = None
    ip_address: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == ApiKey.Role.ADMIN

    @property
    def is_worker(self) -> bool:
        return self.role == ApiKey.Role.WORKER


def client_ip(meta: dict) -> str | None:
    # The socket's address, never X-Forwarded-For: a client could vary that
    # header to escape the per-IP limit on failed attempts.
    return meta.get("REMOTE_ADDR") or None


def actor_from_request(request) -> Actor:
    key = request.auth if isinstance(getattr(request, "auth", None), ApiKey) else None
    if key is not None:
        role = key.role
    else:
        # A session is the admin's browsable API: every power of an admin key only for a
        # superuser (a staff account's permissions in the admin may be few).
        role = ApiKey.Role.ADMIN if request.user.is_superuser else ApiKey.Role.USER
    return Actor(
        user=request.user,
        role=role,
        api_key_id=str(key.id) if key else None,
        ip_address=client_ip(request.META),
    )


def _record_auth(*, success: bool, key: ApiKey | None, ip: str | None, error: str = "") -> None:
    from audit.services import record

    with transaction.atomic():
        record(
            event_type="auth_attempt",
            user=key.user if key else None,
            resource=f"api_key:{key.prefix}" if key else "api_key",
            action="authenticate",
            success=success,
            ip_address=ip,
            error=error,
        )


def authenticate_raw_key(raw: str | None, ip: str | None) -> ApiKey:
    """The ApiKey for a raw header value, or AuthenticationFailed/Throttled.

    Only failures are limited: a valid key gets through from an address whose failures ran out
    (one client's typos behind a shared NAT or proxy must not lock out its neighbours or the
    workers), while a wrong key from there is refused as throttled, neither counted nor audited
    again. Guessing stays hopeless: a key's secret carries 256 random bits.
    """
    parts = apikeys.split(raw) if raw else None
    key = None
    if parts is not None:
        key = ApiKey.objects.select_related("user").filter(prefix=parts[0]).first()
    # Hash and compare even for an unknown prefix, so the answer takes as long.
    matches = parts is not None and apikeys.secret_matches(parts[1], key.secret_hash if key else _NO_HASH)
    if key is None or not matches:
        reason = "missing API key" if not raw else "invalid API key"
        _fail(reason, None, ip)
    if not key.is_usable:
        _fail("revoked, expired or inactive API key", key, ip)
    # Successful use is audited (and last_used_at written) at most once per
    # interval per key, so a busy client does not balloon the chain.
    interval = app_settings.AUDIT_AUTH_SUCCESS_INTERVAL_SECONDS
    if first_use_in(interval, key_id=key.id):
        ApiKey.objects.filter(pk=key.pk).update(last_used_at=timezone.now())
        _record_auth(success=True, key=key, ip=ip)
    return key


def api_key_usable(key_id: Any) -> bool:
    """Whether a key accepted earlier still is (`ApiKey.is_usable`): for
    connections that outlive their handshake, re-checked at intervals. One query, by primary key."""
    return usable_api_keys([str(key_id)])[str(key_id)]


def usable_api_keys(key_ids: list[str]) -> dict[str, bool]:
    """`api_key_usable` of several keys, in one query (the live connections of a server process
    re-check their keys together, `fetchml.shared_reads`); a key not found is not usable."""
    keys = ApiKey.objects.select_related("user").only(
        "revoked_at", "expires_at", "role", "user__is_active", "user__is_staff"
    )
    usable = dict.fromkeys(key_ids, False)
    usable |= {str(key.pk): key.is_usable for key in keys.filter(pk__in=key_ids)}
    return usable


# Live connections re-check their keys at intervals: those of the same moment share one read.
_shared_usable_api_keys = SharedRead(usable_api_keys)


async def key_usable(key_id: str) -> bool:
    """`api_key_usable` for a live connection's re-check, in one read with its peers'."""
    return (await _shared_usable_api_keys([key_id])).get(key_id, False)


class TooManyFailedAuthentications(exceptions.Throttled):
    """Refused before the key is looked at: this address used up its failed authentications.

    `message` is what the client is told (DRF's `detail` gets its own "Expected available in ..."
    appended), so it can tell this apart from a key's ordinary request limit.
    """

    def __init__(self, wait: int):
        self.message = f"Too many failed authentication attempts from this address; try again in {wait} s"
        super().__init__(wait=wait, detail="Too many failed authentication attempts")


def _fail(reason: str, key: ApiKey | None, ip: str | None) -> None:
    wait = auth_failures_exceeded(ip, kind="api-key")
    if wait is not None:
        raise TooManyFailedAuthentications(wait)
    count_auth_failure(ip, kind="api-key")
    _record_auth(success=False, key=key, ip=ip, error=reason)
    logger.info("authentication failed: %s (ip=%s)", reason, ip)
    raise exceptions.AuthenticationFailed("Invalid or missing API key")


class ApiKeyAuthentication(authentication.BaseAuthentication):
    def authenticate(self, request):
        raw = request.META.get(HEADER)
        if raw is None:
            return None  # let session auth try; permissions then demand a login
        key = authenticate_raw_key(raw, client_ip(request.META))
        usage = count_api_key_request(request, key)
        if usage is not None and usage.limited:
            raise exceptions.Throttled(wait=seconds_until_reset(usage))
        return key.user, key

    def authenticate_header(self, request) -> str:
        # Makes DRF answer 401 (not 403) to unauthenticated requests.
        return 'ApiKey header="X-API-Key"'
