"""PostgreSQL binds values server-side and prepares the queries a connection runs again and again."""

import os
import subprocess
import sys

import pytest
from django.conf import settings
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


def _database_options(**env: str) -> str:
    code = "import django; django.setup(); from django.conf import settings; print(settings.DATABASES['default'])"
    clean = {
        "PATH": os.environ.get("PATH", ""),
        "DJANGO_SETTINGS_MODULE": "fetchml.settings",
        "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/fetchml_settings_only",
        "DJANGO_SECRET_KEY": "settings-test-only",
        **env,
    }
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=settings.BASE_DIR, env=clean, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_prepared_statements_are_on_by_default_on_postgresql():
    assert "'server_side_binding': True" in _database_options()


def test_prepared_statements_can_be_turned_off_for_a_pooler_that_cannot_keep_them():
    assert "server_side_binding" not in _database_options(FETCHML_DB_PREPARED_STATEMENTS="false")
