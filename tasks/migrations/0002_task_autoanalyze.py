"""On PostgreSQL, keep the planner's statistics of the task table close behind the queue.

The dispatch claim walks the partial index `task_runnable_by_priority` only
while the planner knows how many tasks are queued. With the default
thresholds (10 % of the table) a burst of submissions into a small table
leaves the estimate at a handful of rows for a while, and the claim sorts the
whole queue instead (about 90 ms at 100,000 queued tasks against 0.2 ms).
"""

from django.db import migrations

TABLE = "tasks_task"


def tune(apps, schema_editor) -> None:
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(
            f"ALTER TABLE {TABLE} SET (autovacuum_analyze_scale_factor = 0.02, autovacuum_analyze_threshold = 500)",
            params=None,
        )


def untune(apps, schema_editor) -> None:
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(
            f"ALTER TABLE {TABLE} RESET (autovacuum_analyze_scale_factor, autovacuum_analyze_threshold)",
            params=None,
        )


class Migration(migrations.Migration):
    dependencies = [("tasks", "0001_initial")]

    operations = [migrations.RunPython(tune, untune, elidable=False)]
