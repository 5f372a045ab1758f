"""GET /v1/: the API's index, the address the server's banner and the README give as "API".

Public like /health and /v1/schema (no key, not counted against a rate limit: it holds nothing
but the product's version and where to go next). Links are paths on this server, reversed from
the URL names, so they follow the routes.
"""

from django.urls import reverse
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

import fetchml
from fetchml.query import KnownQueryParameters

PRODUCT = "FetchML"
# Name in the answer: URL name.
LINKS = {
    "docs": "docs",
    "schema": "schema",
    "health": "health",
    "tasks": "task-list",
    "queue": "queue",
    "experiments": "experiment-list",
    "datasets": "dataset-list",
    "scheduler_status": "scheduler-status",
    "workers": "scheduler-workers",
    "reservations": "scheduler-reservations",
    "jupyter_services": "jupyter-services",
    "plugins": "plugin-list",
    "audit_events": "audit-events",
}

_INDEX = inline_serializer(
    name="ApiIndex",
    fields={
        "name": serializers.CharField(help_text=f"The product: {PRODUCT}"),
        "version": serializers.CharField(help_text="The server's version"),
        "links": inline_serializer(
            name="ApiIndexLinks",
            fields={name: serializers.CharField() for name in LINKS},
            help_text="Paths on this server: the API docs (Swagger UI), the OpenAPI schema, health, "
            "and the main collections (which need an X-API-Key)",
        ),
    },
)


class ApiIndexView(KnownQueryParameters, APIView):
    authentication_classes: list = []
    permission_classes: list = []

    @extend_schema(
        operation_id="api_index",
        tags=["api"],
        summary="API index",
        description="The product, its version and links to the docs, the schema, health and the main "
        "collections. No authentication required.",
        responses={200: _INDEX},
    )
    def get(self, request: Request) -> Response:
        links = {name: reverse(url_name) for name, url_name in LINKS.items()}
        return Response({"name": PRODUCT, "version": fetchml.__version__, "links": links})
