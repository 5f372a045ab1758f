"""The agent process behind a worker's connection, so its reconnect replaces its old connection at once."""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('scheduler', '0003_foreign_keys_served_by_composite_indexes'),
    ]

    operations = [
        migrations.AddField(
            model_name='worker',
            name='agent_instance',
            field=models.CharField(blank=True, max_length=64),
        ),
    ]
