"""Seal the plugin secrets stored in plain text before secrets were sealed (plugins.schema.seal_secrets)."""

from django.db import migrations


def seal_stored_secrets(apps, schema_editor):
    from plugins.registry import get_plugins
    from plugins.schema import seal_secrets

    plugins = get_plugins()
    for row in apps.get_model("plugins", "PluginConfig").objects.all():
        plugin = plugins.get(row.name)
        if plugin is None:
            continue  # no longer registered: which settings are secret is unknown
        sealed = seal_secrets(plugin.settings_schema, row.settings)
        if sealed != row.settings:
            row.settings = sealed
            row.save(update_fields=["settings"])


def open_stored_secrets(apps, schema_editor):
    from plugins.schema import open_secrets

    for row in apps.get_model("plugins", "PluginConfig").objects.all():
        row.settings = open_secrets(row.name, row.settings)
        row.save(update_fields=["settings"])


class Migration(migrations.Migration):

    dependencies = [
        ('plugins', '0001_initial'),
    ]

    operations = [
        migrations.RunPython(seal_stored_secrets, open_stored_secrets),
    ]
