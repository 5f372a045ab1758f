"""Query parameters of the API's reads, validated by a serializer: a bad one is a 400 naming it
(the request line is wrong, not a body), in the standard error format."""

from typing import Any

from rest_framework import serializers
from rest_framework.request import Request

from fetchml.errors import ApplicationError


def validated_query(serializer_class: type[serializers.Serializer], request: Request) -> dict[str, Any]:
    serializer = serializer_class(data=request.query_params)
    if not serializer.is_valid():
        details = [
            {"field": field, "message": str(message)}
            for field, messages in serializer.errors.items()
            for message in messages
        ]
        raise ApplicationError("Invalid query parameters: " + ", ".join(serializer.errors), details=details)
    return serializer.validated_data
