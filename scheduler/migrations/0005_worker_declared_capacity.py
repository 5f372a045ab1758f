"""What a worker last declared, so that capacity held above it by running work shrinks back as those runs end."""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('scheduler', '0004_worker_agent_instance'),
    ]

    operations = [
        migrations.AddField(
            model_name='worker',
            name='declared_batch_slots',
            field=models.PositiveIntegerField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='worker',
            name='declared_cpu_cores',
            field=models.PositiveIntegerField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='worker',
            name='declared_gpu_count',
            field=models.PositiveIntegerField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='worker',
            name='declared_memory_gb',
            field=models.PositiveIntegerField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='worker',
            name='declared_service_slots',
            field=models.PositiveIntegerField(blank=True, null=True),
        ),
    ]
