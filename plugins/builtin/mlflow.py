"""MLflow: runs tracked to a shared server (remote), or to files served by `mlflow ui` (sidecar)."""

from typing import TYPE_CHECKING

from plugins.base import OUTPUT_DIR, PORT, BasePlugin, ResolvedConfig
from plugins.schema import Setting, required

if TYPE_CHECKING:
    from tasks.models import Task

# The sidecar and the task share this file store, so the task needs no port.
SIDECAR_STORE = f"file://{OUTPUT_DIR}/mlruns"


class MLflowPlugin(BasePlugin):
    name = "mlflow"
    version = "1.0.0"
    description = "MLflow tracking: a shared tracking server (remote) or a per-task `mlflow ui` (sidecar)."
    modes = frozenset({"sidecar", "remote"})
    # A sidecar's store and address are fixed when it starts.
    requires_restart = True
    default_image = "ghcr.io/mlflow/mlflow:v2.14.1"
    sidecar_health_path = "/health"
    settings_schema = {
        "tracking_uri": Setting(str, url=True, required_in=required("remote"), help="MLflow tracking server (remote)"),
        "username": Setting(str, default="", help="MLFLOW_TRACKING_USERNAME for a server with auth"),
        "password": Setting(str, default="", secret=True, help="MLFLOW_TRACKING_PASSWORD"),
        "experiment_name": Setting(
            str, default="", pattern=r"[^\x00-\x1f]{0,256}", overridable=True, help="MLflow experiment"
        ),
        "bind_host": Setting(str, default="127.0.0.1", choices=("127.0.0.1", "0.0.0.0"), help="Sidecar listen address"),
    }

    def task_env(self, config: ResolvedConfig, task: "Task") -> dict[str, str]:
        settings = config.settings
        env = {"MLFLOW_TRACKING_URI": settings["tracking_uri"] if config.mode == "remote" else SIDECAR_STORE}
        if config.mode == "sidecar":
            # MLflow 3.13 and later refuse a file store unless asked to keep it; the task's client
            # and the sidecar (given the run's environment) both read this. Older ones ignore it.
            env["MLFLOW_ALLOW_FILE_STORE"] = "true"
        if config.mode == "remote" and settings["username"]:
            env["MLFLOW_TRACKING_USERNAME"] = settings["username"]
        if config.mode == "remote" and settings["password"]:
            env["MLFLOW_TRACKING_PASSWORD"] = settings["password"]
        if settings["experiment_name"]:
            env["MLFLOW_EXPERIMENT_NAME"] = settings["experiment_name"]
        return env

    def sidecar_command(self, config: ResolvedConfig, task: "Task") -> list[str] | None:
        return [
            "mlflow",
            "ui",
            "--backend-store-uri",
            SIDECAR_STORE,
            "--host",
            config.settings["bind_host"],
            "--port",
            PORT,
        ]

    def remote_url(self, config: ResolvedConfig) -> str:
        return str(config.settings.get("tracking_uri") or "")
