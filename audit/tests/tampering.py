"""An attacker with write access to the database, for the tamper tests.

On PostgreSQL the append-only triggers are disabled first (as the table's owner
could), then the rows are changed with raw SQL behind the application's back.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from django.db import connection

from audit.canonical import HASHED_FIELDS, event_hash
from audit.models import AuditEvent, ChainHead

TABLE = AuditEvent._meta.db_table
HEAD_TABLE = ChainHead._meta.db_table
TRIGGERS = ("audit_event_no_update_delete", "audit_event_no_truncate")


@contextmanager
def triggers_disabled() -> Iterator[None]:
    postgres = connection.vendor == "postgresql"
    with connection.cursor() as cursor:
        if postgres:
            for trigger in TRIGGERS:
                cursor.execute(f"ALTER TABLE {TABLE} DISABLE TRIGGER {trigger}")
        try:
            yield
        finally:
            if postgres:
                for trigger in TRIGGERS:
                    cursor.execute(f"ALTER TABLE {TABLE} ENABLE TRIGGER {trigger}")


def sql(statement: str, params: list[Any] | None = None) -> None:
    with triggers_disabled(), connection.cursor() as cursor:
        cursor.execute(statement, params or [])


def set_field(sequence_num: int, column: str, value: Any) -> None:
    sql(f"UPDATE {TABLE} SET {column} = %s WHERE sequence_num = %s", [value, sequence_num])


def delete(*sequence_nums: int) -> None:
    placeholders = ", ".join(["%s"] * len(sequence_nums))
    sql(f"DELETE FROM {TABLE} WHERE sequence_num IN ({placeholders})", list(sequence_nums))


def delete_after(sequence_num: int, *, fix_head: bool) -> None:
    """Drop the tail; a careful attacker also winds the head back to match."""
    last_hash = AuditEvent.objects.get(sequence_num=sequence_num).event_hash
    sql(f"DELETE FROM {TABLE} WHERE sequence_num > %s", [sequence_num])
    if fix_head:
        sql(f"UPDATE {HEAD_TABLE} SET sequence_num = %s, event_hash = %s", [sequence_num, last_hash])


def swap(a: int, b: int) -> None:
    """Exchange the positions of two events (in three steps: the key is unique)."""
    sql(f"UPDATE {TABLE} SET sequence_num = %s WHERE sequence_num = %s", [-a, a])
    sql(f"UPDATE {TABLE} SET sequence_num = %s WHERE sequence_num = %s", [a, b])
    sql(f"UPDATE {TABLE} SET sequence_num = %s WHERE sequence_num = %s", [b, -a])


def forge(sequence_num: int, **changes: Any) -> str:
    """Change an event and give it a correct hash of its new content (links left alone)."""
    row = AuditEvent.objects.get(sequence_num=sequence_num)
    for name, value in changes.items():
        setattr(row, name, value)
    new_hash = event_hash({name: getattr(row, name) for name in HASHED_FIELDS})
    assignments = ", ".join(f"{name} = %s" for name in changes)
    values = [_db_value(name, value) for name, value in changes.items()]
    sql(f"UPDATE {TABLE} SET {assignments}, event_hash = %s WHERE sequence_num = %s", [*values, new_hash, sequence_num])
    return new_hash


def rehash_from(sequence_num: int, **changes: Any) -> None:
    """Rewrite an event and recompute every hash and link after it, head included."""
    prev_hash = AuditEvent.objects.get(sequence_num=sequence_num).prev_hash
    for row in AuditEvent.objects.filter(sequence_num__gte=sequence_num).order_by("sequence_num"):
        if row.sequence_num == sequence_num:
            for name, value in changes.items():
                setattr(row, name, value)
        row.prev_hash = prev_hash
        prev_hash = event_hash({name: getattr(row, name) for name in HASHED_FIELDS})
        columns = [*changes] if row.sequence_num == sequence_num else []
        assignments = "".join(f"{name} = %s, " for name in columns)
        values = [_db_value(name, getattr(row, name)) for name in columns]
        sql(
            f"UPDATE {TABLE} SET {assignments}prev_hash = %s, event_hash = %s WHERE sequence_num = %s",
            [*values, row.prev_hash, prev_hash, row.sequence_num],
        )
    last = AuditEvent.objects.order_by("-sequence_num").first()
    sql(f"UPDATE {HEAD_TABLE} SET sequence_num = %s, event_hash = %s", [last.sequence_num, last.event_hash])


def _db_value(name: str, value: Any) -> Any:
    return AuditEvent._meta.get_field(name).get_db_prep_save(value, connection)
