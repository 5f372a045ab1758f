"""The paging query parameters the list endpoints share: `offset`, and `limit` up to FETCHML_MAX_PAGE_SIZE
(their defaults differ)."""

from typing import Any

from rest_framework import serializers

from fetchml.conf import app_settings

# Far past any page that has rows; a larger number would not fit the databases' integers
# (the query would fail with a server error instead of answering an empty page).
MAX_OFFSET = 2**31 - 1


def offset_field() -> serializers.IntegerField:
    """`offset`: rows skipped before the page, 0 to MAX_OFFSET."""
    return serializers.IntegerField(min_value=0, max_value=MAX_OFFSET, default=0)


class PageLimitField(serializers.IntegerField):
    """`limit`: rows in the page, 1 to FETCHML_MAX_PAGE_SIZE (read at each request, so a changed
    setting applies without a restart)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("help_text", "1..FETCHML_MAX_PAGE_SIZE (1000)")
        super().__init__(min_value=1, **kwargs)

    def to_internal_value(self, data: Any) -> int:
        value = super().to_internal_value(data)
        if value > (ceiling := app_settings.MAX_PAGE_SIZE):
            raise serializers.ValidationError(f"Ensure this value is less than or equal to {ceiling}.")
        return value
