"""OpenAPI (drf-spectacular) extensions: the X-API-Key scheme, the error responses, and the
operations served outside DRF (plain views and the /ws WebSocket).

Imported from `FetchmlConfig.ready()` so the extension is registered before the
first schema is generated.
"""

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension, OpenApiSerializerFieldExtension
from drf_spectacular.openapi import AutoSchema as SpectacularAutoSchema
from drf_spectacular.utils import OpenApiResponse
from rest_framework import serializers

ERROR_CODES = [
    "BAD_REQUEST",
    "UNAUTHORIZED",
    "FORBIDDEN",
    "NOT_FOUND",
    "CONFLICT",
    "RATE_LIMITED",
    "INTERNAL_ERROR",
    "SERVICE_UNAVAILABLE",
    "VALIDATION_ERROR",
]


class ApiKeyAuthenticationScheme(OpenApiAuthenticationExtension):
    target_class = "fetchml.auth.ApiKeyAuthentication"
    name = "ApiKeyAuth"  # the spec's name for the scheme

    def get_security_definition(self, auto_schema: SpectacularAutoSchema) -> dict[str, str]:
        return {
            "type": "apiKey",
            "in": "header",
            "name": "X-API-Key",
            "description": "API key `fetchml_<prefix>_<secret>`, created with `manage.py createapikey`.",
        }


class PageLimitFieldSchema(OpenApiSerializerFieldExtension):
    """`limit`'s ceiling is a setting, read at each request; the schema shows it as generated."""

    target_class = "fetchml.paging.PageLimitField"

    def map_serializer_field(self, auto_schema: SpectacularAutoSchema, direction: str) -> dict[str, Any]:
        from fetchml.conf import app_settings

        schema: dict[str, Any] = {"type": "integer", "minimum": 1, "maximum": app_settings.MAX_PAGE_SIZE}
        if isinstance(self.target.default, int):
            schema["default"] = self.target.default
        return schema


class ErrorDetailSerializer(serializers.Serializer):
    field = serializers.CharField(allow_null=True, help_text="The bad field (dotted path), or null for the whole body")
    message = serializers.CharField()


class ErrorResponseSerializer(serializers.Serializer):
    """Only used to document the error body rendered by `fetchml.errors`."""

    error = serializers.CharField(help_text="Sanitized error message")
    code = serializers.ChoiceField(choices=ERROR_CODES)
    trace_id = serializers.CharField(help_text="Support correlation ID, also sent as X-Request-ID")
    details = ErrorDetailSerializer(
        many=True,
        required=False,
        help_text="One entry per bad field or query parameter (validation errors, bad filters, conflicts on a field)",
    )


def error_response(description: str) -> OpenApiResponse:
    """An error response in an operation's schema: the standard error body, described."""
    return OpenApiResponse(response=ErrorResponseSerializer, description=description)


_BODY_METHODS = {"POST", "PUT", "PATCH"}
_RETRY_AFTER = {"schema": {"type": "integer"}, "description": "Seconds until the rate limit resets"}


class AutoSchema(SpectacularAutoSchema):
    """Adds the error responses every FetchML operation can give, unless a view
    already documents that status itself."""

    def _get_response_bodies(self, direction: str = "response") -> dict[str, Any]:
        responses = super()._get_response_bodies(direction)
        if direction != "response":
            return responses
        errors: dict[str, OpenApiResponse] = {}
        if self.method in _BODY_METHODS:
            errors["400"] = error_response("Malformed request body")
            errors["413"] = error_response("Request body too large")
            errors["422"] = error_response("Validation failed")
        if self.view.get_authenticators():
            errors["401"] = error_response("Invalid or missing API key")
            errors["403"] = error_response("Insufficient permissions")
            errors["429"] = error_response("Rate limit exceeded")
        if "{" in self.path:
            errors["404"] = error_response("Resource not found")
        for status, response in sorted(errors.items()):
            if status in responses:
                continue
            responses[status] = self._get_response_for_code(response, status, ["application/json"], direction)
            if status == "429":
                responses[status]["headers"] = {"Retry-After": _RETRY_AFTER}
        return responses


# --- operations served outside DRF -----------------------------------------
# drf-spectacular lists only DRF views (its endpoint enumerator skips any
# callback that is not an APIView), so the plain views (/health, the log and
# SSE streams) and the /ws WebSocket are added to the generated schema here,
# as spec/fetchml-openapi.yaml names them.

_API_KEY = [{"ApiKeyAuth": []}]
_EVENT_STREAM = {"schema": {"type": "string"}}
_ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}


def _error_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR_REF}}}


def _stream_errors(*, not_found: str | None = None) -> dict[str, Any]:
    """What every authenticated plain view answers on failure (fetchml.sse.authenticate_stream)."""
    errors = {
        "401": _error_response("Invalid or missing API key"),
        "403": _error_response("Worker keys may not use this endpoint"),
        "429": {**_error_response("Rate limit exceeded"), "headers": {"Retry-After": _RETRY_AFTER}},
    }
    if not_found:
        errors["404"] = _error_response(not_found)
    return errors


def _uuid_path_parameter(name: str, description: str) -> dict[str, Any]:
    return {
        "in": "path",
        "name": name,
        "required": True,
        "schema": {"type": "string", "format": "uuid"},
        "description": description,
    }


_ENUM = {"type": "string"}
_CHECK = {**_ENUM, "enum": ["ok", "unreachable"]}
_TIMESTAMP = {"type": "string", "format": "date-time"}

PLAIN_VIEW_COMPONENTS: dict[str, dict[str, Any]] = {
    # The contract's HealthResponse for GET /health (the served HealthResponse is the plugins' one).
    "ServerHealth": {
        "type": "object",
        "properties": {
            "status": {**_ENUM, "enum": ["healthy", "degraded"]},
            "version": {"type": "string"},
            "timestamp": _TIMESTAMP,
            "checks": {
                "type": "object",
                "properties": {"database": _CHECK, "channel_layer": _CHECK},
                "required": ["database", "channel_layer"],
            },
        },
        "required": ["status", "version", "timestamp", "checks"],
    },
    "TaskLogLine": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "description": "Increasing line id: page on and resume with it"},
            "stream": {**_ENUM, "enum": ["stdout", "stderr"]},
            "line": {"type": "string"},
            "attempt": {"type": "integer"},
            "node": {"type": "integer", "description": "Node of a multi-node task (0 for a single node)"},
            "seq": {"type": "integer", "description": "The line's place in its node's output"},
            "created_at": _TIMESTAMP,
        },
        "required": ["id", "stream", "line", "attempt", "node", "seq", "created_at"],
    },
    "TaskLogPage": {
        "type": "object",
        "properties": {
            "task_id": {"type": "string", "format": "uuid"},
            "status": {"$ref": "#/components/schemas/TaskStatusEnum"},
            "lines": {"type": "array", "items": {"$ref": "#/components/schemas/TaskLogLine"}},
            "has_more": {"type": "boolean", "description": "More lines follow: ask again with after_id"},
            "next_after_id": {
                "type": "integer",
                "nullable": True,
                "description": "The after_id of the next page (the last line's id)",
            },
        },
        "required": ["task_id", "status", "lines", "has_more", "next_after_id"],
    },
}


def _task_logs_operation() -> dict[str, Any]:
    from tasks.logs import MAX_TAIL

    return {
        "operationId": "tasks_logs_retrieve",
        "summary": "Get task logs",
        "description": (
            "The task's stored log lines in id order, or with `follow=true` the same lines followed live "
            "as Server-Sent Events:\n\n"
            "- `event: status` (data `{task_id, status, priority, timestamp}`) first and on every change;\n"
            "- `event: log` (`id:` the line id, data one TaskLogLine) for the stored lines, then each new one;\n"
            "- `event: end` (data `{task_id, status}`) once the task has ended and every line was sent; "
            "then the stream closes.\n\n"
            "`: heartbeat` comments keep a followed stream open. Owner or admin; anyone else gets 404."
        ),
        "tags": ["tasks"],
        "security": _API_KEY,
        "parameters": [
            _uuid_path_parameter("taskId", "The task"),
            {
                "in": "query",
                "name": "tail",
                "schema": {"type": "integer", "minimum": 1, "maximum": MAX_TAIL},
                "description": "Only the last N lines (not with after_id)",
            },
            {
                "in": "query",
                "name": "after_id",
                "schema": {"type": "integer", "minimum": 0},
                "description": "Only lines with a larger id (page on with next_after_id; not with tail)",
            },
            {
                "in": "query",
                "name": "follow",
                "schema": {"type": "boolean", "default": False},
                "description": "true: answer a text/event-stream that follows the task until it ends",
            },
            {
                "in": "header",
                "name": "Last-Event-ID",
                "schema": {"type": "string", "pattern": "^[0-9]+$"},
                "description": "With follow=true: resume after this line id (what a reconnecting EventSource "
                "sends); replaces after_id and tail",
            },
        ],
        "responses": {
            "200": {
                "description": f"Without follow: at most {MAX_TAIL} lines as JSON. With follow=true: an SSE stream.",
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/TaskLogPage"}},
                    "text/event-stream": _EVENT_STREAM,
                },
            },
            "400": _error_response("Invalid query parameter (`details` names it)"),
            **_stream_errors(not_found="No such task visible to the caller"),
        },
    }


def _plain_view_operations() -> dict[str, dict[str, Any]]:
    sse = {"description": "SSE stream", "content": {"text/event-stream": _EVENT_STREAM}}
    return {
        "/health": {
            "get": {
                "operationId": "health_retrieve",
                "summary": "Health check",
                "description": "Returns server health status. No authentication required. "
                "`degraded` (503) when the database or the channel layer does not answer.",
                "security": [],
                "responses": {
                    "200": {
                        "description": "Server is healthy",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ServerHealth"}}},
                    },
                    "503": {
                        "description": "Server is degraded",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ServerHealth"}}},
                    },
                },
            }
        },
        "/v1/tasks/{taskId}/logs": {"get": _task_logs_operation()},
        "/v1/scheduler/status/stream": {
            "get": {
                "operationId": "scheduler_status_stream",
                "summary": "SSE stream of scheduler state changes",
                "description": (
                    "Emits events on queue depth changes, worker connect/disconnect, job transitions: "
                    "`event: status`, data a SchedulerStatus plus `event` (what caused it: `connected`, "
                    "`task_update`, `worker_connected`, ...), first on connect and then on every change. "
                    "`: heartbeat` comments keep it open; it never ends on its own."
                ),
                "tags": ["Scheduler"],
                "security": _API_KEY,
                "responses": {"200": sse, **_stream_errors()},
            }
        },
        "/v1/scheduler/jobs/{jobId}/stream": {
            "get": {
                "operationId": "scheduler_jobs_stream",
                "summary": "SSE stream of job progress",
                "description": (
                    "Emits events on job state transitions and priority changes: `event: status` (data "
                    "`{task_id, status, priority, timestamp}`) first and on each state change, `event: priority` "
                    "(the same plus `priority_from`) on each priority change, and `event: end` (data "
                    "`{task_id, status}`) once the job is final; then the stream closes. Owner or admin."
                ),
                "tags": ["Scheduler"],
                "security": _API_KEY,
                "parameters": [_uuid_path_parameter("jobId", "The job (task) id")],
                "responses": {"200": sse, **_stream_errors(not_found="No such job visible to the caller")},
            }
        },
        "/ws": {
            "get": {
                "operationId": "ws_connect",
                "summary": "WebSocket connection",
                "description": (
                    "WebSocket endpoint for real-time task updates (docs/live-updates.md). The key goes in the "
                    "X-API-Key header of the handshake, never the query string; a refused connection is closed "
                    "with 4401 (no valid key), 4403 (worker key), 4429 (rate limited) or 4503 (the database "
                    "out of reach: try again shortly); another path than /ws or /ws/worker with 4404.\n\n"
                    "## Message Types\n"
                    "- `task_update`: Task status changes\n"
                    "- `task_complete`: Task finished\n"
                    "- `task_log`: new log lines of a subscribed task\n"
                    "- `ping`: Keep-alive from the client, answered with `pong`\n"
                    "- `subscribe` / `unsubscribe` `{task_id}`: answered `subscribed` / `unsubscribed`\n"
                    "- `error`: `{error, code, task_id}`; never closes the connection\n"
                ),
                "security": _API_KEY,
                "responses": {"101": {"description": "WebSocket connection established"}},
            }
        },
    }


def add_plain_view_operations(result: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """drf-spectacular postprocessing hook (SPECTACULAR_SETTINGS["POSTPROCESSING_HOOKS"])."""
    from tasks.states import TaskStatus

    paths = result["paths"]
    for path, operations in _plain_view_operations().items():
        paths.setdefault(path, {}).update(operations)
    result["paths"] = dict(sorted(paths.items()))
    schemas = {**result.setdefault("components", {}).get("schemas", {}), **PLAIN_VIEW_COMPONENTS}
    # Generated from the DRF views, unless a test URLconf leaves them all out.
    schemas.setdefault("TaskStatusEnum", {"type": "string", "enum": [status.value for status in TaskStatus]})
    result["components"]["schemas"] = dict(sorted(schemas.items()))
    return result
