"""Weights & Biases: tasks log to a W&B server (the cloud or a self-hosted one).

By design every task gets the fleet's W&B API key in its environment (`WANDB_API_KEY`): W&B's
client reads it from there, and FetchML has no per-user W&B keys. So any user's task (and anything
it runs) can read the key and act as its W&B account: configure a key meant for the whole fleet (a
W&B team service account), never a person's own key.
"""

from typing import TYPE_CHECKING

from plugins.base import OUTPUT_DIR, BasePlugin, ResolvedConfig
from plugins.schema import Setting, required

if TYPE_CHECKING:
    from tasks.models import Task


class WandbPlugin(BasePlugin):
    name = "wandb"
    version = "1.0.0"
    description = "Weights & Biases: points tasks at a W&B server with the fleet's API key."
    # W&B has no per-task server to start beside a run.
    modes = frozenset({"remote"})
    requires_restart = False
    settings_schema = {
        "base_url": Setting(str, default="https://api.wandb.ai", url=True, required_in=required("remote")),
        "health_url": Setting(str, default="", url=True, help="URL probed by the health check (default: base_url)"),
        "api_key": Setting(str, secret=True, required_in=required("remote"), help="WANDB_API_KEY"),
        "entity": Setting(str, default="", pattern=r"[A-Za-z0-9_.-]{0,128}", help="W&B team or user"),
        "project": Setting(str, default="", pattern=r"[A-Za-z0-9_.-]{0,128}", overridable=True),
        "run_mode": Setting(
            str, default="online", choices=("online", "offline", "disabled"), overridable=True, help="WANDB_MODE"
        ),
    }

    def task_env(self, config: ResolvedConfig, task: "Task") -> dict[str, str]:
        settings = config.settings
        env = {
            "WANDB_BASE_URL": settings["base_url"],
            "WANDB_API_KEY": settings["api_key"] or "",
            "WANDB_MODE": settings["run_mode"],
            "WANDB_DIR": OUTPUT_DIR,
        }
        if settings["entity"]:
            env["WANDB_ENTITY"] = settings["entity"]
        if settings["project"]:
            env["WANDB_PROJECT"] = settings["project"]
        return env

    def remote_url(self, config: ResolvedConfig) -> str:
        return str(config.settings.get("health_url") or config.settings.get("base_url") or "")
