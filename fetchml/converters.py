"""URL path converters of the API."""

import uuid

from django.urls import register_converter


class AnyCaseUUIDConverter:
    """An id in a path, as Django's `uuid` converter reads it, but in either case: RFC 4122 has
    UUIDs written in lower case and read in any (a tool may hand a user one in upper case)."""

    regex = "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"

    def to_python(self, value: str) -> uuid.UUID:
        return uuid.UUID(value)

    def to_url(self, value: uuid.UUID | str) -> str:
        return str(value).lower()


def register() -> None:
    register_converter(AnyCaseUUIDConverter, "id")
