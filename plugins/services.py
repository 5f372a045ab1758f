"""Writes of plugin configuration and of per-task plugin status.

`plugin_configure` / `plugin_disable` store an admin's configuration, audit it
(`plugin_configured`, secrets masked) in the same transaction, and after commit
tell every worker connection (group `workers.all`) with a `worker.plugins`
message. The worker consumer forwards that to its agent as a protocol `config`
message; new tasks get the new configuration from the selectors at dispatch.
"""

import dataclasses
import uuid
from dataclasses import dataclass
from typing import Any

from django.db import transaction
from django.utils import timezone

from audit.services import record
from fetchml import events
from fetchml.auth import Actor
from fetchml.clock import api_time
from fetchml.errors import Conflict, Forbidden, Invalid, NotFound
from plugins.base import BasePlugin, ResolvedConfig
from plugins.health import STATES, STOPPED
from plugins.models import PluginConfig
from plugins.registry import get_plugin, get_plugins
from plugins.schema import is_http_url, open_secrets, seal_secrets, settings_diff, validate_settings
from plugins.selectors import resolve
from scheduler.agent.protocol import MAX_PLUGIN_ERROR
from tasks.models import Task

WORKERS_GROUP = "workers.all"
MAX_IMAGE_LENGTH = 255
MAX_URL_LENGTH = 2048


@dataclass(frozen=True)
class ConfigureResult:
    plugin: BasePlugin
    config: ResolvedConfig
    changed: bool
    # The change reaches running sidecars of this plugin only when they restart.
    restart_required: bool


def _check_top_level(plugin: BasePlugin, enabled: Any, mode: Any, image: Any) -> list[dict[str, str]]:
    errors: list[dict[str, str]] = []
    supported = ", ".join(sorted(plugin.modes))
    if not isinstance(enabled, bool):
        errors.append({"field": "enabled", "message": "Must be a boolean."})
    if mode not in PluginConfig.Mode.values:
        errors.append({"field": "mode", "message": "Must be one of: sidecar, remote, disabled."})
    elif mode != PluginConfig.Mode.DISABLED and mode not in plugin.modes:
        supported = ", ".join(sorted(plugin.modes))
        errors.append(
            {"field": "mode", "message": f"{plugin.name} does not run in {mode} mode (supports: {supported})."}
        )
    elif enabled is True and mode == PluginConfig.Mode.DISABLED:
        errors.append(
            {"field": "mode", "message": "An enabled plugin needs a mode: " + ", ".join(sorted(plugin.modes))}
        )
    if not isinstance(image, str):
        errors.append({"field": "image", "message": "Must be a string."})
    elif len(image) > MAX_IMAGE_LENGTH or any(ch.isspace() or not ch.isprintable() for ch in image):
        errors.append({"field": "image", "message": f"An image reference: no spaces, at most {MAX_IMAGE_LENGTH}."})
    return errors


def _raise_if(errors: list[dict[str, str]]) -> None:
    if errors:
        fields = ", ".join(dict.fromkeys(e["field"] for e in errors))
        raise Invalid(f"Invalid plugin configuration: {fields}", details=errors)


def _worker_message(plugin: BasePlugin, config: ResolvedConfig, restart_required: bool) -> dict[str, Any]:
    # No settings: they may hold secrets, and each task's assign carries what it needs.
    return {
        "type": "worker.plugins",
        "plugins": [
            {
                "name": plugin.name,
                "version": plugin.version,
                "enabled": config.active,
                "mode": config.mode if config.active else PluginConfig.Mode.DISABLED,
                "image": config.image,
                "requires_restart": plugin.requires_restart,
            }
        ],
        "restart_required": restart_required,
    }


def _require_admin(actor: Actor) -> None:
    if not actor.is_admin:
        raise Forbidden("Admin role required")


@transaction.atomic
def _store(
    *, plugin: BasePlugin, actor: Actor, action: str, enabled: Any, mode: Any, image: Any, settings: Any
) -> ConfigureResult:
    _require_admin(actor)
    row = PluginConfig.objects.select_for_update().filter(name=plugin.name).first()
    before = resolve(plugin, row)
    stored = open_secrets(plugin.name, row.settings) if row else {}
    enabled = before.enabled if enabled is None else enabled
    mode = before.mode if mode is None else mode
    image = (row.image if row else "") if image is None else image
    errors = _check_top_level(plugin, enabled, mode, image)
    active = enabled is True and isinstance(mode, str) and mode in plugin.modes
    new_settings, setting_errors = validate_settings(
        plugin.settings_schema, stored if settings is None else settings, stored=stored, mode=mode, active=active
    )
    _raise_if(errors + setting_errors)
    after = resolve(
        plugin, PluginConfig(name=plugin.name, enabled=enabled, mode=mode, image=image, settings=new_settings)
    )
    if active:
        _raise_if(plugin.validate(after))
    # Compared as they apply (an empty image is the default image, a missing setting its
    # default): putting back what a GET showed changes nothing.
    return _save_if_changed(
        plugin=plugin,
        actor=actor,
        action=action,
        row=row,
        before=before,
        after=after,
        values={
            "enabled": enabled,
            "mode": mode,
            "image": image,
            "settings": seal_secrets(plugin.settings_schema, new_settings),
        },
    )


def _save_if_changed(
    *,
    plugin: BasePlugin,
    actor: Actor,
    action: str,
    row: PluginConfig | None,
    before: ResolvedConfig,
    after: ResolvedConfig,
    values: dict[str, Any],
) -> ConfigureResult:
    """Store `values`, audit and tell the workers, when the configuration that applies changes."""
    changes = {
        key: {"from": getattr(before, key), "to": getattr(after, key)}
        for key in ("enabled", "mode", "image")
        if getattr(before, key) != getattr(after, key)
    }
    diff = settings_diff(plugin.settings_schema, before.settings, after.settings)
    if not changes and not diff:
        return ConfigureResult(plugin=plugin, config=before, changed=False, restart_required=False)
    if row is None:
        row = PluginConfig(name=plugin.name)
    for key, value in values.items():
        setattr(row, key, value)
    row.updated_at = timezone.now()
    row.updated_by = actor.user
    row.save()
    config = resolve(plugin, row)
    record(
        event_type="plugin_configured",
        user=actor.user,
        resource=f"plugin:{plugin.name}",
        action=action,
        ip_address=actor.ip_address,
        metadata={"changes": changes, "settings": diff},
    )
    restart_required = plugin.requires_restart
    events.send_on_commit([WORKERS_GROUP], _worker_message(plugin, config, restart_required))
    return ConfigureResult(plugin=plugin, config=config, changed=True, restart_required=restart_required)


def plugin_configure(
    *,
    name: str,
    actor: Actor,
    enabled: bool | None = None,
    mode: str | None = None,
    image: str | None = None,
    settings: dict[str, Any] | None = None,
) -> ConfigureResult:
    """Store an admin's configuration of a plugin.

    Fields left out (None) keep their stored values; `settings`, when given, replaces
    the stored settings, except that a secret sent as the mask ("********")
    keeps its stored value. A request that changes nothing is not audited.
    """
    plugin = get_plugin(name)
    return _store(
        plugin=plugin, actor=actor, action="configure", enabled=enabled, mode=mode, image=image, settings=settings
    )


@transaction.atomic
def plugin_disable(*, name: str, actor: Actor) -> ConfigureResult:
    """Turn a plugin off for new tasks; its mode and settings are kept for re-enabling.

    Only `enabled` changes, so the stored rest is not re-validated: a plugin whose
    stored settings a newer version no longer accepts can still be turned off.
    Like a PUT, it is audited and told to the workers only when it changes something.
    """
    plugin = get_plugin(name)
    _require_admin(actor)
    row = PluginConfig.objects.select_for_update().filter(name=plugin.name).first()
    before = resolve(plugin, row)
    after = dataclasses.replace(before, enabled=False)
    return _save_if_changed(
        plugin=plugin, actor=actor, action="disable", row=row, before=before, after=after, values={"enabled": False}
    )


def _check_report(name: Any, status: Any, url: Any, error: Any) -> list[dict[str, str]]:
    errors = []
    if not isinstance(name, str) or name not in get_plugins():
        errors.append({"field": "name", "message": "Unknown plugin."})
    if status not in STATES:
        errors.append({"field": "status", "message": "Must be one of: " + ", ".join(STATES) + "."})
    if not isinstance(url, str) or len(url) > MAX_URL_LENGTH:
        errors.append({"field": "url", "message": f"Must be a string of at most {MAX_URL_LENGTH} characters."})
    elif url and not is_http_url(url):
        errors.append({"field": "url", "message": "Must be empty or an http:// or https:// URL."})
    if not isinstance(error, str) or len(error) > MAX_PLUGIN_ERROR:
        errors.append({"field": "error", "message": f"Must be a string of at most {MAX_PLUGIN_ERROR} characters."})
    return errors


def plugin_status_report(*, task_id: Any, name: str, status: str, url: str = "", error: str = "") -> dict[str, Any]:
    """Record what a worker reports about one plugin sidecar of a task: `Task.plugin_status[name]`.

    `error` says why a sidecar is unhealthy (empty otherwise). A finished task accepts
    only `stopped` (its sidecars being torn down). Clients are told when the status,
    URL or error changes, not on every re-check.
    """
    try:
        task_uuid = uuid.UUID(str(task_id))
    except ValueError:
        raise Invalid("Invalid plugin status report: task_id", details=[{"field": "task_id", "message": "Not a UUID."}])
    _raise_if(_check_report(name, status, url, error))
    with transaction.atomic():
        task = Task.objects.select_for_update().filter(id=task_uuid).first()
        if task is None:
            raise NotFound("Task not found")
        if task.is_final and status != STOPPED:
            raise Conflict(f"Task is {task.status}; only a stopped plugin can be reported")
        previous = task.plugin_status.get(name) if isinstance(task.plugin_status, dict) else None
        entry = {"name": name, "status": status, "url": url, "error": error, "last_check": api_time(timezone.now())}
        task.plugin_status = {**(task.plugin_status or {}), name: entry}
        task.save(update_fields=["plugin_status", "updated_at"])
        if not previous or any(previous.get(key, "") != entry[key] for key in ("status", "url", "error")):
            events.task_changed(task, event="plugin_status", extra={"plugin": name, "plugin_status": status})
    return entry
