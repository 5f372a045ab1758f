"""Hot-path statements planned the same whatever the planner's statistics say (PostgreSQL).

Statistics are autovacuum's, up to a minute behind a burst of writes, and a
new database has none: the planner may then take a queue of thousands for a
handful of rows, or a worker's long history for a few, and pick a plan that
reads all of it. A statement whose only good plan is known switches the
methods of the bad ones off around itself (`SET LOCAL`, so a rollback undoes
it too), and a write of rows known by key keeps its checks of their state out
of the search (`checked_not_searched`).
"""

from collections.abc import Iterator
from contextlib import contextmanager

from django.db import connection, transaction
from django.db.models import BooleanField, Func, Q

_METHODS = frozenset({"sort", "seqscan"})  # those the hot paths switch off


@contextmanager
def planned_without(*methods: str) -> Iterator[None]:
    """Plan the enclosed statements with these plan methods off (`enable_<method>`), inside a transaction."""
    unknown = set(methods) - _METHODS
    if unknown:
        raise ValueError(f"unknown plan methods: {sorted(unknown)}")
    if connection.vendor != "postgresql":
        yield
        return
    with connection.cursor() as cursor:
        cursor.execute("; ".join(f"SET LOCAL enable_{method} = off" for method in methods))
        yield
        cursor.execute("; ".join(f"SET LOCAL enable_{method} TO DEFAULT" for method in methods))


@contextmanager
def read_planned_without(*methods: str) -> Iterator[None]:
    """`planned_without` around a read made outside any transaction of its own: in one on
    PostgreSQL (`SET LOCAL` lasts as long as it), in none elsewhere (a transaction on SQLite takes
    the write lock at BEGIN, and there is no plan to steer)."""
    if connection.vendor != "postgresql":
        with planned_without(*methods):
            yield
        return
    with transaction.atomic(), planned_without(*methods):
        yield


class _NotFalse(Func):
    template = "(%(expressions)s) IS NOT FALSE"
    output_field = BooleanField()


def checked_not_searched(condition: Q) -> Func:
    """`condition`, on columns that are never NULL, checked on the rows the statement's other
    conditions find and never used to find them.

    For an UPDATE of rows given by primary key that checks their state (`status = 'preparing'`,
    `holds_capacity`): with statistics that take that state for rare, the planner would look the
    rows up through the index of states, reading every row in that state (and the dead entries of
    those that left it). `IS NOT FALSE` is no index condition, and for a condition that is never
    NULL it is the condition itself.
    """
    return _NotFalse(condition)
