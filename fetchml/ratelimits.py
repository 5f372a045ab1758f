"""Rate limits, counted by django-ratelimit in the shared cache.

Requests are limited per verified API key (never per a header a client can
vary), with a rate per method class; two keys of one user have separate
counters (a user with several machines gets a budget per key). Logged-in
sessions are limited per user. Failed authentications are limited per client
IP, more strictly, against key guessing. The counters live in the default
cache, which is Redis (shared by all processes) when REDIS_URL is set.

When that cache cannot be reached (Redis restarting) or does not answer within
its socket time-out (settings), nothing is counted and the request goes on,
with a warning: a rate limit guards the service against overload, and
refusing every request while Redis is away would be the outage it guards
against. Key guessing stays hopeless without it (keys carry 256 random bits).
After a failure the process leaves the cache alone for `CACHE_RETRY_SECONDS`,
so that a silent Redis costs one request a time-out, not every request.
"""

import logging
import time
from dataclasses import dataclass
from types import SimpleNamespace

from django.core.cache import cache
from django_ratelimit.core import get_usage
from redis import RedisError
from rest_framework.throttling import BaseThrottle

from fetchml.conf import app_settings
from fetchml.models import ApiKey

logger = logging.getLogger("fetchml.ratelimits")

_SAFE = {"GET", "HEAD", "OPTIONS"}

CACHE_RETRY_SECONDS = 5.0


class _CacheBreaker:
    """Whether the cache is worth asking: not for a while after it failed."""

    def __init__(self) -> None:
        self.failed_until = float("-inf")  # monotonic time

    def worth_asking(self) -> bool:
        return time.monotonic() >= self.failed_until

    def failed(self, what: str, exc: Exception) -> None:
        self.failed_until = time.monotonic() + CACHE_RETRY_SECONDS
        logger.warning("%s: the cache is unreachable (%s); left alone for %.0f s", what, exc, CACHE_RETRY_SECONDS)

    def reset(self) -> None:
        self.failed_until = float("-inf")


cache_breaker = _CacheBreaker()


@dataclass(frozen=True)
class Usage:
    limit: int
    remaining: int
    reset_at: int  # Unix time the window ends
    limited: bool


def _usage(group: str, identity: str, rate: str, *, increment: bool) -> Usage | None:
    # django-ratelimit only reads the method from the request; the key is ours.
    shim = SimpleNamespace(method="GET", META={})
    if not cache_breaker.worth_asking():
        return None
    try:
        usage = get_usage(shim, group=group, key=lambda _g, _r: identity, rate=rate, increment=increment)
    except RedisError as exc:
        cache_breaker.failed(f"{group} not counted", exc)
        return None
    if usage is None:
        return None
    return Usage(
        limit=usage["limit"],
        remaining=max(usage["limit"] - usage["count"], 0),
        reset_at=int(time.time() + usage["time_left"]),
        limited=usage["should_limit"],
    )


def rate_for_method(method: str) -> tuple[str, str]:
    if method == "POST":
        return "post", app_settings.RATE_LIMIT_POST
    if method in _SAFE:
        return "get", app_settings.RATE_LIMIT_GET
    return "other", app_settings.RATE_LIMIT_OTHER


def consume_request(identity: str, method: str) -> Usage | None:
    """Count one request of this identity; the Usage says whether to refuse it."""
    group, rate = rate_for_method(method)
    return _usage(f"fetchml.api.{group}", identity, rate, increment=True)


# What failed, each counted on its own: junk API keys sent from an address (a broken script, a
# scanner) must not lock the operators behind that address out of their password logins.
AUTH_KINDS = ("api-key", "password")


def auth_failures_exceeded(ip: str | None, *, kind: str) -> int | None:
    """Seconds until this IP may try again if it used up its failed attempts of `kind` (one of
    AUTH_KINDS), else None."""
    usage = _usage(_auth_group(kind), ip or "unknown", app_settings.RATE_LIMIT_AUTH_FAILURES, increment=False)
    if usage and usage.remaining <= 0:
        return seconds_until_reset(usage)
    return None


def count_auth_failure(ip: str | None, *, kind: str) -> None:
    _usage(_auth_group(kind), ip or "unknown", app_settings.RATE_LIMIT_AUTH_FAILURES, increment=True)


def _auth_group(kind: str) -> str:
    if kind not in AUTH_KINDS:
        raise ValueError(f"unknown kind of authentication: {kind!r}")
    return f"fetchml.auth-failure.{kind}"


def first_use_in(interval: int, *, key_id: object) -> bool:
    """Whether this is the key's first successful use in `interval` seconds (so it is audited);
    True as well when the cache cannot say (an extra audit event beats a missing one)."""
    if not cache_breaker.worth_asking():
        return True
    try:
        return bool(cache.add(f"fetchml:auth-ok:{key_id}", 1, timeout=interval))
    except RedisError as exc:
        cache_breaker.failed("successful key use audited without its interval", exc)
        return True


def seconds_until_reset(usage: Usage) -> int:
    return max(usage.reset_at - int(time.time()), 1)


def count_api_key_request(request, key: ApiKey) -> Usage | None:
    """Count one request of a verified API key and leave the usage on the request.

    Called by the authentication itself, so every authenticated request is
    counted (also those refused later with 403/404), keyed on the key's id and
    never on anything else the client sends. Worker keys are not counted: a
    worker's requests (downloads for its runs, their outputs) follow the work
    the scheduler gives it, and a fleet may share one key; a limit would stall
    finished runs in `collecting`, holding their slots, across the whole fleet.
    """
    if key.role == ApiKey.Role.WORKER:
        return None
    usage = consume_request(f"key:{key.id}", request.method)
    _django_request(request).fetchml_ratelimit = usage
    return usage


def _django_request(request):
    return getattr(request, "_request", request)


class ApiKeyRateThrottle(BaseThrottle):
    """DRF throttle for requests not counted at authentication: logged-in sessions.

    The usage is left on the request so `ApiErrorMiddleware` can put the
    X-RateLimit-* headers on the response, whatever the view returned.
    """

    def allow_request(self, request, view) -> bool:
        self._wait: float | None = None
        django_request = _django_request(request)
        if hasattr(django_request, "fetchml_ratelimit"):
            return True  # an API key, already counted by ApiKeyAuthentication
        if not (request.user and request.user.is_authenticated):
            return True
        usage = consume_request(f"user:{request.user.pk}", request.method)
        django_request.fetchml_ratelimit = usage
        if usage and usage.limited:
            self._wait = seconds_until_reset(usage)
            return False
        return True

    def wait(self) -> float | None:
        return self._wait


def apply_headers(response, usage: Usage | None) -> None:
    if usage is None:
        return
    response["X-RateLimit-Limit"] = str(usage.limit)
    response["X-RateLimit-Remaining"] = str(usage.remaining)
    response["X-RateLimit-Reset"] = str(usage.reset_at)
    if usage.limited:
        response["Retry-After"] = str(seconds_until_reset(usage))
