"""The queued tasks by owner and priority: the fair-share count of a submission reads only the owner's
queued tasks, not the owner's whole history nor everyone's queue."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("tasks", "0004_task_queued_since")]

    operations = [
        migrations.AddIndex(
            model_name="task",
            index=models.Index(
                condition=models.Q(status="queued"), fields=["owner", "priority"], name="task_queued_by_owner"
            ),
        ),
    ]
