"""Query parameters of the API's reads, validated by a serializer: a bad one is a 400 naming it
(the request line is wrong, not a body), in the standard error format. So is one the read does not
know: a mistyped or unsupported filter (`?stauts=failed`, `?order_by=...`) would otherwise be
ignored, and the answer read as if it had applied."""

from collections.abc import Iterable
from typing import Any

from django.http import QueryDict
from rest_framework import serializers
from rest_framework.request import Request

from fetchml.errors import ApplicationError

# Taken by every read besides its own parameters: DRF's `format` (the browsable API's ?format=json).
ALWAYS_ALLOWED = frozenset({"format"})
UNKNOWN = "Unknown query parameter."
REPEATED = "Given more than once; this parameter takes one value."
# Unknown names reported at most: a request line can hold thousands.
MAX_REPORTED_UNKNOWN = 10


def unknown_parameters(names: Iterable[str], known: Iterable[str]) -> list[str]:
    """The names not in `known` (nor ALWAYS_ALLOWED), in order, cut to MAX_REPORTED_UNKNOWN."""
    allowed = {*known, *ALWAYS_ALLOWED}
    return [name[:64] for name in dict.fromkeys(names) if name not in allowed][:MAX_REPORTED_UNKNOWN]


def refused(errors: dict[str, list]) -> ApplicationError:
    """The 400 naming each bad query parameter: {name: [what is wrong with it]}."""
    details = [{"field": field, "message": str(message)} for field, messages in errors.items() for message in messages]
    return ApplicationError("Invalid query parameters: " + ", ".join(errors), details=details)


def refuse_unknown_or_repeated(params: QueryDict, known: Iterable[str] = ()) -> None:
    """A 400 naming the parameters of `params` not in `known`, and those given more than once
    (each takes one value): for reads that take few or none."""
    errors = {name: [REPEATED] for name in repeated_parameters(params, [*known, *ALWAYS_ALLOWED])}
    errors |= {name: [UNKNOWN] for name in unknown_parameters(params, known)}
    if errors:
        raise refused(errors)


def repeated_parameters(params: QueryDict, names: Iterable[str]) -> list[str]:
    """Those of `names` given more than once (`?status=failed&status=running`): the read would
    otherwise keep only the last."""
    return [name for name in names if len(params.getlist(name)) > 1]


def validated_query(serializer_class: type[serializers.Serializer], request: Request) -> dict[str, Any]:
    serializer = serializer_class(data=request.query_params)
    valid = serializer.is_valid()
    errors = {} if valid else dict(serializer.errors)
    single = [name for name, field in serializer.fields.items() if not isinstance(field, serializers.ListField)]
    errors |= {name: [REPEATED] for name in repeated_parameters(request.query_params, single)}
    errors |= {name: [UNKNOWN] for name in unknown_parameters(request.query_params, serializer.fields)}
    if errors:
        raise refused(errors)
    return serializer.validated_data


class KnownQueryParameters:
    """For an API view whose methods take no query parameters but `format`: any other is a 400
    naming it, after authentication. The methods in `methods_checking_their_own` (a list's read,
    with `validated_query`) are left to do so."""

    methods_checking_their_own: tuple[str, ...] = ()

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super().initial(request, *args, **kwargs)  # type: ignore[misc]
        if request.method not in self.methods_checking_their_own:
            refuse_unknown_or_repeated(request.query_params)
