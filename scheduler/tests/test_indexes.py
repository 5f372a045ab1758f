"""The tables every run writes carry no index that another index of theirs already leads with."""

import pytest
from django.db import connection

from audit.models import AuditEvent
from scheduler.models import NodeAssignment
from tasks.models import Task, TaskLogLine

# Written at each dispatch, report and log batch: every index here is paid for at every change.
RUN_TABLES = [Task, NodeAssignment, TaskLogLine, AuditEvent]


def _indexes(model) -> dict[str, dict]:
    partial = {index.name for index in model._meta.indexes if index.condition is not None}
    with connection.cursor() as cursor:
        found = connection.introspection.get_constraints(cursor, model._meta.db_table)
    return {
        name: found_index
        for name, found_index in found.items()
        if (found_index["index"] or found_index["unique"]) and found_index["columns"] and name not in partial
    }


@pytest.mark.django_db
@pytest.mark.parametrize("model", RUN_TABLES, ids=lambda model: model._meta.db_table)
def test_a_table_every_run_writes_has_no_index_another_index_leads_with(model):
    indexes = _indexes(model)

    redundant = [
        (name, other)
        for name, index in indexes.items()
        if not index["unique"]
        for other, covering in indexes.items()
        if other != name and covering["columns"][: len(index["columns"])] == index["columns"]
    ]

    assert redundant == []


@pytest.mark.django_db
@pytest.mark.parametrize("model", RUN_TABLES, ids=lambda model: model._meta.db_table)
def test_a_nullable_foreign_key_of_a_table_every_run_writes_is_indexed_only_where_set(model):
    nullable = {field.column for field in model._meta.concrete_fields if field.is_relation and field.null}
    partial = {index.name for index in model._meta.indexes if index.condition is not None}
    with connection.cursor() as cursor:
        found = connection.introspection.get_constraints(cursor, model._meta.db_table)
    indexes = {name: index["columns"] for name, index in found.items() if index["index"]}
    own = {column: {name for name, columns in indexes.items() if columns == [column]} for column in nullable}
    leading = {column: {name for name, columns in indexes.items() if columns[:1] == [column]} for column in nullable}

    assert {column: names - partial for column, names in own.items()} == {column: set() for column in nullable}
    assert all(leading.values()), leading  # a lookup by a set value still has an index
