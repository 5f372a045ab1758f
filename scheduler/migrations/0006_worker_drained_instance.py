"""The agent process a drain was asked of, and whether the agent asked it itself: its reconnect keeps
draining, and a new process does not inherit the agent's own drain."""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('scheduler', '0005_worker_declared_capacity'),
    ]

    operations = [
        migrations.AddField(
            model_name='worker',
            name='drained_instance',
            field=models.CharField(blank=True, max_length=64),
        ),
        migrations.AddField(
            model_name='worker',
            name='drained_by_agent',
            field=models.BooleanField(default=False),
        ),
    ]
