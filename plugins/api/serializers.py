"""Plugin API bodies. Output is built from resolved configs; settings always leave masked."""

from collections.abc import Mapping
from typing import Any

from rest_framework import serializers

from plugins.base import BasePlugin, ResolvedConfig
from plugins.health import STATES, HealthReport, PluginState
from plugins.models import PluginConfig
from plugins.schema import describe, mask_settings

MODES = PluginConfig.Mode.values


class PluginConfigSerializer(serializers.Serializer):
    enabled = serializers.BooleanField(required=False)
    mode = serializers.ChoiceField(choices=MODES, required=False, help_text="Provisioning mode")
    image = serializers.CharField(required=False, allow_blank=True, help_text="Sidecar image")
    settings = serializers.DictField(
        required=False,
        help_text='Plugin settings; secrets read as "********", and sending the mask back keeps the stored secret.',
    )


class PluginConfigInputSerializer(PluginConfigSerializer):
    """PUT body. Only the shape is checked here; the service checks every value
    (strict types, the plugin's schema), so the admin form gets the same rules."""

    def to_internal_value(self, data: Any) -> dict[str, Any]:
        if not isinstance(data, Mapping):
            raise serializers.ValidationError({"non_field_errors": ["Expected a JSON object."]})
        unknown = sorted(set(data) - set(self.fields))
        if unknown:
            raise serializers.ValidationError({key: ["Unknown field."] for key in unknown})
        return {key: data[key] for key in self.fields if key in data and data[key] is not None}


class PluginStatusSerializer(serializers.Serializer):
    name = serializers.CharField()
    status = serializers.ChoiceField(choices=STATES)
    url = serializers.CharField(allow_blank=True)
    last_check = serializers.DateTimeField(allow_null=True)


class PluginSerializer(serializers.Serializer):
    name = serializers.CharField(help_text="Plugin name")
    enabled = serializers.BooleanField(help_text="Whether plugin is enabled")
    mode = serializers.ChoiceField(choices=MODES, help_text="Provisioning mode in effect (disabled when not enabled)")
    status = PluginStatusSerializer(help_text="Current plugin status")
    config = PluginConfigSerializer(help_text="Stored configuration, secrets masked")
    requires_restart = serializers.BooleanField(help_text="Whether running sidecars need a restart on config change")
    version = serializers.CharField(help_text="Plugin version")
    description = serializers.CharField()
    modes = serializers.ListField(child=serializers.CharField(), help_text="Modes the plugin supports: sidecar, remote")
    settings_schema = serializers.DictField(
        child=serializers.DictField(), help_text="Each setting: type, default, required_in, secret, choices, ..."
    )


class PluginUpdateSerializer(PluginSerializer):
    restart_required = serializers.BooleanField(
        help_text="The change reaches running sidecars only after they restart (new tasks get it at once)"
    )
    changed = serializers.BooleanField(
        help_text="False when the configuration that applies did not change (nothing stored or audited)"
    )


class SidecarCountsSerializer(serializers.Serializer):
    healthy = serializers.IntegerField(required=False)
    unhealthy = serializers.IntegerField(required=False)
    starting = serializers.IntegerField(required=False)
    stopped = serializers.IntegerField(required=False)


class HealthDetailsSerializer(serializers.Serializer):
    mode = serializers.ChoiceField(choices=MODES)
    plugin_status = PluginStatusSerializer()
    reason = serializers.CharField(allow_blank=True)
    sidecars = SidecarCountsSerializer(help_text="Sidecar mode: running sidecars by reported status")


class HealthResponseSerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=["healthy", "degraded", "unhealthy"])
    version = serializers.CharField()
    timestamp = serializers.DateTimeField()
    details = HealthDetailsSerializer()


def config_data(plugin: BasePlugin, config: ResolvedConfig) -> dict[str, Any]:
    return {
        "enabled": config.enabled,
        "mode": config.mode,
        "image": config.image,
        "settings": mask_settings(plugin.settings_schema, config.settings),
    }


def plugin_data(plugin: BasePlugin, config: ResolvedConfig, state: PluginState) -> dict[str, Any]:
    return {
        "name": plugin.name,
        "enabled": config.active,
        "mode": config.mode if config.active else PluginConfig.Mode.DISABLED,
        "status": state.as_status(),
        "config": config_data(plugin, config),
        "requires_restart": plugin.requires_restart,
        "version": plugin.version,
        "description": plugin.description,
        "modes": sorted(plugin.modes),
        "settings_schema": describe(plugin.settings_schema),
    }


def health_data(report: HealthReport) -> dict[str, Any]:
    return {
        "status": report.status,
        "version": report.version,
        "timestamp": report.timestamp,
        "details": {
            "mode": report.mode,
            "plugin_status": report.state.as_status(),
            "reason": report.state.reason,
            "sidecars": report.state.sidecars,
        },
    }
