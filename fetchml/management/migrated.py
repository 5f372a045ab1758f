"""The check that long-running commands make before they start: a database without its tables
would otherwise fail deep inside with `no such table`."""

from django.core.management.base import CommandError
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.migrations.executor import MigrationExecutor


def require_migrated() -> None:
    connection = connections[DEFAULT_DB_ALIAS]
    executor = MigrationExecutor(connection)
    pending = executor.migration_plan(executor.loader.graph.leaf_nodes())
    if pending:
        raise CommandError(
            f"the database has {len(pending)} migration(s) not applied: run `python manage.py migrate` "
            "first (`make run` does, and creates the admin user and key)"
        )
