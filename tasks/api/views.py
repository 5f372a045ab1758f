"""Tasks, queue and experiments endpoints: parse, call one service or selector, render."""

import hashlib
import json
import uuid
from typing import Any

from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from fetchml.auth import actor_from_request
from fetchml.errors import ApplicationError
from fetchml.jsonbody import validated_body
from fetchml.models import ApiKey
from fetchml.permissions import IsHumanUser
from fetchml.query import KnownQueryParameters, validated_query
from fetchml.schema import error_response
from tasks import experiments, selectors, services
from tasks.api.serializers import (
    CreateExperimentSerializer,
    CreateTaskSerializer,
    ExperimentListQuerySerializer,
    ExperimentSerializer,
    QueueStatsSerializer,
    TaskDetailSerializer,
    TaskListQuerySerializer,
    TaskListSerializer,
    TaskSerializer,
)

IDEMPOTENCY_HEADER = "Idempotency-Key"
IDEMPOTENCY_KEY_MAX_LENGTH = 255


BAD_REQUEST = error_response("Invalid request (bad query parameter or header, malformed JSON)")
UNAUTHORIZED = error_response("Invalid or missing API key")
FORBIDDEN = error_response("Worker keys may not use this endpoint")
NOT_FOUND = error_response("No such task visible to the caller")
CONFLICT = error_response("The task has already finished")
NAME_CONFLICT = error_response("The owner already has an experiment with this name; `details` names `name`")
VALIDATION = error_response("Validation failed; `details` names each field")
RATE_LIMITED = error_response("Too many requests (see Retry-After)")


def _idempotency_key(request: Request) -> str | None:
    raw = request.headers.get(IDEMPOTENCY_HEADER)
    if raw is None:
        return None
    problem = None
    if not raw or len(raw) > IDEMPOTENCY_KEY_MAX_LENGTH:
        problem = f"Must be 1 to {IDEMPOTENCY_KEY_MAX_LENGTH} characters."
    elif not (raw.isascii() and raw.isprintable()):
        problem = "Must be printable ASCII."
    elif not isinstance(request.auth, ApiKey):
        problem = "Only honoured for requests authenticated with an API key."
    if problem:
        raise ApplicationError(
            f"Invalid {IDEMPOTENCY_HEADER} header", details=[{"field": IDEMPOTENCY_HEADER, "message": problem}]
        )
    return raw


def _body_sha256(data: Any) -> str:
    """Identity of a parsed JSON body: key order and whitespace do not matter."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class TaskListCreateView(KnownQueryParameters, APIView):
    methods_checking_their_own = ("GET", "HEAD")
    permission_classes = [IsHumanUser]

    @extend_schema(
        operation_id="tasks_list",
        summary="List tasks",
        description=(
            "Tasks visible to the caller, newest first: their own, or everyone's for an admin key. "
            "`user_id` filters by the owner's username, `job_name` by the whole job name."
        ),
        parameters=[TaskListQuerySerializer],
        responses={
            200: TaskListSerializer,
            400: BAD_REQUEST,
            401: UNAUTHORIZED,
            403: FORBIDDEN,
            429: RATE_LIMITED,
        },
    )
    def get(self, request: Request) -> Response:
        filters = validated_query(TaskListQuerySerializer, request)
        page = selectors.task_list(actor=actor_from_request(request), filters=filters)
        return Response(TaskListSerializer(page).data)

    @extend_schema(
        summary="Create task",
        description=(
            "Queue a task. With an `Idempotency-Key` header (scoped to the API key, remembered for "
            "FETCHML_IDEMPOTENCY_TTL_HOURS) a retry with the same body answers 201 with the task "
            "created first and `Idempotent-Replayed: true`; the same key with another body is a 422."
        ),
        parameters=[
            OpenApiParameter(
                IDEMPOTENCY_HEADER,
                str,
                OpenApiParameter.HEADER,
                description=f"Client-chosen key (at most {IDEMPOTENCY_KEY_MAX_LENGTH} characters)",
            )
        ],
        request=CreateTaskSerializer,
        responses={
            201: TaskSerializer,
            400: BAD_REQUEST,
            401: UNAUTHORIZED,
            403: FORBIDDEN,
            422: VALIDATION,
            429: RATE_LIMITED,
        },
    )
    def post(self, request: Request) -> Response:
        fields = validated_body(CreateTaskSerializer, request)
        idempotency_key = _idempotency_key(request)
        actor = actor_from_request(request)
        headers = {}
        if idempotency_key is None:
            task = services.task_submit(owner=request.user, actor=actor, **fields)
        else:
            task, replayed = services.task_submit_idempotent(
                owner=request.user,
                actor=actor,
                api_key=request.auth,
                idempotency_key=idempotency_key,
                body_sha256=_body_sha256(request.data),
                fields=fields,
            )
            if replayed:
                headers["Idempotent-Replayed"] = "true"
        return Response(TaskSerializer(task).data, status=status.HTTP_201_CREATED, headers=headers)


class TaskDetailView(KnownQueryParameters, APIView):
    permission_classes = [IsHumanUser]

    @extend_schema(
        summary="Get task details",
        description="A queued task also says where it is in the queue and why it has not started yet.",
        responses={200: TaskDetailSerializer, 401: UNAUTHORIZED, 403: FORBIDDEN, 404: NOT_FOUND, 429: RATE_LIMITED},
    )
    # `taskId` is the spec's path parameter name (the URL converter passes it as a keyword).
    def get(self, request: Request, taskId: uuid.UUID) -> Response:
        task = selectors.task_get_for_actor(actor=actor_from_request(request), task_id=taskId)
        return Response(TaskDetailSerializer(task).data)

    @extend_schema(
        summary="Cancel task",
        description=(
            "A queued task is cancelled at once; a preparing/running/collecting one is asked to stop "
            "(`cancel_requested`) and ends `cancelled` when its worker has stopped it."
        ),
        responses={
            204: OpenApiResponse(description="Task cancelled or cancellation requested"),
            401: UNAUTHORIZED,
            403: FORBIDDEN,
            404: NOT_FOUND,
            409: CONFLICT,
            429: RATE_LIMITED,
        },
    )
    def delete(self, request: Request, taskId: uuid.UUID) -> Response:
        actor = actor_from_request(request)
        task = selectors.task_get_for_actor(actor=actor, task_id=taskId)
        services.task_cancel(task=task, actor=actor)
        return Response(status=status.HTTP_204_NO_CONTENT)


class QueueView(KnownQueryParameters, APIView):
    permission_classes = [IsHumanUser]

    @extend_schema(
        summary="Queue status",
        responses={200: QueueStatsSerializer, 401: UNAUTHORIZED, 403: FORBIDDEN, 429: RATE_LIMITED},
    )
    def get(self, request: Request) -> Response:
        return Response(QueueStatsSerializer(selectors.queue_stats()).data)


class ExperimentListCreateView(KnownQueryParameters, APIView):
    methods_checking_their_own = ("GET", "HEAD")
    permission_classes = [IsHumanUser]

    @extend_schema(
        summary="List experiments",
        description=(
            "The caller's experiments (everyone's for an admin), newest first, as a JSON array. "
            "`status` keeps those in one status (an unknown one is a 400); "
            "`limit` (default and maximum FETCHML_MAX_PAGE_SIZE) and `offset` page it; "
            "`X-Total-Count` carries the total."
        ),
        parameters=[ExperimentListQuerySerializer],
        responses={
            200: ExperimentSerializer(many=True),
            400: BAD_REQUEST,
            401: UNAUTHORIZED,
            403: FORBIDDEN,
            429: RATE_LIMITED,
        },
    )
    def get(self, request: Request) -> Response:
        query = validated_query(ExperimentListQuerySerializer, request)
        page, total = selectors.experiment_list(
            actor=actor_from_request(request),
            status=query.get("status"),
            limit=query.get("limit"),
            offset=query["offset"],
        )
        return Response(ExperimentSerializer(page, many=True).data, headers={"X-Total-Count": str(total)})

    @extend_schema(
        summary="Create experiment",
        description="The name must not be in use by another of the caller's experiments (deleted ones aside).",
        request=CreateExperimentSerializer,
        responses={
            201: ExperimentSerializer,
            400: BAD_REQUEST,
            401: UNAUTHORIZED,
            403: FORBIDDEN,
            409: NAME_CONFLICT,
            422: VALIDATION,
            429: RATE_LIMITED,
        },
    )
    def post(self, request: Request) -> Response:
        fields = validated_body(CreateExperimentSerializer, request)
        experiment = experiments.experiment_create(owner=request.user, **fields)
        return Response(ExperimentSerializer(experiment).data, status=status.HTTP_201_CREATED)
