"""Plugin health as the server sees it.

- disabled: `stopped`.
- remote: an HTTP GET of the configured server (short timeout); the result is
  cached briefly so listing plugins does not probe on every request.
- sidecar: the latest `plugin_status` reports of the sidecars beside running
  tasks; with none running, `stopped`.

`PluginState.status` uses the PluginStatus values (healthy, unhealthy,
starting, stopped). The health endpoint summarises it in the HealthResponse
values: healthy; degraded (starting, stopped, or only some sidecars healthy);
unhealthy.
"""

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.core.cache import cache
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from fetchml.conf import app_settings
from plugins.base import BasePlugin, ResolvedConfig
from plugins.selectors import sidecar_reports

HEALTHY, UNHEALTHY, STARTING, STOPPED = "healthy", "unhealthy", "starting", "stopped"
STATES = (HEALTHY, UNHEALTHY, STARTING, STOPPED)


@dataclass(frozen=True)
class PluginState:
    name: str
    status: str
    url: str = ""
    last_check: datetime | None = None
    reason: str = ""
    # Sidecar mode: how many sidecars report each status.
    sidecars: dict[str, int] = field(default_factory=dict)

    def as_status(self) -> dict[str, Any]:
        """The PluginStatus body."""
        return {"name": self.name, "status": self.status, "url": self.url, "last_check": self.last_check}


@dataclass(frozen=True)
class HealthReport:
    status: str  # healthy, degraded, unhealthy
    version: str
    timestamp: datetime
    state: PluginState
    mode: str


def _cache_key(plugin: BasePlugin, config: ResolvedConfig) -> str:
    # A new configuration (another URL, a re-save) must not reuse the old verdict.
    fingerprint = f"{plugin.remote_url(config)}|{config.updated_at}|{config.mode}|{config.enabled}"
    return f"plugins:health:{plugin.name}:{hashlib.sha256(fingerprint.encode()).hexdigest()[:32]}"


def _remote_state(plugin: BasePlugin, config: ResolvedConfig, *, use_cache: bool) -> PluginState:
    key = _cache_key(plugin, config)
    if use_cache and (cached := cache.get(key)) is not None:
        return PluginState(name=plugin.name, **cached)
    result = plugin.check_remote(config, timeout=app_settings.PLUGIN_HEALTH_TIMEOUT_SECONDS)
    values = {
        "status": HEALTHY if result.healthy else UNHEALTHY,
        "url": plugin.remote_url(config),
        "last_check": timezone.now(),
        "reason": result.reason,
    }
    cache.set(key, values, timeout=app_settings.PLUGIN_HEALTH_CACHE_SECONDS)
    return PluginState(name=plugin.name, **values)


def _sidecar_state(plugin: BasePlugin) -> PluginState:
    reports = sidecar_reports(plugin.name)
    if not reports:
        return PluginState(name=plugin.name, status=STOPPED, reason="no sidecar is running")
    statuses = [report.get("status") for report in reports]
    if all(status == HEALTHY for status in statuses):
        status = HEALTHY
    elif UNHEALTHY in statuses:
        status = UNHEALTHY
    else:
        status = STARTING
    checks = [parse_datetime(r["last_check"]) for r in reports if isinstance(r.get("last_check"), str)]
    counts = {state: statuses.count(state) for state in STATES if state in statuses}
    # No URL: each sidecar serves one user's task; its owner finds it in Task.plugin_status.
    return PluginState(
        name=plugin.name,
        status=status,
        last_check=max((c for c in checks if c is not None), default=None),
        reason=f"{counts.get(HEALTHY, 0)} of {len(reports)} sidecars healthy",
        sidecars=counts,
    )


def plugin_state(plugin: BasePlugin, config: ResolvedConfig, *, use_cache: bool = True) -> PluginState:
    if not config.active:
        return PluginState(name=plugin.name, status=STOPPED, reason="plugin is disabled")
    if config.mode == "remote":
        return _remote_state(plugin, config, use_cache=use_cache)
    return _sidecar_state(plugin)


def plugin_states(pairs: list[tuple[BasePlugin, ResolvedConfig]]) -> dict[str, PluginState]:
    """States of many plugins; remote probes that are not cached run in parallel."""
    remote = [(p, c) for p, c in pairs if c.active and c.mode == "remote"]
    states: dict[str, PluginState] = {}
    if remote:
        with ThreadPoolExecutor(max_workers=min(8, len(remote))) as pool:
            futures = {p.name: pool.submit(_remote_state, p, c, use_cache=True) for p, c in remote}
            states.update({name: future.result() for name, future in futures.items()})
    for plugin, config in pairs:
        if plugin.name not in states:
            states[plugin.name] = plugin_state(plugin, config)
    return {plugin.name: states[plugin.name] for plugin, _config in pairs}


def _summary(state: PluginState) -> str:
    if state.status == HEALTHY:
        return "healthy"
    if state.status == UNHEALTHY:
        return "degraded" if state.sidecars.get(HEALTHY) else "unhealthy"
    return "degraded"


def plugin_health(plugin: BasePlugin, config: ResolvedConfig) -> HealthReport:
    """A fresh check (never the cached verdict) for the health endpoint."""
    state = plugin_state(plugin, config, use_cache=False)
    return HealthReport(
        status=_summary(state),
        version=plugin.version,
        timestamp=timezone.now(),
        state=state,
        mode=config.mode if config.active else "disabled",
    )
