"""`flush`, able to empty the append-only audit table when run by a PostgreSQL superuser.

Django's test framework empties the database with this command between
`transactional_db` tests (TRUNCATE on PostgreSQL), which the audit table's
TRUNCATE trigger would refuse. Ordinary triggers do not fire while
`session_replication_role` is `replica`, a setting only superusers may change:
the same people who could drop the triggers anyway. So flush switches it on for
its own statements when, and only when, the connected role is a superuser; under
the recommended non-owner application role nothing changes and flush is refused
by the trigger. The chain head is emptied with the events, so the next append
starts a fresh chain at 1.
"""

from typing import Any

from django.core.management.commands.flush import Command as DjangoFlushCommand
from django.db import connections
from django.db.backends.base.base import BaseDatabaseWrapper


def _is_postgres_superuser(connection: BaseDatabaseWrapper) -> bool:
    if connection.vendor != "postgresql":
        return False
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_setting('is_superuser') = 'on'")
        return bool(cursor.fetchone()[0])


class Command(DjangoFlushCommand):
    def handle(self, **options: Any) -> None:
        connection = connections[options["database"]]
        if not _is_postgres_superuser(connection):
            return super().handle(**options)
        with connection.cursor() as cursor:
            cursor.execute("SELECT current_setting('session_replication_role')")
            previous = cursor.fetchone()[0]
            cursor.execute("SELECT set_config('session_replication_role', 'replica', false)")
        try:
            return super().handle(**options)
        finally:
            with connection.cursor() as cursor:
                cursor.execute("SELECT set_config('session_replication_role', %s, false)", [previous])
