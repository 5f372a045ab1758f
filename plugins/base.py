"""What a tracking plugin is: a class with a name, a version, a settings schema and hooks.

Third-party plugins subclass `BasePlugin` and are listed by dotted path in
`FETCHML_PLUGINS`. Hooks receive the resolved configuration (admin settings
with defaults, and the task's allowed overrides) and return plain data the
scheduler puts into the worker's `assign` message.

Placeholders: in `task_env` values and `sidecar_command` items the worker
replaces `{output_dir}` with the run's FETCHML_OUTPUT_DIR and, in a sidecar
command, `{port}` with a free port it picked. It replaces them literally
(`str.replace`, not `str.format`), so braces in other values are harmless.
"""

from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar

from plugins.probe import ProbeResult, http_probe
from plugins.schema import ACTIVE_MODES, Setting

if TYPE_CHECKING:
    from tasks.models import Task

OUTPUT_DIR = "{output_dir}"
PORT = "{port}"


@dataclass(frozen=True)
class ResolvedConfig:
    """A plugin's configuration as it applies (to the fleet, or to one task).

    `settings` holds secrets in clear: pass it to hooks, never log or render it.
    """

    name: str
    enabled: bool
    mode: str
    image: str
    settings: dict[str, Any] = field(default_factory=dict)
    updated_at: datetime | None = None

    @property
    def active(self) -> bool:
        return self.enabled and self.mode in ACTIVE_MODES


class BasePlugin:
    name: ClassVar[str] = ""
    version: ClassVar[str] = ""
    description: ClassVar[str] = ""
    # Modes this plugin can run in; `disabled` is always possible.
    modes: ClassVar[frozenset[str]] = frozenset({"remote"})
    # True when running sidecars keep their old configuration until restarted.
    requires_restart: ClassVar[bool] = False
    default_image: ClassVar[str] = ""
    settings_schema: ClassVar[dict[str, Setting]] = {}
    # Path the worker probes on a sidecar to report it healthy.
    sidecar_health_path: ClassVar[str] = "/"

    def task_env(self, config: ResolvedConfig, task: "Task") -> dict[str, str]:
        """Environment variables for the task's process."""
        return {}

    def sidecar_command(self, config: ResolvedConfig, task: "Task") -> list[str] | None:
        """The process the worker starts beside the task in sidecar mode (None: no sidecar)."""
        return None

    def remote_url(self, config: ResolvedConfig) -> str:
        """The existing server a remote-mode plugin points tasks at (probed by the health check)."""
        return str(config.settings.get("url") or "")

    def validate(self, config: ResolvedConfig) -> list[dict[str, str]]:
        """Cross-field rules beyond the schema: [{"field", "message"}]."""
        return []

    def check_remote(self, config: ResolvedConfig, *, timeout: float) -> ProbeResult:
        """Remote-mode health: the configured server answers an HTTP GET."""
        url = self.remote_url(config)
        if not url:
            return ProbeResult(False, "no server URL configured")
        return http_probe(url, timeout=timeout)
