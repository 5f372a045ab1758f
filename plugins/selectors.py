"""Reads of plugin configuration, for the API, the health checks and the scheduler.

The scheduler calls `plugin_env_for_task(task)` and `plugin_sidecars_for_task(task)`
when it builds an `assign` message. Both read the stored configuration on each
call, so a PUT applies to the next task dispatched (hot reload).
"""

from typing import Any

from fetchml.compiled import compiled_per_shape
from plugins.base import BasePlugin, ResolvedConfig
from plugins.models import PluginConfig
from plugins.overrides import apply_task_override
from plugins.registry import get_plugins
from plugins.schema import effective_settings, open_secrets
from tasks.models import Task
from tasks.states import ACTIVE_STATES

MAX_SIDECAR_REPORTS = 200


def resolve(plugin: BasePlugin, row: PluginConfig | None) -> ResolvedConfig:
    """The admin's configuration of a plugin (defaults when it was never configured)."""
    if row is None:
        return ResolvedConfig(
            name=plugin.name,
            enabled=False,
            mode=PluginConfig.Mode.DISABLED,
            image=plugin.default_image,
            settings=effective_settings(plugin.settings_schema, {}),
        )
    return ResolvedConfig(
        name=plugin.name,
        enabled=row.enabled,
        mode=row.mode,
        image=row.image or plugin.default_image,
        settings=effective_settings(plugin.settings_schema, open_secrets(plugin.name, row.settings)),
        updated_at=row.updated_at,
    )


def plugin_config(plugin: BasePlugin) -> ResolvedConfig:
    return resolve(plugin, PluginConfig.objects.filter(name=plugin.name).first())


ActiveConfigs = list[tuple[BasePlugin, ResolvedConfig]]


def plugin_configs() -> ActiveConfigs:
    """Every registered plugin with its configuration, in one query (every dispatch round runs it)."""
    plugins = get_plugins()
    rows = {row.name: row for row in _compiled_rows(names=list(plugins))} if plugins else {}
    return [(plugin, resolve(plugin, rows.get(name))) for name, plugin in plugins.items()]


_compiled_rows = compiled_per_shape(lambda *, names: PluginConfig.objects.filter(name__in=names))


def task_plugin_configs(task: Task, *, fleet: ActiveConfigs | None = None) -> ActiveConfigs:
    """The plugins active for this task, with the task's allowed overrides applied.

    `fleet` is `plugin_configs()` when the caller has it already (one query for many tasks).
    """
    overrides = task.plugin_configs if isinstance(task.plugin_configs, dict) else {}
    active = []
    for plugin, config in plugin_configs() if fleet is None else fleet:
        applied = apply_task_override(plugin, config, overrides.get(plugin.name))
        if applied is not None:
            active.append((plugin, applied))
    return active


def plugin_env_for_task(task: Task, *, configs: ActiveConfigs | None = None) -> dict[str, str]:
    """Environment variables every active plugin adds to the task (secrets in clear: never log).

    `configs` is `task_plugin_configs(task)` when the caller has it already.
    """
    env: dict[str, str] = {}
    for plugin, config in task_plugin_configs(task) if configs is None else configs:
        env.update({str(key): str(value) for key, value in plugin.task_env(config, task).items()})
    return env


def plugin_sidecars_for_task(task: Task, *, configs: ActiveConfigs | None = None) -> list[dict[str, Any]]:
    """The sidecar processes the worker starts beside the task (plugins in sidecar mode)."""
    sidecars = []
    for plugin, config in task_plugin_configs(task) if configs is None else configs:
        if config.mode != PluginConfig.Mode.SIDECAR:
            continue
        command = plugin.sidecar_command(config, task)
        if not command:
            continue
        sidecars.append(
            {
                "name": plugin.name,
                "version": plugin.version,
                "command": [str(part) for part in command],
                "image": config.image,
                "health_path": plugin.sidecar_health_path,
            }
        )
    return sidecars


def sidecar_reports(name: str) -> list[dict[str, Any]]:
    """The latest `plugin_status` reports of a plugin's sidecars on running tasks, newest first."""
    tasks = (
        Task.objects.filter(status__in=ACTIVE_STATES, plugin_status__has_key=name)
        .order_by("-started_at", "-created_at")
        .values("id", "plugin_status")[:MAX_SIDECAR_REPORTS]
    )
    reports = []
    for row in tasks:
        report = row["plugin_status"].get(name)
        if isinstance(report, dict):
            reports.append({"task_id": str(row["id"]), **report})
    return reports
