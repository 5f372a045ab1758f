"""`planned_without`: plan methods off around a read, back on after it."""

import pytest
from django.db import connection, transaction

from conftest import requires_postgres
from fetchml.planner import planned_without

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


def test_an_unknown_plan_method_is_refused():
    with pytest.raises(ValueError, match="unknown plan methods"):
        planned_without("hashjoin").__enter__()
