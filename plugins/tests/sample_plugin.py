"""A third-party plugin, registered in tests through FETCHML_PLUGINS by dotted path."""

from plugins.base import OUTPUT_DIR, PORT, BasePlugin, ResolvedConfig
from plugins.schema import Setting, required


class SamplePlugin(BasePlugin):
    name = "sample"
    version = "0.3.1"
    description = "Test tracker"
    modes = frozenset({"sidecar", "remote"})
    settings_schema = {
        "url": Setting(str, url=True, required_in=required("remote")),
        "token": Setting(str, secret=True, default=""),
        "level": Setting(str, default="info", choices=("debug", "info"), overridable=True),
        "batch": Setting(int, default=10),
    }

    def task_env(self, config: ResolvedConfig, task) -> dict[str, str]:
        env = {"SAMPLE_LEVEL": config.settings["level"], "SAMPLE_DIR": f"{OUTPUT_DIR}/sample"}
        if config.mode == "remote":
            env["SAMPLE_URL"] = config.settings["url"]
        return env

    def sidecar_command(self, config: ResolvedConfig, task) -> list[str] | None:
        return ["sample-server", "--port", PORT, "--batch", str(config.settings["batch"])]


class NotAPlugin:
    name = "imposter"
