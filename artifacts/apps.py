from django.apps import AppConfig


class ArtifactsConfig(AppConfig):
    """The bytes a run consumes (code snapshots, datasets) and produces (artifacts)."""

    name = "artifacts"
    verbose_name = "Snapshots, datasets and artifacts"
    default_auto_field = "django.db.models.BigAutoField"
