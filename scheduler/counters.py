"""A worker's `used_*` counters: the one way they change (dispatch adds, ended runs give back).

The CHECK constraints on Worker refuse any overcommit (and any counter below
zero); the UPDATE is compiled once per set of counters (every round runs it).
A batch of reports gives back with `give_back_reading_status`, the same
change as the statement that locks the worker and reads its status.
"""

import functools
from typing import Any

from django.db import connection
from django.db.models import F

from fetchml.compiled import compiled_update_per_shape
from scheduler.models import Worker


def change_used(worker_id: Any, changes: dict[str, int]) -> None:
    """Add `changes` (counter name -> amount, negative to free) to the worker's counters."""
    _changed(worker_id=worker_id, **changes)


def give_back(worker_id: Any, freed: dict[str, int]) -> None:
    """Subtract what ended runs held (`freed`: counter name -> amount)."""
    change_used(worker_id, {name: -amount for name, amount in freed.items()})


def give_back_reading_status(worker_id: Any, freed: dict[str, int]) -> str | None:
    """`give_back` as the statement that locks the worker's row; its status (None: no such worker).

    For a writer that locks the worker first and needs its status (a batch of
    reports: a draining worker goes offline once empty): one statement
    instead of a locking read and the update.
    """
    names = tuple(sorted(freed))
    with connection.cursor() as cursor:
        cursor.execute(_give_back_sql(names), [*(freed[name] for name in names), _worker_pk(worker_id)])
        row = cursor.fetchone()
    return row[0] if row else None


@functools.cache
def _give_back_sql(names: tuple[str, ...]) -> str:
    quote = connection.ops.quote_name
    meta = Worker._meta
    column = {name: quote(meta.get_field(name).column) for name in (*names, "status")}
    changes = ", ".join(f"{column[name]} = {column[name]} - %s" for name in names)
    return (
        f"UPDATE {quote(meta.db_table)} SET {changes} WHERE {quote(meta.pk.column)} = %s RETURNING {column['status']}"
    )


def _worker_pk(worker_id: Any) -> Any:
    return Worker._meta.pk.get_db_prep_value(worker_id, connection)


def _update(*, worker_id: Any, **amounts: int) -> tuple:
    return Worker.objects.filter(id=worker_id), {name: F(name) + amount for name, amount in amounts.items()}


_changed = compiled_update_per_shape(_update)
