"""Benchmark of the audit chain: append rate (batches of 32, single events) and verify rate.

    python bench/audit.py                      # SQLite, in a temporary file
    DATABASE_URL=postgres://... python bench/audit.py   # a scratch PostgreSQL database

It never touches real data: on SQLite it works in a temporary directory, on
PostgreSQL it creates a database named `<name>_auditbench_<pid>` next to the
one in DATABASE_URL and drops it afterwards.
"""

import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

BATCH = 32
BATCHED_EVENTS = 32 * 600
SINGLE_EVENTS = 3000
VERIFY_EVENTS = 100_000
TARGET_APPEND = 5_000
TARGET_VERIFY = 100_000


def _scratch_postgres(url: str) -> tuple[str, Callable[[], None]]:
    """DATABASE_URL of a new scratch database, and how to drop it."""
    from urllib.parse import urlsplit, urlunsplit

    import psycopg

    parts = urlsplit(url)
    name = f"{(parts.path.lstrip('/') or 'postgres')}_auditbench_{os.getpid()}"
    admin_url = urlunsplit(parts._replace(path="/postgres"))
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        from django.db import connections

        connections.close_all()
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return urlunsplit(parts._replace(path=f"/{name}")), drop


def _rate(count: int, seconds: float) -> str:
    return f"{count / seconds:>10,.0f} events/s  ({count:,} events in {seconds:.2f} s)"


def run() -> int:
    from django.core.management import call_command
    from django.db import connection, transaction

    from audit.services import Entry, record, record_many
    from audit.verification import verify_chain

    call_command("migrate", verbosity=0)
    print(f"database: {connection.vendor}")

    def entries(n: int, start: int) -> list[Entry]:
        return [
            Entry(event_type="job_started", user="bench", resource=f"task:{start + i}", metadata={"worker": "w1"})
            for i in range(n)
        ]

    started = time.perf_counter()
    for round_number in range(BATCHED_EVENTS // BATCH):
        with transaction.atomic():
            record_many(entries(BATCH, round_number * BATCH))
    batched = time.perf_counter() - started
    print(f"append, batches of {BATCH}: {_rate(BATCHED_EVENTS, batched)}")

    started = time.perf_counter()
    for i in range(SINGLE_EVENTS):
        with transaction.atomic():
            record(event_type="file_access", user="bench", resource=f"file:{i}", action="read")
    single = time.perf_counter() - started
    print(f"append, one per transaction: {_rate(SINGLE_EVENTS, single)}")

    have = BATCHED_EVENTS + SINGLE_EVENTS
    while have < VERIFY_EVENTS:
        size = min(2000, VERIFY_EVENTS - have)
        with transaction.atomic():
            record_many(entries(size, have))
        have += size
    started = time.perf_counter()
    result = verify_chain()
    verified = time.perf_counter() - started
    assert result.valid and result.total_events == VERIFY_EVENTS, result
    print(f"verify: {_rate(VERIFY_EVENTS, verified)}")

    append_rate, verify_rate = BATCHED_EVENTS / batched, VERIFY_EVENTS / verified
    ok = append_rate >= TARGET_APPEND and verify_rate >= TARGET_VERIFY
    print(
        f"targets: append >= {TARGET_APPEND:,}/s (batched) {'met' if append_rate >= TARGET_APPEND else 'MISSED'}, "
        f"verify >= {TARGET_VERIFY:,}/s {'met' if verify_rate >= TARGET_VERIFY else 'MISSED'}"
    )
    return 0 if ok else 1


def main() -> int:
    os.environ["DJANGO_SETTINGS_MODULE"] = "fetchml.settings"
    os.environ.setdefault("DJANGO_SECRET_KEY", "audit-bench-only")
    cleanup: Callable[[], None] | None = None
    scratch = tempfile.TemporaryDirectory(prefix="fetchml-auditbench-")
    # Everything the settings write (SQLite file, secret key) goes to the scratch directory.
    os.environ["FETCHML_VAR_DIR"] = scratch.name
    url = os.environ.get("DATABASE_URL", "")
    if url.startswith(("postgres://", "postgresql://")):
        os.environ["DATABASE_URL"], cleanup = _scratch_postgres(url)
    else:
        os.environ.pop("DATABASE_URL", None)
    import django

    django.setup()
    try:
        return run()
    finally:
        if cleanup is not None:
            cleanup()
        scratch.cleanup()


if __name__ == "__main__":
    sys.exit(main())
