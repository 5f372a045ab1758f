"""`offset`, the paging query parameter every list endpoint shares (their `limit`s differ in default)."""

from rest_framework import serializers

# Far past any page that has rows; a larger number would not fit the databases' integers
# (the query would fail with a server error instead of answering an empty page).
MAX_OFFSET = 2**31 - 1


def offset_field() -> serializers.IntegerField:
    """`offset`: rows skipped before the page, 0 to MAX_OFFSET."""
    return serializers.IntegerField(min_value=0, max_value=MAX_OFFSET, default=0)
