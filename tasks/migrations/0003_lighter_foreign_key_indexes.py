"""Lighter foreign-key indexes on the task tables: fewer index entries to write at every change.

Foreign keys led by a composite index lose their own index (`owner`: led by
task_owner_recent, `worker`: task_worker_status, a log line's `task`:
tasklog_task_order). Nullable ones, unset on most tasks, are indexed only
where set (`experiment`, `reservation`, `cancelled_by`): a lookup by a value
still uses the partial index. Only the indexes change (Django's own
AlterField would also drop and re-validate each foreign key constraint, a
scan of the table under lock).
"""

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models


def _dropped(index: str, table: str, column: str) -> migrations.RunSQL:
    return migrations.RunSQL(
        f'DROP INDEX IF EXISTS "{index}"', reverse_sql=f'CREATE INDEX "{index}" ON "{table}" ("{column}")'
    )


class Migration(migrations.Migration):
    dependencies = [
        ("scheduler", "0003_foreign_keys_served_by_composite_indexes"),
        ("tasks", "0002_task_autoanalyze"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name="task",
                    name="owner",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="tasks",
                        to=settings.AUTH_USER_MODEL,
                    ),
                ),
                migrations.AlterField(
                    model_name="task",
                    name="worker",
                    field=models.ForeignKey(
                        blank=True,
                        db_index=False,
                        null=True,
                        on_delete=django.db.models.deletion.SET_NULL,
                        related_name="tasks",
                        to="scheduler.worker",
                    ),
                ),
                migrations.AlterField(
                    model_name="task",
                    name="experiment",
                    field=models.ForeignKey(
                        blank=True,
                        db_index=False,
                        null=True,
                        on_delete=django.db.models.deletion.SET_NULL,
                        related_name="tasks",
                        to="tasks.experiment",
                    ),
                ),
                migrations.AlterField(
                    model_name="task",
                    name="reservation",
                    field=models.ForeignKey(
                        blank=True,
                        db_index=False,
                        null=True,
                        on_delete=django.db.models.deletion.SET_NULL,
                        related_name="tasks",
                        to="scheduler.reservation",
                    ),
                ),
                migrations.AlterField(
                    model_name="task",
                    name="cancelled_by",
                    field=models.ForeignKey(
                        blank=True,
                        db_index=False,
                        null=True,
                        on_delete=django.db.models.deletion.SET_NULL,
                        related_name="+",
                        to=settings.AUTH_USER_MODEL,
                    ),
                ),
                migrations.AlterField(
                    model_name="tasklogline",
                    name="task",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="log_lines",
                        to="tasks.task",
                    ),
                ),
            ],
            database_operations=[
                _dropped("tasks_task_owner_id_db3dcc3e", "tasks_task", "owner_id"),
                _dropped("tasks_task_worker_id_c6da9f59", "tasks_task", "worker_id"),
                _dropped("tasks_tasklogline_task_id_05ca99b1", "tasks_tasklogline", "task_id"),
                _dropped("tasks_task_experiment_id_77bca29d", "tasks_task", "experiment_id"),
                _dropped("tasks_task_reservation_id_ad5028e1", "tasks_task", "reservation_id"),
                _dropped("tasks_task_cancelled_by_id_739d5c08", "tasks_task", "cancelled_by_id"),
            ],
        ),
        *(
            migrations.AddIndex(
                model_name="task",
                index=models.Index(condition=models.Q((f"{field}__isnull", False)), fields=[field], name=f"task_{field}_set"),
            )
            for field in ("experiment", "reservation", "cancelled_by")
        ),
    ]
