"""The registered plugins: the built-ins plus `FETCHML_PLUGINS` (dotted paths), loaded lazily.

Loading is cached per list of paths, so `override_settings(FETCHML_PLUGINS=...)`
takes effect at once. A bad path is an `ImproperlyConfigured` here and an
error of `manage.py check` (see `plugins.checks`).
"""

import re
from functools import lru_cache

from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from fetchml.conf import app_settings
from fetchml.errors import NotFound
from plugins.base import BasePlugin
from plugins.builtin import BUILTIN_PLUGINS
from plugins.schema import ACTIVE_MODES

NAME_PATTERN = r"[A-Za-z0-9_.-]{1,64}"


def plugin_paths() -> tuple[str, ...]:
    return (*BUILTIN_PLUGINS, *app_settings.PLUGINS)


def load_plugin(path: str) -> BasePlugin:
    """Import one plugin class by dotted path and check what it declares."""
    try:
        cls = import_string(path)
    except ImportError as exc:
        raise ImproperlyConfigured(f"FETCHML_PLUGINS: cannot import {path!r}: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, BasePlugin)):
        raise ImproperlyConfigured(f"FETCHML_PLUGINS: {path!r} is not a subclass of plugins.base.BasePlugin")
    if not re.fullmatch(NAME_PATTERN, cls.name or ""):
        raise ImproperlyConfigured(f"FETCHML_PLUGINS: {path!r} has no valid name (letters, digits, '_', '.', '-')")
    if not cls.version:
        raise ImproperlyConfigured(f"FETCHML_PLUGINS: {path!r} declares no version")
    if not cls.modes or not cls.modes <= ACTIVE_MODES:
        raise ImproperlyConfigured(f"FETCHML_PLUGINS: {path!r} modes must be a non-empty subset of sidecar, remote")
    return cls()


@lru_cache(maxsize=8)
def _load_all(paths: tuple[str, ...]) -> dict[str, BasePlugin]:
    plugins: dict[str, BasePlugin] = {}
    for path in paths:
        plugin = load_plugin(path)
        if plugin.name in plugins:
            raise ImproperlyConfigured(f"FETCHML_PLUGINS: two plugins are named {plugin.name!r} ({path!r})")
        plugins[plugin.name] = plugin
    return plugins


def get_plugins() -> dict[str, BasePlugin]:
    """Every registered plugin by name, built-ins first."""
    return _load_all(plugin_paths())


def get_plugin(name: str) -> BasePlugin:
    plugin = get_plugins().get(name)
    if plugin is None:
        raise NotFound(f"Unknown plugin {name!r}")
    return plugin
