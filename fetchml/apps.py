from django.apps import AppConfig


class FetchmlConfig(AppConfig):
    name = "fetchml"
    verbose_name = "FetchML"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Registers the X-API-Key scheme with drf-spectacular, and the deploy checks.
        from fetchml import checks, schema  # noqa: F401
        from fetchml.tracing import install_log_record_factory

        install_log_record_factory()
