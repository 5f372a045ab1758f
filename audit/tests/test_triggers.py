"""On PostgreSQL the audit table refuses UPDATE, DELETE and TRUNCATE outright."""

import uuid

import pytest
from django.core.management import call_command
from django.db import DatabaseError, IntegrityError, connection, transaction

from audit.models import AuditEvent, ChainHead
from audit.tests.factories import append_events
from audit.tests.tampering import TABLE
from conftest import requires_postgres

pytestmark = [requires_postgres, pytest.mark.django_db]


def _execute(statement: str) -> None:
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(statement)


def test_update_of_an_audit_row_is_rejected() -> None:
    append_events(3)
    with pytest.raises(IntegrityError, match="append-only: UPDATE"):
        _execute(f"UPDATE {TABLE} SET resource = 'x' WHERE sequence_num = 2")
    assert AuditEvent.objects.get(sequence_num=2).resource == "file:data/1.csv"


def test_orm_update_is_rejected_too() -> None:
    append_events(1)
    with pytest.raises(IntegrityError), transaction.atomic():
        AuditEvent.objects.filter(sequence_num=1).update(success=False)


def test_delete_of_an_audit_row_is_rejected() -> None:
    append_events(3)
    with pytest.raises(IntegrityError, match="append-only: DELETE"):
        _execute(f"DELETE FROM {TABLE} WHERE sequence_num = 3")
    assert AuditEvent.objects.count() == 3


def test_truncate_of_the_audit_table_is_rejected() -> None:
    append_events(3)
    with pytest.raises(IntegrityError, match="append-only: TRUNCATE"):
        _execute(f"TRUNCATE {TABLE}")
    assert AuditEvent.objects.count() == 3


def test_inserts_still_work() -> None:
    append_events(2)
    assert AuditEvent.objects.count() == 2


def test_a_role_that_does_not_own_the_table_cannot_get_around_the_triggers() -> None:
    """The deployment of docs/audit.md: the application's role may insert, never rewrite."""
    role = f"fetchml_audit_app_{uuid.uuid4().hex[:8]}"
    append_events(2)
    with connection.cursor() as cursor:  # all rolled back with the test's transaction
        cursor.execute(f"CREATE ROLE {role} NOLOGIN")
        cursor.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON {TABLE} TO {role}")
    attempts = [
        f"ALTER TABLE {TABLE} DISABLE TRIGGER audit_event_no_update_delete",
        "SET LOCAL session_replication_role = replica",
        f"DELETE FROM {TABLE}",
        f"TRUNCATE {TABLE}",
    ]
    for attempt in attempts:
        with pytest.raises(DatabaseError), transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(f"SET LOCAL ROLE {role}")
            cursor.execute(attempt)
    assert AuditEvent.objects.count() == 2


@pytest.mark.django_db(transaction=True)
def test_flush_by_the_test_framework_empties_events_and_head_together() -> None:
    append_events(4)
    call_command("flush", interactive=False, verbosity=0)
    assert not AuditEvent.objects.exists()
    assert not ChainHead.objects.exists()
    with connection.cursor() as cursor:
        cursor.execute("SHOW session_replication_role")
        assert cursor.fetchone()[0] == "origin"  # the bypass ends with the flush
