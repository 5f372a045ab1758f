"""Strict JSON input fields: a number is not a string, a string is not a boolean,
and every container has a bounded size checked before its items are parsed."""

import json
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from django.core.exceptions import ValidationError
from django.core.validators import RegexValidator
from django.utils.dateparse import parse_datetime
from rest_framework import serializers

from fetchml.conf import app_settings


class WholeValueRegexValidator(RegexValidator):
    """A pattern the whole value must match. RegexValidator searches, and `$` also matches before a
    final newline, so `^[a-z]+$` would let "name\\n" through. The pattern stays as the schema shows it."""

    def __call__(self, value: Any) -> None:
        if not self.regex.fullmatch(str(value)):
            raise ValidationError(self.message, code=self.code, params={"value": value})


class StrictCharField(serializers.CharField):
    """Only strings, kept as sent (no whitespace trimming of user data)."""

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("trim_whitespace", False)
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictIntegerField(serializers.IntegerField):
    def to_internal_value(self, data: Any) -> int:
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictBooleanField(serializers.BooleanField):
    def to_internal_value(self, data: Any) -> bool:
        if not isinstance(data, bool):
            self.fail("invalid")
        return data


def setting_limit(name: str) -> Callable[[], int]:
    """A limit read when validating, so `override_settings` applies."""
    return lambda: getattr(app_settings, name)


class BoundedListField(serializers.ListField):
    """A list whose length limit is checked before any item is validated."""

    def __init__(self, *, max_items: Callable[[], int], **kwargs: Any):
        self.max_items = max_items
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> list:
        if isinstance(data, list) and len(data) > (limit := self.max_items()):
            raise serializers.ValidationError(f"Ensure this list has no more than {limit} items.")
        return super().to_internal_value(data)


class BoundedDictField(serializers.DictField):
    """An object with a bounded number of entries and validated keys."""

    def __init__(
        self,
        *,
        max_entries: Callable[[], int],
        key_max_length: int = 128,
        key_regex: str | None = None,
        **kwargs: Any,
    ):
        self.max_entries = max_entries
        validators = [WholeValueRegexValidator(key_regex, message="Invalid format.")] if key_regex else []
        self.key_field = StrictCharField(max_length=key_max_length, validators=validators)
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> dict:
        if not isinstance(data, Mapping):
            self.fail("not_a_dict", input_type=type(data).__name__)
        if len(data) > (limit := self.max_entries()):
            raise serializers.ValidationError(f"Ensure this object has no more than {limit} entries.")
        for key in data:
            try:
                self.key_field.run_validation(key)
            except serializers.ValidationError as exc:
                raise serializers.ValidationError(f"Invalid key {str(key)[:64]!r}: {exc.detail[0]}")
        return super().to_internal_value(data)


class JsonObjectField(serializers.JSONField):
    """A free-form JSON object whose encoded size is bounded."""

    def __init__(self, *, max_bytes: int, **kwargs: Any):
        self.max_bytes = max_bytes
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> dict:
        if not isinstance(data, Mapping):
            raise serializers.ValidationError("Expected an object.")
        if len(json.dumps(data, separators=(",", ":"))) > self.max_bytes:
            raise serializers.ValidationError(f"Ensure this object encodes to at most {self.max_bytes} bytes.")
        return dict(data)


class StrictSerializer(serializers.Serializer):
    """Refuses fields it does not declare, naming them, instead of ignoring typos."""

    max_reported_unknown = 20

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, Mapping):
            unknown = sorted(str(name) for name in set(data) - set(self.fields))
            if unknown:
                raise serializers.ValidationError(
                    {name[:64]: ["Unknown field."] for name in unknown[: self.max_reported_unknown]}
                )
        return super().to_internal_value(data)


class ZonedDateTimeField(serializers.DateTimeField):
    """An ISO 8601 time that names its zone (`Z` or an offset): a time without one would be taken as
    the server's zone, hours off the client's meaning."""

    default_error_messages = {"naive": "Must carry a time zone (e.g. `Z`)."}

    def to_internal_value(self, value: Any) -> datetime:
        result = super().to_internal_value(value)  # refuses non-strings and other formats
        if isinstance(value, str) and parse_datetime(value).tzinfo is None:
            self.fail("naive")
        return result
