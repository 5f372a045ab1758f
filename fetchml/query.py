"""Query parameters of the API's reads, validated by a serializer: a bad one is a 400 naming it
(the request line is wrong, not a body), in the standard error format. So is one the read does not
know: a mistyped or unsupported filter (`?stauts=failed`, `?order_by=...`) would otherwise be
ignored, and the answer read as if it had applied."""

from collections.abc import Iterable
from typing import Any

from rest_framework import serializers
from rest_framework.request import Request

from fetchml.errors import ApplicationError

# Taken by every read besides its own parameters: DRF's `format` (the browsable API's ?format=json).
ALWAYS_ALLOWED = frozenset({"format"})
UNKNOWN = "Unknown query parameter."
# Unknown names reported at most: a request line can hold thousands.
MAX_REPORTED_UNKNOWN = 10


def unknown_parameters(names: Iterable[str], known: Iterable[str]) -> list[str]:
    """The names not in `known` (nor ALWAYS_ALLOWED), in order, cut to MAX_REPORTED_UNKNOWN."""
    allowed = {*known, *ALWAYS_ALLOWED}
    return [name[:64] for name in dict.fromkeys(names) if name not in allowed][:MAX_REPORTED_UNKNOWN]


def validated_query(serializer_class: type[serializers.Serializer], request: Request) -> dict[str, Any]:
    serializer = serializer_class(data=request.query_params)
    valid = serializer.is_valid()
    errors = {} if valid else dict(serializer.errors)
    errors |= {name: [UNKNOWN] for name in unknown_parameters(request.query_params, serializer.fields)}
    if errors:
        details = [
            {"field": field, "message": str(message)} for field, messages in errors.items() for message in messages
        ]
        raise ApplicationError("Invalid query parameters: " + ", ".join(errors), details=details)
    return serializer.validated_data
