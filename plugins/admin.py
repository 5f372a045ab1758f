"""Operator console: configured tracking plugins.

Changes go through `plugins.services` (validated against the plugin's settings
schema, audited, pushed to workers); stored settings are shown with secrets masked.
"""

from typing import Any

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest

from fetchml.admin import ReadOnlyModelAdmin, apply_to_each
from plugins.models import PluginConfig
from plugins.registry import get_plugins
from plugins.schema import MASK, mask_settings
from plugins.services import plugin_configure, plugin_disable


@admin.register(PluginConfig)
class PluginConfigAdmin(ReadOnlyModelAdmin):
    list_display = ("name", "enabled", "mode", "image", "updated_at", "updated_by")
    list_filter = ("enabled", "mode")
    list_select_related = ("updated_by",)
    search_fields = ("name", "image")
    ordering = ("name",)
    # Settings may hold credentials: shown only through `masked_settings`.
    hidden_fields = ("settings",)
    actions = ["enable_plugins", "disable_plugins"]

    def get_fields(self, request: HttpRequest, obj: PluginConfig | None = None) -> list[str]:
        return [*super().get_fields(request, obj), "masked_settings"]

    @admin.display(description="settings")
    def masked_settings(self, config: PluginConfig) -> dict[str, Any]:
        plugin = get_plugins().get(config.name)
        if plugin is None:  # no longer registered: its schema (what is secret) is unknown
            return dict.fromkeys(config.settings, MASK)
        return mask_settings(plugin.settings_schema, config.settings)

    @admin.action(description="Enable selected plugins", permissions=["change"])
    def enable_plugins(self, request: HttpRequest, queryset: QuerySet[PluginConfig]) -> None:
        apply_to_each(
            self,
            request,
            queryset,
            "enable",
            lambda config, actor: plugin_configure(name=config.name, actor=actor, enabled=True),
            noun="plugin",
        )

    @admin.action(description="Disable selected plugins", permissions=["change"])
    def disable_plugins(self, request: HttpRequest, queryset: QuerySet[PluginConfig]) -> None:
        apply_to_each(
            self,
            request,
            queryset,
            "disable",
            lambda config, actor: plugin_disable(name=config.name, actor=actor),
            noun="plugin",
        )
