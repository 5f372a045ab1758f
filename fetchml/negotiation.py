"""Content negotiation of the API."""

from typing import Any

from rest_framework.negotiation import DefaultContentNegotiation


class ContentNegotiation(DefaultContentNegotiation):
    """DRF's, but a `?format=` no renderer has is a 400 naming the formats there are (DRF's own
    answer is a bare 404, as if the resource were missing)."""

    def filter_renderers(self, renderers: list[Any], format: str) -> list[Any]:
        matching = [renderer for renderer in renderers if renderer.format == format]
        if not matching:
            # Imported here: DRF imports this class while `fetchml.errors` (which `fetchml.query`
            # needs) is itself still importing rest_framework.views.
            from fetchml.query import refused

            formats = ", ".join(renderer.format for renderer in renderers)
            raise refused({"format": [f"Must be one of: {formats}."]})
        return matching
