"""FetchML product settings: one table of defaults, read from the environment.

`settings.py` calls `settings_from_env()` to turn every `FETCHML_<NAME>` env var
into a Django setting; code reads `app_settings.NAME`, which looks the setting
up on every access so `override_settings` works in tests.
"""

import re
from typing import Any

from django.core.exceptions import ImproperlyConfigured

from fetchml.env import env_bool, env_float, env_int, env_list, env_str

# name: default. The default's type decides how the env var is parsed.
DEFAULTS: dict[str, Any] = {
    # API limits
    "RATE_LIMIT_POST": "100/m",
    "RATE_LIMIT_GET": "300/m",
    "RATE_LIMIT_OTHER": "600/m",
    "RATE_LIMIT_AUTH_FAILURES": "20/m",
    "MAX_PAGE_SIZE": 1000,
    "MAX_LIST_ITEMS": 100,
    "MAX_METADATA_ENTRIES": 64,
    "MAX_STRING_LENGTH": 4096,
    # levels of array/object nesting in any JSON body (fetchml.jsonbody); deeper is a 400
    "MAX_JSON_DEPTH": 64,
    "IDEMPOTENCY_TTL_HOURS": 24,
    # scheduling
    "PRIORITY_AGING_PER_HOUR": 1.0,
    "SCHEDULER_INTERVAL": 2.0,
    "SCHEDULER_BATCH_SIZE": 32,
    # a dispatch round inside the submitting transaction: a task that fits a free worker starts at once
    "DISPATCH_ON_SUBMIT": True,
    # least time between the starts of two dispatch passes while work keeps coming (an idle scheduler goes at once)
    "SCHEDULER_PASS_GAP_SECONDS": 0.01,
    # a pass still waiting on the database after this long has its connection cut (a frozen server)
    "SCHEDULER_PASS_TIMEOUT_SECONDS": 30.0,
    # a statement or commit of a serving process still unanswered after this long has its connection cut (0: never)
    "DB_ANSWER_TIMEOUT_SECONDS": 20.0,
    "WORKER_LEASE_SECONDS": 30.0,
    "WORKER_HEARTBEAT_SECONDS": 5.0,
    "DEFAULT_MAX_RETRIES": 3,
    "RETRY_BACKOFF_BASE_SECONDS": 5.0,
    "RETRY_BACKOFF_MAX_SECONDS": 600.0,
    "CANCEL_GRACE_SECONDS": 30,
    "ASSIGN_RESEND_SECONDS": 3.0,
    "TIMEOUT_MARGIN_SECONDS": 60.0,
    "RESERVATIONS_PER_USER": 3,
    "RESERVATION_MAX_MINUTES": 7 * 24 * 60,
    # a head-of-line task queued this long gets capacity held for it (docs/scheduling.md)
    "STARVATION_SECONDS": 600.0,
    # dispatch-key offset per task a user already has queued at that priority or above
    "FAIR_SHARE_STEP": 0.1,
    # live updates: seconds between SSE heartbeat comments (each also re-checks the database)
    "SSE_HEARTBEAT_SECONDS": 15.0,
    # live updates: seconds between a /ws connection's re-reads of the tasks it told about
    "WS_RECHECK_SECONDS": 15.0,
    # live updates: client WebSockets and SSE streams one API key may hold open on one server process
    "LIVE_CONNECTIONS_PER_KEY": 100,
    # audit
    "AUDIT_SIGNING_KEY": "",
    "AUDIT_AUTH_SUCCESS_INTERVAL_SECONDS": 60,
    # storage
    "STORAGE_DIR": "",
    "MAX_SNAPSHOT_BYTES": 512 * 1024 * 1024,
    "MAX_DATASET_BYTES": 8 * 1024 * 1024 * 1024,
    "MAX_ARTIFACT_BYTES_PER_TASK": 1024 * 1024 * 1024,
    # plugins and services
    "PLUGINS": [],
    "PLUGIN_HEALTH_TIMEOUT_SECONDS": 2.0,
    "PLUGIN_HEALTH_CACHE_SECONDS": 15,
    "JUPYTER_IDLE_MINUTES": 120,
    # processes: objects allocated between two youngest-generation garbage collections (0: Python's 700)
    "GC_THRESHOLD": 20_000,
}


# Numbers that 0 would break, refused below their bound at start-up. Every other number may be 0,
# which means none, off or at once (no retries, no aging, no fair-share step, no grace, ...).
# Limits and sizes of at least 1: 0 would refuse every page, body, list or upload, a batch of 0
# would dispatch nothing, a TTL of 0 would forget every Idempotency-Key at once.
AT_LEAST_ONE = frozenset(
    {
        "MAX_PAGE_SIZE",
        "MAX_LIST_ITEMS",
        "MAX_METADATA_ENTRIES",
        "MAX_STRING_LENGTH",
        "MAX_JSON_DEPTH",
        "IDEMPOTENCY_TTL_HOURS",
        "LIVE_CONNECTIONS_PER_KEY",
        "SCHEDULER_BATCH_SIZE",
        "RESERVATION_MAX_MINUTES",
        "MAX_SNAPSHOT_BYTES",
        "MAX_DATASET_BYTES",
        "MAX_ARTIFACT_BYTES_PER_TASK",
    }
)
# Periods and time-outs above 0: at 0 a loop would spin (polling, re-sending every `assign`,
# re-reading the database for each stream) or every wait would time out at once.
# WORKER_HEARTBEAT_SECONDS is held to its lease by `check_heartbeat`.
ABOVE_ZERO = frozenset(
    {
        "SCHEDULER_INTERVAL",
        "SCHEDULER_PASS_TIMEOUT_SECONDS",
        "WORKER_LEASE_SECONDS",
        "ASSIGN_RESEND_SECONDS",
        "SSE_HEARTBEAT_SECONDS",
        "WS_RECHECK_SECONDS",
        "PLUGIN_HEALTH_TIMEOUT_SECONDS",
    }
)


# Durations, by the unit their name ends in, up to ten years: far longer ones overflow the dates
# they are added to (a reservation's end, a retry's time) when a request or a pass computes them.
_TEN_YEARS = {"_SECONDS": 10 * 365 * 24 * 3600, "_MINUTES": 10 * 365 * 24 * 60, "_HOURS": 10 * 365 * 24}
# Priority points per hour: even this much keeps a year's queue far inside a float's precision.
MAX_PRIORITY_AGING_PER_HOUR = 1_000_000.0


def _maximum(name: str) -> float | None:
    if name == "PRIORITY_AGING_PER_HOUR":
        return MAX_PRIORITY_AGING_PER_HOUR
    return next((most for unit, most in _TEN_YEARS.items() if name.endswith(unit)), None)


def settings_from_env() -> dict[str, Any]:
    """Every default, overridden by its FETCHML_<NAME> env var, parsed strictly."""
    values: dict[str, Any] = {}
    for name, default in DEFAULTS.items():
        env_name = f"FETCHML_{name}"
        if isinstance(default, bool):
            values[env_name] = env_bool(env_name, default)
        elif isinstance(default, int):
            most = _maximum(name)
            minimum = 1 if name in AT_LEAST_ONE else 0
            values[env_name] = env_int(env_name, default, minimum=minimum, maximum=None if most is None else int(most))
        elif isinstance(default, float):
            above = 0 if name in ABOVE_ZERO else None
            values[env_name] = env_float(env_name, default, minimum=0, maximum=_maximum(name), above=above)
        elif isinstance(default, list):
            values[env_name] = env_list(env_name, default)
        else:
            values[env_name] = env_str(env_name, default)
        if name.startswith("RATE_LIMIT_"):
            check_rate(env_name, values[env_name])
    check_heartbeat(values["FETCHML_WORKER_HEARTBEAT_SECONDS"], values["FETCHML_WORKER_LEASE_SECONDS"])
    return values


# django-ratelimit's rate syntax: "100/m", "5/10s", "1000/h", "10000/d".
_RATE = re.compile(r"^[0-9]+/[0-9]*[smhd]$")


def check_rate(name: str, value: str) -> None:
    """A malformed rate must stop start-up, not fail every request later."""
    if not _RATE.match(value):
        raise ImproperlyConfigured(f"{name}={value!r} is not a rate like 100/m (per s, m, h or d)")


# Heartbeats a lease must hold: one late or lost heartbeat must not cost a worker its runs, and
# an agent waits a third of the lease for the server's answers (protocol.LEASE_SHARE_TO_RECONNECT).
HEARTBEATS_PER_LEASE = 3


def check_heartbeat(heartbeat_seconds: float, lease_seconds: float) -> None:
    """A heartbeat interval the lease cannot hold would make every worker go offline and its runs
    start again elsewhere: refused at start-up, like a malformed rate."""
    if heartbeat_seconds <= 0 or heartbeat_seconds * HEARTBEATS_PER_LEASE > lease_seconds:
        raise ImproperlyConfigured(
            f"FETCHML_WORKER_HEARTBEAT_SECONDS={heartbeat_seconds:g} must be above 0 and at most "
            f"FETCHML_WORKER_LEASE_SECONDS / {HEARTBEATS_PER_LEASE} = {lease_seconds / HEARTBEATS_PER_LEASE:g}"
        )


class _AppSettings:
    def __getattr__(self, name: str) -> Any:
        if name not in DEFAULTS:
            raise AttributeError(f"unknown FetchML setting {name}")
        from django.conf import settings

        return getattr(settings, f"FETCHML_{name}", DEFAULTS[name])


app_settings = _AppSettings()
