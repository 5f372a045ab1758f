from django.apps import AppConfig


class JupyterConfig(AppConfig):
    name = "jupyter"
    default_auto_field = "django.db.models.BigAutoField"
