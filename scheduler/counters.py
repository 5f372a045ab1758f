"""A worker's `used_*` counters: the one way they change (dispatch adds, ended runs give back).

The CHECK constraints on Worker refuse any overcommit (and any counter below
zero); the UPDATE is compiled once per set of counters (every round runs it).
A batch of reports gives back with `give_back_reading_status`, the same
change as the statement that locks the worker and reads its status.

A capacity never drops below what running work holds: an agent that
declares less in its `hello` than its runs hold keeps the larger figure
(`worker_hello`), and each give-back brings it down to the larger of the
declared figure and what is still held, in the same statement. So a worker
is never given more than it last declared once the runs that held more end.
"""

import functools
from collections.abc import Callable
from typing import Any

from django.db import connection
from django.db.models import F

from fetchml.compiled import compiled_update_per_shape
from scheduler.models import Worker


def change_used(worker_id: Any, changes: dict[str, int]) -> None:
    """Add `changes` (counter name -> amount, negative to free) to the worker's counters."""
    _changed(worker_id=worker_id, **changes)


# The capacity each counter draws on.
CAPACITY_OF = {
    "used_cpu": "cpu_cores",
    "used_memory_gb": "memory_gb",
    "used_gpus": "gpu_count",
    "used_batch_slots": "batch_slots",
    "used_service_slots": "service_slots",
}


def give_back(worker_id: Any, freed: dict[str, int]) -> None:
    """Subtract what ended runs held (`freed`: counter name -> amount), shrinking a capacity held
    above the declared one back towards it."""
    give_back_reading_status(worker_id, freed)


def give_back_reading_status(worker_id: Any, freed: dict[str, int]) -> str | None:
    """`give_back` as the statement that locks the worker's row; its status (None: no such worker).

    For a writer that locks the worker first and needs its status (a batch of
    reports: a draining worker goes offline once empty): one statement
    instead of a locking read and the update.
    """
    names = tuple(sorted(freed))
    # Each counter's amount goes in three places: its own change and its capacity's (below).
    amounts = [freed[name] for name in names for _ in range(3)]
    with connection.cursor() as cursor:
        cursor.execute(_give_back_sql(names), [*amounts, _worker_pk(worker_id)])
        row = cursor.fetchone()
    return row[0] if row else None


@functools.cache
def _give_back_sql(names: tuple[str, ...]) -> str:
    quote = connection.ops.quote_name
    meta = Worker._meta
    column = {name: quote(meta.get_field(name).column) for name in (*names, "status")}
    changes = ", ".join(_given_back(name, column[name], quote) for name in names)
    return (
        f"UPDATE {quote(meta.db_table)} SET {changes} WHERE {quote(meta.pk.column)} = %s RETURNING {column['status']}"
    )


def _given_back(name: str, used: str, quote: Callable[[str], str]) -> str:
    """The SET of one counter given back and of its capacity: the larger of the declared capacity
    and what is still held (both databases read the row's old values on the right of every SET)."""
    meta = Worker._meta
    capacity = quote(meta.get_field(CAPACITY_OF[name]).column)
    declared = quote(meta.get_field(f"declared_{CAPACITY_OF[name]}").column)
    return (
        f"{used} = {used} - %s, {capacity} = CASE WHEN {declared} IS NULL THEN {capacity} "
        f"WHEN {declared} >= {used} - %s THEN {declared} ELSE {used} - %s END"
    )


def _worker_pk(worker_id: Any) -> Any:
    return Worker._meta.pk.get_db_prep_value(worker_id, connection)


def _update(*, worker_id: Any, **amounts: int) -> tuple:
    return Worker.objects.filter(id=worker_id), {name: F(name) + amount for name, amount in amounts.items()}


_changed = compiled_update_per_shape(_update)
