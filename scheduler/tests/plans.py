"""Test helper: the plans PostgreSQL chose for the statements a piece of code ran."""

from collections.abc import Iterator
from contextlib import contextmanager

from django.db import connection


@contextmanager
def plans_of(statement_start: str) -> Iterator[list[str]]:
    """The plans of the statements beginning with `statement_start` run meanwhile, each explained on
    its own cursor right before it runs (with the settings of its transaction at that moment)."""
    plans: list[str] = []

    def explained(execute, sql, params, many, context):
        if sql.startswith(statement_start):
            context["cursor"].execute(f"EXPLAIN {sql}", params)
            plans.append("\n".join(row for (row,) in context["cursor"].fetchall()))
        return execute(sql, params, many, context)

    with connection.execute_wrapper(explained):
        yield plans
