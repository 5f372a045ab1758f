"""Jupyter service endpoints: list, start, get, stop. Thin: parse, call one service or selector, render."""

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from fetchml.auth import actor_from_request
from fetchml.errors import NotFound
from fetchml.jsonbody import validated_body
from fetchml.permissions import IsHumanUser
from fetchml.query import KnownQueryParameters
from fetchml.schema import error_response
from jupyter import selectors, services
from jupyter.api.serializers import JupyterServiceSerializer, StartJupyterSerializer, service_data

TAGS = ["Jupyter"]
SERVICE_ID = OpenApiParameter("serviceId", OpenApiTypes.UUID, OpenApiParameter.PATH)
NOT_FOUND = error_response("No such service visible to the caller")


class JupyterServiceListView(KnownQueryParameters, APIView):
    permission_classes = [IsHumanUser]

    @extend_schema(
        summary="List Jupyter services",
        description="Your services; admins see every service (the token only ever to its owner).",
        tags=TAGS,
        responses={200: JupyterServiceSerializer(many=True)},
    )
    def get(self, request: Request) -> Response:
        actor = actor_from_request(request)
        return Response([service_data(service, actor) for service in selectors.visible_services(actor)])

    @extend_schema(
        summary="Start Jupyter service",
        description="Queues a service task; the service is `running` (with url and token) once it answers.",
        tags=TAGS,
        request=StartJupyterSerializer,
        responses={201: JupyterServiceSerializer, 422: error_response("Validation failed; `details` names each field")},
    )
    def post(self, request: Request) -> Response:
        fields = validated_body(StartJupyterSerializer, request)
        actor = actor_from_request(request)
        service = services.jupyter_start(actor=actor, **fields)
        return Response(service_data(service, actor), status=status.HTTP_201_CREATED)


class JupyterServiceDetailView(KnownQueryParameters, APIView):
    permission_classes = [IsHumanUser]

    def _visible(self, request: Request, service_id: str):
        actor = actor_from_request(request)
        service = selectors.visible_services(actor).filter(id=service_id).first()
        if service is None:
            raise NotFound("No such Jupyter service")
        return actor, service

    @extend_schema(
        summary="Get Jupyter service",
        description="One service: its status, and its url and token (the token only to its owner) once running.",
        tags=TAGS,
        parameters=[SERVICE_ID],
        responses={200: JupyterServiceSerializer, 404: NOT_FOUND},
    )
    def get(self, request: Request, serviceId: str) -> Response:
        actor, service = self._visible(request, serviceId)
        return Response(service_data(service, actor))

    @extend_schema(
        summary="Stop Jupyter service",
        description="Cancels the service's task; the worker stops Jupyter and frees its slot.",
        tags=TAGS,
        parameters=[SERVICE_ID],
        responses={204: OpenApiResponse(description="Service stopped"), 404: NOT_FOUND},
    )
    def delete(self, request: Request, serviceId: str) -> Response:
        actor, service = self._visible(request, serviceId)
        services.jupyter_stop(service=service, actor=actor)
        return Response(status=status.HTTP_204_NO_CONTENT)
