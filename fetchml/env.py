"""Strict readers for settings that come from the environment.

A typo in a boolean or a number must stop the process at start-up, not be
silently read as a default.
"""

import math
import os
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from django.core.exceptions import ImproperlyConfigured

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_str(name: str, default: str = "") -> str:
    """A string, or the content of the file named by NAME_FILE (for secrets)."""
    file_name = os.environ.get(f"{name}_FILE")
    if file_name:
        try:
            return Path(file_name).read_text().strip()
        except OSError as exc:
            raise ImproperlyConfigured(f"{name}_FILE: cannot read {file_name}: {exc}") from exc
    return os.environ.get(name, default)


def env_bool(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name}={raw!r} is not a boolean (use true/false)")


def env_int(name: str, default: int, *, minimum: int | None = None, maximum: int | None = None) -> int:
    return _env_number(name, default, int, "an integer", minimum, maximum)


def env_float(
    name: str,
    default: float,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
) -> float:
    """A finite number from `minimum` to `maximum`, greater than `above` (for a period that 0 would
    turn into a busy loop)."""
    value = _env_number(name, default, float, "a finite number", minimum, maximum)
    if above is not None and not value > above:
        raise ImproperlyConfigured(f"{name}={value:g} must be above {above:g}")
    return value


def _env_number(name, default, parse, kind: str, minimum, maximum=None):
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = parse(raw)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name}={raw!r} is not {kind}") from exc
    # float() reads nan and inf, which pass every comparison with a minimum (nan < 0 is false)
    # and then poison what they are stored in or computed with.
    if isinstance(value, float) and not math.isfinite(value):
        raise ImproperlyConfigured(f"{name}={raw!r} is not {kind}")
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name}={value} is below the minimum {minimum}")
    if maximum is not None and value > maximum:
        raise ImproperlyConfigured(f"{name}={value} is above the maximum {maximum}")
    return value


def env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    """One of `choices`, given in any case (LOG_LEVEL=debug)."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().upper()
    if value not in choices:
        raise ImproperlyConfigured(f"{name}={raw!r} is not one of {', '.join(choices)}")
    return value


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None:
        return list(default)
    return [item.strip() for item in raw.split(",") if item.strip()]


def parse_database_url(url: str) -> dict:
    """Turn DATABASE_URL into a DATABASES entry (postgres:// or sqlite:///path)."""
    parts = urlsplit(url)
    options = dict(parse_qsl(parts.query))
    if parts.scheme in {"postgres", "postgresql", "pgsql"}:
        try:
            port = parts.port
        except ValueError as exc:
            raise ImproperlyConfigured(f"DATABASE_URL has an invalid port: {exc}") from exc
        return {
            "ENGINE": "fetchml.backends.postgresql",
            "NAME": unquote(parts.path.lstrip("/")) or "postgres",
            "USER": unquote(parts.username or ""),
            "PASSWORD": unquote(parts.password or ""),
            "HOST": parts.hostname or "",
            "PORT": str(port or ""),
            "OPTIONS": options,
        }
    if parts.scheme == "sqlite":
        # sqlite:///relative.db and sqlite:////absolute/path.db, as in dj-database-url.
        name = unquote(parts.path)[1:]
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": name or ":memory:"}
    raise ImproperlyConfigured(f"DATABASE_URL scheme {parts.scheme!r} is not supported")


def bound_postgres_waits(options: dict, *, network_seconds: int, stalled_transaction_seconds: int) -> None:
    """Bound, in a PostgreSQL connection's `options`, what a silent peer can cost; values the
    DATABASE_URL gives are kept.

    The network: a query whose packets go unanswered fails after `network_seconds`
    (`tcp_user_timeout`), and an idle connection is probed so that a dead one is found as fast
    (keepalives); left to the kernel, a database host that died or a partition hangs each
    connection for about a quarter of an hour of retransmissions. The server: a session that
    holds a transaction open with no statement for `stalled_transaction_seconds` (its process
    frozen, or on a host that vanished) is ended, and the row locks it held (a worker's, a
    task's) are released for the other processes (0: never).
    """
    idle = max(1, network_seconds // 3)
    interval = max(1, network_seconds // 6)
    options.setdefault("keepalives", "1")
    options.setdefault("keepalives_idle", str(idle))
    options.setdefault("keepalives_interval", str(interval))
    options.setdefault("keepalives_count", str(max(1, (network_seconds - idle) // interval)))
    options.setdefault("tcp_user_timeout", str(network_seconds * 1000))
    given = options.get("options", "")
    if stalled_transaction_seconds and "idle_in_transaction_session_timeout" not in given:
        flag = f"-c idle_in_transaction_session_timeout={stalled_transaction_seconds * 1000}"
        options["options"] = f"{given} {flag}".strip()
