"""Plugin endpoints: reads for any user, configuration changes for admins."""

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.permissions import BasePermission
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from fetchml.auth import actor_from_request
from fetchml.jsonbody import validated_body
from fetchml.permissions import IsAdmin, IsHumanUser
from fetchml.query import KnownQueryParameters
from plugins import selectors, services
from plugins.api.serializers import (
    HealthResponseSerializer,
    PluginConfigInputSerializer,
    PluginConfigSerializer,
    PluginSerializer,
    PluginUpdateSerializer,
    config_data,
    health_data,
    plugin_data,
)
from plugins.health import plugin_health, plugin_state, plugin_states
from plugins.registry import get_plugin

PLUGIN_NAME = OpenApiParameter(
    "pluginName", OpenApiTypes.STR, OpenApiParameter.PATH, description="Plugin name, e.g. mlflow"
)
TAGS = ["Plugins"]
_WRITES = {"PUT", "PATCH", "POST", "DELETE"}


class PluginView(KnownQueryParameters, APIView):
    """Reads: any human user. Writes: admins only."""

    def get_permissions(self) -> list[BasePermission]:
        return [IsAdmin()] if self.request.method in _WRITES else [IsHumanUser()]


def _disable(request: Request, name: str) -> Response:
    services.plugin_disable(name=name, actor=actor_from_request(request))
    return Response(status=status.HTTP_204_NO_CONTENT)


_DISABLE_DOC = {
    "tags": TAGS,
    "parameters": [PLUGIN_NAME],
    "responses": {204: OpenApiResponse(description="Plugin disabled (also when it already was)")},
}


class PluginListView(PluginView):
    @extend_schema(
        summary="List available plugins",
        description="Returns all registered plugins and their status",
        tags=TAGS,
        responses={200: PluginSerializer(many=True)},
    )
    def get(self, request: Request) -> Response:
        pairs = selectors.plugin_configs()
        states = plugin_states(pairs)
        return Response([plugin_data(plugin, config, states[plugin.name]) for plugin, config in pairs])


class PluginDetailView(PluginView):
    @extend_schema(
        summary="Get plugin details",
        description="Returns plugin configuration and status",
        tags=TAGS,
        parameters=[PLUGIN_NAME],
        responses={200: PluginSerializer},
    )
    def get(self, request: Request, pluginName: str) -> Response:
        plugin = get_plugin(pluginName)
        config = selectors.plugin_config(plugin)
        return Response(plugin_data(plugin, config, plugin_state(plugin, config)))

    @extend_schema(
        summary="Disable/unload plugin",
        description="Alias of DELETE /v1/plugins/{pluginName}/config.",
        **_DISABLE_DOC,
    )
    def delete(self, request: Request, pluginName: str) -> Response:
        return _disable(request, pluginName)


class PluginConfigView(PluginView):
    @extend_schema(
        summary="Get plugin configuration",
        description='Returns plugin configuration; secrets read as "********".',
        tags=TAGS,
        parameters=[PLUGIN_NAME],
        responses={200: PluginConfigSerializer},
    )
    def get(self, request: Request, pluginName: str) -> Response:
        plugin = get_plugin(pluginName)
        return Response(config_data(plugin, selectors.plugin_config(plugin)))

    @extend_schema(
        summary="Update plugin configuration",
        description=(
            "Update plugin configuration (hot-reload: tasks dispatched from now on get it, and connected "
            "workers are told). Fields left out keep their values; `settings` replaces the stored settings, "
            'except that a secret sent as "********" keeps its stored value. Unknown or wrongly typed '
            "settings are a 422 naming the field. `restart_required` says running sidecars keep the old "
            "configuration until they restart. `changed` is false when the configuration that applies is "
            "the same as before (an empty image is the default one, a missing setting its default); then "
            "nothing is stored, audited or sent. Admin only; audited as `plugin_configured`."
        ),
        tags=TAGS,
        parameters=[PLUGIN_NAME],
        request=PluginConfigInputSerializer,
        responses={200: PluginUpdateSerializer},
    )
    def put(self, request: Request, pluginName: str) -> Response:
        plugin = get_plugin(pluginName)
        fields = validated_body(PluginConfigInputSerializer, request)
        result = services.plugin_configure(name=plugin.name, actor=actor_from_request(request), **fields)
        data = plugin_data(result.plugin, result.config, plugin_state(result.plugin, result.config))
        return Response({**data, "restart_required": result.restart_required, "changed": result.changed})

    @extend_schema(
        summary="Disable/unload plugin",
        description=(
            "Disable plugin for tasks dispatched from now on (running sidecars stop with their tasks). "
            "Only `enabled` changes: its mode and settings are kept (not re-validated), so a PUT with "
            "enabled=true turns it back on. Like a PUT, it is audited as `plugin_configured` (action "
            "`disable`) and told to connected workers, and only when the plugin was enabled. Admin only."
        ),
        **_DISABLE_DOC,
    )
    def delete(self, request: Request, pluginName: str) -> Response:
        return _disable(request, pluginName)


class PluginHealthView(PluginView):
    @extend_schema(
        summary="Check plugin health",
        description=(
            "Returns health status of plugin sidecars. Remote mode: an HTTP GET of the configured server "
            "(2 s timeout). Sidecar mode: the latest reports of sidecars beside running tasks. "
            "`details.plugin_status.status` is stopped when disabled or when no sidecar runs."
        ),
        tags=TAGS,
        parameters=[PLUGIN_NAME],
        responses={200: HealthResponseSerializer},
    )
    def get(self, request: Request, pluginName: str) -> Response:
        plugin = get_plugin(pluginName)
        return Response(health_data(plugin_health(plugin, selectors.plugin_config(plugin))))
