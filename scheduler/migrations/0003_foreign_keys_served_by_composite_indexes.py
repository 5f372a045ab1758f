"""An assignment's foreign keys lose their own indexes: one index less to write at every change.

`task` is led by assignment_once_per_node_attempt, `worker` by
assignment_worker_live. Only the indexes go (Django's own AlterField would
also drop and re-validate each foreign key constraint, a scan of the table
under lock).
"""

import django.db.models.deletion
from django.db import migrations, models


def _dropped(index: str, column: str) -> migrations.RunSQL:
    table = "scheduler_nodeassignment"
    return migrations.RunSQL(
        f'DROP INDEX IF EXISTS "{index}"', reverse_sql=f'CREATE INDEX "{index}" ON "{table}" ("{column}")'
    )


class Migration(migrations.Migration):
    dependencies = [
        ("scheduler", "0002_initial"),
        ("tasks", "0002_task_autoanalyze"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name="nodeassignment",
                    name="task",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="node_assignments",
                        to="tasks.task",
                    ),
                ),
                migrations.AlterField(
                    model_name="nodeassignment",
                    name="worker",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="assignments",
                        to="scheduler.worker",
                    ),
                ),
            ],
            database_operations=[
                _dropped("scheduler_nodeassignment_task_id_05dd3343", "task_id"),
                _dropped("scheduler_nodeassignment_worker_id_681747e9", "worker_id"),
            ],
        )
    ]
