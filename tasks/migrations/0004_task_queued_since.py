"""The queued tasks by how long they have waited: the starvation check probes the longest-waiting."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("tasks", "0003_lighter_foreign_key_indexes")]

    operations = [
        migrations.AddIndex(
            model_name="task",
            index=models.Index(condition=models.Q(status="queued"), fields=["queued_at"], name="task_queued_since"),
        ),
    ]
