from django.apps import AppConfig


class PluginsConfig(AppConfig):
    name = "plugins"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from plugins import checks  # noqa: F401  (registers the FETCHML_PLUGINS check)
