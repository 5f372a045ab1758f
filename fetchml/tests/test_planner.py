"""`planned_without`: plan methods off around a statement, back on after it; `checked_not_searched`:
a condition that selects what it selects, kept out of the search."""

import pytest
from django.db import connection, transaction
from django.db.models import Q

from conftest import USING_POSTGRES, requires_postgres
from fetchml.planner import checked_not_searched, planned_without, read_planned_without
from tasks.models import Task
from tasks.tests.factories import TaskFactory

pytestmark = pytest.mark.django_db


def _setting(name: str) -> str:
    with connection.cursor() as cursor:
        cursor.execute(f"SHOW {name}")
        return cursor.fetchone()[0]


@requires_postgres
def test_plan_methods_are_off_inside_the_block_and_back_after_it():
    with transaction.atomic():
        with planned_without("seqscan", "sort"):
            inside = (_setting("enable_seqscan"), _setting("enable_sort"))
        after = (_setting("enable_seqscan"), _setting("enable_sort"))

    assert (inside, after) == (("off", "off"), ("on", "on"))


@requires_postgres
def test_plan_methods_come_back_with_a_rollback():
    with pytest.raises(RuntimeError), transaction.atomic(), planned_without("seqscan"):
        raise RuntimeError("the transaction fails inside the block")

    assert _setting("enable_seqscan") == "on"


@requires_postgres
def test_a_read_planned_without_a_method_has_it_off_inside_and_back_after():
    with read_planned_without("sort"):
        inside = _setting("enable_sort")

    assert (inside, _setting("enable_sort")) == ("off", "on")


@pytest.mark.skipif(USING_POSTGRES, reason="a transaction on SQLite takes the write lock")
def test_a_read_planned_without_a_method_opens_no_transaction_outside_postgresql():
    before = list(connection.savepoint_ids)

    with read_planned_without("sort"):
        inside = list(connection.savepoint_ids)

    assert inside == before


def test_an_unknown_plan_method_is_refused():
    with pytest.raises(ValueError, match="unknown plan methods"):
        planned_without("hashjoin").__enter__()


def test_a_condition_checked_not_searched_selects_the_rows_the_condition_selects():
    TaskFactory.create_batch(2, status="queued")
    running = TaskFactory.create_batch(3, status="running")

    checked = Task.objects.filter(checked_not_searched(Q(status="running")))

    assert set(checked.values_list("id", flat=True)) == {task.id for task in running}


def test_a_boolean_column_checked_not_searched_selects_the_rows_where_it_is_true():
    allowed = TaskFactory.create_batch(2, allow_unschedulable=True)
    TaskFactory.create_batch(3, allow_unschedulable=False)

    checked = Task.objects.filter(checked_not_searched(Q(allow_unschedulable=True)))

    assert set(checked.values_list("id", flat=True)) == {task.id for task in allowed}
