"""Where a log line belongs in its run (node, place in its output), so a batch sent again is stored once."""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('tasks', '0005_task_queued_by_owner'),
    ]

    operations = [
        migrations.AddField(
            model_name='tasklogline',
            name='node_id',
            field=models.PositiveIntegerField(default=0),
        ),
        migrations.AddField(
            model_name='tasklogline',
            name='seq',
            field=models.PositiveIntegerField(blank=True, null=True),
        ),
        migrations.AddConstraint(
            model_name='tasklogline',
            constraint=models.UniqueConstraint(condition=models.Q(('seq__isnull', False)), fields=('task', 'attempt', 'node_id', 'seq'), name='tasklog_line_once'),
        ),
    ]
