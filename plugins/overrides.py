"""What a task may change about a plugin: the rule "within what the admin allows".

A task's `plugin_configs[name]` ({enabled, mode, image, settings}) is applied
on top of the admin's configuration like this:

- A plugin the admin has not enabled stays off; a task cannot turn it on.
- A task may turn an enabled plugin off for itself: `enabled: false` or
  `mode: "disabled"`.
- The provisioning mode (sidecar/remote) and the sidecar image are the
  admin's; a task's `mode` other than "disabled" and its `image` are ignored.
- In `settings`, a task may set only the settings the plugin's schema marks
  `overridable`, each checked against its type, choices and pattern. Secrets
  and server URLs are never overridable, so a task cannot redirect tracking
  data or see another account's credentials.

`validate_task_plugin_configs` refuses violations at submission (422),
and an override of a plugin the admin has not enabled unless it only turns it
off (a client that always turns a plugin off keeps working whatever the admin
does); `apply_task_override` drops violations (with a warning) for tasks stored
earlier, and ignores overrides of plugins disabled since.
"""

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from fetchml.errors import Invalid
from plugins.base import BasePlugin, ResolvedConfig
from plugins.registry import get_plugins
from plugins.schema import task_overrides

logger = logging.getLogger("plugins.overrides")


def _wants_off(override: Mapping[str, Any]) -> bool:
    return override.get("enabled") is False or override.get("mode") == "disabled"


def override_problems(plugin: BasePlugin, override: Any) -> list[dict[str, str]]:
    """What is not allowed in one task override; field names relative to the override."""
    if not isinstance(override, Mapping):
        return [{"field": "", "message": "Must be an object."}]
    problems: list[dict[str, str]] = []
    if override.get("image"):
        problems.append({"field": "image", "message": "The sidecar image is chosen by the administrator."})
    if not _wants_off(override):
        _accepted, refused = task_overrides(plugin.settings_schema, override.get("settings") or {})
        problems.extend(refused)
    return problems


def validate_task_plugin_configs(plugin_configs: Mapping[str, Any]) -> None:
    """Raise Invalid (422) naming every field of a task's `plugin_configs` that is not allowed."""
    # Imported here: the selectors apply overrides with this module.
    from plugins.selectors import plugin_configs as admin_configs

    active = {plugin.name for plugin, config in admin_configs() if config.active}
    plugins = get_plugins()
    details: list[dict[str, str]] = []
    for name, override in plugin_configs.items():
        plugin = plugins.get(name)
        if plugin is None:
            details.append({"field": f"plugin_configs.{name}", "message": "Unknown plugin."})
            continue
        if name not in active and not (isinstance(override, Mapping) and _wants_off(override)):
            details.append(
                {
                    "field": f"plugin_configs.{name}",
                    "message": "The plugin is disabled by the administrator; a task may only turn it off.",
                }
            )
        for problem in override_problems(plugin, override):
            field = f"plugin_configs.{name}" + (f".{problem['field']}" if problem["field"] else "")
            details.append({"field": field, "message": problem["message"]})
    if details:
        raise Invalid("Validation failed: " + ", ".join(d["field"] for d in details), details=details)


def apply_task_override(plugin: BasePlugin, config: ResolvedConfig, override: Any) -> ResolvedConfig | None:
    """The configuration this task runs the plugin with, or None when the plugin is off for it."""
    if not config.active:
        return None
    if not isinstance(override, Mapping):
        return config
    if _wants_off(override):
        return None
    accepted, refused = task_overrides(plugin.settings_schema, override.get("settings") or {})
    if refused:
        # Names only: values may be anything a user typed.
        logger.warning("plugin %s: ignoring task settings %s", plugin.name, ", ".join(r["field"] for r in refused))
    if not accepted:
        return config
    return dataclasses.replace(config, settings={**config.settings, **accepted})
