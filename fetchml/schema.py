"""OpenAPI (drf-spectacular) extensions: the X-API-Key scheme and the error responses.

Imported from `FetchmlConfig.ready()` so the extension is registered before the
first schema is generated.
"""

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension
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


class ErrorDetailSerializer(serializers.Serializer):
    field = serializers.CharField(allow_null=True, help_text="The bad field (dotted path), or null for the whole body")
    message = serializers.CharField()


class ErrorResponseSerializer(serializers.Serializer):
    """Only used to document the error body rendered by `fetchml.errors`."""

    error = serializers.CharField(help_text="Sanitized error message")
    code = serializers.ChoiceField(choices=ERROR_CODES)
    trace_id = serializers.CharField(help_text="Support correlation ID, also sent as X-Request-ID")
    details = ErrorDetailSerializer(many=True, required=False, help_text="One entry per invalid field (422 only)")


def _error(description: str) -> OpenApiResponse:
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
            errors["400"] = _error("Malformed request body")
            errors["413"] = _error("Request body too large")
            errors["422"] = _error("Validation failed")
        if self.view.get_authenticators():
            errors["401"] = _error("Invalid or missing API key")
            errors["403"] = _error("Insufficient permissions")
            errors["429"] = _error("Rate limit exceeded")
        if "{" in self.path:
            errors["404"] = _error("Resource not found")
        for status, response in sorted(errors.items()):
            if status in responses:
                continue
            responses[status] = self._get_response_for_code(response, status, ["application/json"], direction)
            if status == "429":
                responses[status]["headers"] = {"Retry-After": _RETRY_AFTER}
        return responses
