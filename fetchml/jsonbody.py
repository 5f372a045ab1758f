"""JSON in and out of FetchML: untrusted text parsed with bounded nesting, responses rendered as DRF renders.

A deeply nested document makes the json module, and then every validator and
encoder that walks the result, recurse once per level until Python gives up
(RecursionError, a 500). Nesting is therefore measured on the raw text, before
anything recurses, and a document deeper than FETCHML_MAX_JSON_DEPTH is refused
as malformed. `loads` is the one entry for any JSON text from outside (HTTP
bodies through `JSONParser`; WebSocket frames may use it too).
"""

import json
import re
from itertools import accumulate
from typing import Any

from django.conf import settings
from django.http import JsonResponse
from rest_framework import parsers, renderers, serializers
from rest_framework.exceptions import ParseError
from rest_framework.request import Request
from rest_framework.utils.json import strict_constant

from fetchml.conf import app_settings

# Everything but brackets, once strings are gone.
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}
# DRF's JSONRenderer with its defaults (UNICODE_JSON, COMPACT_JSON, STRICT_JSON).
COMPACT_DUMPS_PARAMS = {"separators": (",", ":"), "ensure_ascii": False, "allow_nan": False}


class JSONTooDeep(ValueError):
    def __init__(self, limit: int):
        super().__init__(f"JSON nested deeper than {limit} levels")
        self.limit = limit


def nesting_depth(text: str) -> int:
    """The deepest array/object nesting of a JSON text, without recursing.

    Escapes are dropped first (an escaped backslash, then an escaped quote), so
    every quote left delimits a string; brackets inside strings do not count.
    For malformed text the answer is at least the depth a parser reaches before
    it stops, which is all a bound needs.
    """
    unescaped = text.replace("\\\\", "").replace('\\"', "")
    outside_strings = "".join(unescaped.split('"')[::2])
    brackets = _NOT_BRACKETS.sub("", outside_strings)
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0)


class DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(f"the object names {key[:64]!r} more than once")


def _object_of_unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object whose names are each given once: with two, parsers disagree on which counts
    (Python's json keeps the last), and a check and the code after it could each read another."""
    built: dict[str, Any] = {}
    for key, value in pairs:
        if key in built:
            raise DuplicateKey(key)
        built[key] = value
    return built


def loads(text: str | bytes, *, max_depth: int | None = None, unique_keys: bool = False) -> Any:
    """json.loads for untrusted text: NaN and Infinity refused, nesting bounded, and with
    `unique_keys` an object naming a key twice refused.

    Raises ValueError (json.JSONDecodeError, JSONTooDeep, DuplicateKey, UnicodeDecodeError).
    """
    if isinstance(text, bytes | bytearray):
        text = text.decode(json.detect_encoding(text))
    limit = app_settings.MAX_JSON_DEPTH if max_depth is None else max_depth
    # Counting brackets is far cheaper than the scan, and fewer than the limit cannot nest deeper.
    if text.count("[") + text.count("{") > limit and nesting_depth(text) > limit:
        raise JSONTooDeep(limit)
    hook = _object_of_unique_keys if unique_keys else None
    return json.loads(text, parse_constant=strict_constant, object_pairs_hook=hook)


class JSONParser(parsers.JSONParser):
    """DRF's JSON parser through `loads`: the parser of every JSON request body (whose objects
    must name each key once)."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: dict | None = None) -> Any:
        encoding = (parser_context or {}).get("encoding", settings.DEFAULT_CHARSET)
        try:
            return loads(stream.read().decode(encoding), unique_keys=True)
        except ValueError as exc:
            raise ParseError(f"JSON parse error - {exc}") from None


def validated_body(serializer_class: type[serializers.Serializer], request: Request) -> dict[str, Any]:
    """The request body's fields, validated; a bad one raises DRF's ValidationError (a 422 with `details`).

    Every operation with a body requires one: none at all (DRF reads it as `{}`) is a 400."""
    if request.stream is None:
        raise ParseError("the body is empty; this operation takes a JSON object")
    serializer = serializer_class(data=request.data)
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data


class JSONRenderer(renderers.JSONRenderer):
    """DRF's JSON renderer, but a lone surrogate (one a client sent as a field's name, echoed
    in its 422) is written as an escape: UTF-8 cannot encode it, and the answer would be a 500."""

    def render(self, data: Any, accepted_media_type: str | None = None, renderer_context: dict | None = None) -> bytes:
        try:
            return super().render(data, accepted_media_type, renderer_context)
        except UnicodeEncodeError:
            return json.dumps(data, cls=self.encoder_class, **{**COMPACT_DUMPS_PARAMS, "ensure_ascii": True}).encode()


class CompactJsonResponse(JsonResponse):
    """A plain Django JSON response rendered byte for byte as DRF renders API responses."""

    def __init__(self, data: Any, **kwargs: Any):
        kwargs.setdefault("json_dumps_params", COMPACT_DUMPS_PARAMS)
        super().__init__(data, **kwargs)
