"""A test-only URLconf: small views that exercise the plumbing before the real API exists."""

import psycopg
from django.db import InternalError, OperationalError
from django.http import HttpRequest, HttpResponse
from django.urls import include, path
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from fetchml.permissions import IsAdmin


class ItemSerializer(serializers.Serializer):
    size = serializers.IntegerField(min_value=1)


class EchoSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=8)
    items = ItemSerializer(many=True, required=False)


class EchoView(APIView):
    """GET answers, POST validates and echoes, DELETE answers 204; PUT is not allowed."""

    @extend_schema(responses={200: dict})
    def get(self, request: Request) -> Response:
        return Response({"user": request.user.get_username()})

    @extend_schema(request=EchoSerializer, responses={201: EchoSerializer})
    def post(self, request: Request) -> Response:
        serializer = EchoSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        return Response(serializer.validated_data, status=201)

    @extend_schema(responses={204: None})
    def delete(self, request: Request) -> Response:
        return Response(status=204)


class AdminOnlyView(APIView):
    permission_classes = [IsAdmin]

    @extend_schema(responses={200: dict})
    def get(self, request: Request) -> Response:
        return Response({"ok": True})


SECRET_MESSAGE = "db password is hunter2"


class BoomView(APIView):
    @extend_schema(responses={200: dict})
    def get(self, request: Request) -> Response:
        raise RuntimeError(SECRET_MESSAGE)


class DatabaseDownView(APIView):
    @extend_schema(responses={200: dict})
    def get(self, request: Request) -> Response:
        raise OperationalError(f"connection to server at 10.0.0.5 failed: {SECRET_MESSAGE}")


class SessionEndedView(APIView):
    @extend_schema(responses={200: dict})
    def get(self, request: Request) -> Response:
        ended = psycopg.errors.IdleInTransactionSessionTimeout(
            "terminating connection due to idle-in-transaction timeout"
        )
        raise InternalError(str(ended)) from ended


def plain_boom(request: HttpRequest) -> HttpResponse:
    raise RuntimeError(SECRET_MESSAGE)


urlpatterns = [
    path("v1/test/echo", EchoView.as_view()),
    path("v1/test/admin-only", AdminOnlyView.as_view()),
    path("v1/test/boom", BoomView.as_view()),
    path("v1/test/database-down", DatabaseDownView.as_view()),
    path("v1/test/session-ended", SessionEndedView.as_view()),
    path("test/plain-boom", plain_boom),
    path("", include("fetchml.urls")),
]

handler400 = "fetchml.middleware.bad_request"
handler403 = "fetchml.middleware.permission_denied"
handler404 = "fetchml.middleware.page_not_found"
handler500 = "fetchml.middleware.server_error"
