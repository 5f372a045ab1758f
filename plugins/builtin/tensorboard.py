"""TensorBoard: the task writes event files under its output dir; a sidecar serves them."""

from typing import TYPE_CHECKING

from plugins.base import OUTPUT_DIR, PORT, BasePlugin, ResolvedConfig
from plugins.schema import Setting, required

if TYPE_CHECKING:
    from tasks.models import Task

# A relative path below the output dir: no "..", no leading "/".
SUBDIR_PATTERN = r"[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*"
# A day: beyond it TensorBoard would in effect never show new events.
MAX_RELOAD_INTERVAL_SECONDS = 86400


class TensorBoardPlugin(BasePlugin):
    name = "tensorboard"
    version = "1.0.0"
    description = "TensorBoard for the task's event files (sidecar), or a shared TensorBoard server (remote)."
    modes = frozenset({"sidecar", "remote"})
    # TensorBoard reads its flags once, at start.
    requires_restart = True
    default_image = "tensorflow/tensorflow:2.16.1"
    settings_schema = {
        "log_subdir": Setting(
            str, default="tb", pattern=SUBDIR_PATTERN, overridable=True, help="Event-file folder under the output dir"
        ),
        "url": Setting(str, url=True, required_in=required("remote"), help="The shared TensorBoard (remote mode)"),
        "bind_host": Setting(str, default="127.0.0.1", choices=("127.0.0.1", "0.0.0.0"), help="Sidecar listen address"),
        "reload_interval": Setting(
            int,
            default=5,
            minimum=1,
            maximum=MAX_RELOAD_INTERVAL_SECONDS,
            help="Seconds between scans of the log dir (sidecar mode)",
        ),
    }

    def task_env(self, config: ResolvedConfig, task: "Task") -> dict[str, str]:
        return {"TENSORBOARD_LOGDIR": self._logdir(config)}

    def sidecar_command(self, config: ResolvedConfig, task: "Task") -> list[str] | None:
        return [
            "tensorboard",
            "--logdir",
            self._logdir(config),
            "--host",
            config.settings["bind_host"],
            "--port",
            PORT,
            "--reload_interval",
            str(config.settings["reload_interval"]),
        ]

    @staticmethod
    def _logdir(config: ResolvedConfig) -> str:
        return f"{OUTPUT_DIR}/{config.settings['log_subdir']}"
