"""The clock leases are read against: the database's; and how times are told to clients.

Heartbeats are stamped by the server process that hears them and leases are
checked by the scheduler, often on other hosts. On each host's own clock,
hosts apart in time by more than a lease would expire live workers (or keep
dead ones); stamped and read on the database's clock, they cannot disagree.
Stamps are written with `Now()` (the database's time of the statement) and
compared with `database_now()`.
"""

from datetime import UTC, datetime

from django.db import connection


def api_time(moment: datetime) -> str:
    """A time as every answer of the API tells it (as DRF renders them): ISO 8601, in UTC, with
    a `Z`."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def database_now() -> datetime:
    """The database's current time (its statement's time on PostgreSQL), timezone-aware."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SELECT statement_timestamp()")
            return cursor.fetchone()[0]
        # SQLite: the format of Django's `Now()` there, always UTC.
        cursor.execute("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')")
        return datetime.fromisoformat(cursor.fetchone()[0]).replace(tzinfo=UTC)
