"""Hot-path reads planned the same whatever the planner's statistics say (PostgreSQL).

Statistics are autovacuum's, up to a minute behind a burst of writes, and a
new database has none: the planner may then take a queue of thousands for a
handful of rows, or a worker's long history for a few, and pick a plan that
reads all of it. A read whose only good plan is known switches the methods of
the bad ones off around itself (`SET LOCAL`, so a rollback undoes it too).
"""

from collections.abc import Iterator
from contextlib import contextmanager

from django.db import connection

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
