"""PostgreSQL prepares the queries a connection runs again and again (the setting: test_settings)."""

import pytest
from django.db import connection

from conftest import requires_postgres
from scheduler.dispatch import dispatch_round
from scheduler.tests.factories import queued_task, worker

pytestmark = pytest.mark.django_db


def _prepared_claims() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE %s", ["%SKIP LOCKED%"])
        return cursor.fetchone()[0]


@requires_postgres
def test_on_postgresql_the_dispatch_claims_are_prepared_after_five_runs():
    worker(batch_slots=100)
    for _ in range(6):
        queued_task()
        assert dispatch_round() == 1

    # The workers' claim and the tasks' claim: prepared on this connection after five runs, then only bound and run.
    assert _prepared_claims() == 2
