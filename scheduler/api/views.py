"""Scheduler endpoints: fleet status, workers (drain), reservations, job priority. Parse, call, render.

Visibility: every human user may read the status and the workers (capacity
and task ids only: the ids of other users' tasks reveal nothing they could
open, GET /v1/tasks/{id} answers 404 to them); worker keys get 403. Draining
a worker is for admins. Reservations and jobs: their owner, or an admin;
anyone else gets 404.
"""

import uuid

from drf_spectacular.utils import extend_schema
from rest_framework import status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from fetchml.auth import actor_from_request
from fetchml.jsonbody import validated_body
from fetchml.permissions import IsAdmin, IsHumanUser
from fetchml.query import KnownQueryParameters, validated_query
from fetchml.schema import error_response
from scheduler import reservations
from scheduler.api import reads
from scheduler.api.serializers import (
    CreateReservationSerializer,
    PrioritySerializer,
    ReservationListQuerySerializer,
    ReservationSerializer,
    SchedulerStatusSerializer,
    WorkerSerializer,
)
from scheduler.services import worker_drain
from tasks.api.serializers import TaskSerializer
from tasks.selectors import task_get_for_actor
from tasks.services import task_set_priority

UNAUTHORIZED = error_response("Invalid or missing API key")
FORBIDDEN = error_response("Worker keys may not use this endpoint")
ADMIN_ONLY = error_response("Admin role required")
NOT_FOUND = error_response("Not found, or not visible to the caller")
CONFLICT = error_response("The resource is not in a state that allows this")
VALIDATION = error_response("Validation failed; `details` names each field")
BAD_REQUEST = error_response("Invalid query parameter")


class SchedulerStatusView(KnownQueryParameters, APIView):
    permission_classes = [IsHumanUser]

    @extend_schema(
        tags=["Scheduler"],
        summary="Get scheduler status",
        responses={200: SchedulerStatusSerializer, 401: UNAUTHORIZED, 403: FORBIDDEN},
    )
    def get(self, request: Request) -> Response:
        return Response(SchedulerStatusSerializer(reads.scheduler_status()).data)


class WorkerListView(KnownQueryParameters, APIView):
    permission_classes = [IsHumanUser]

    @extend_schema(
        tags=["Scheduler"],
        summary="List workers",
        description="Every registered worker (offline ones included), by name.",
        responses={200: WorkerSerializer(many=True), 401: UNAUTHORIZED, 403: FORBIDDEN},
    )
    def get(self, request: Request) -> Response:
        return Response(WorkerSerializer(reads.worker_list(actor=actor_from_request(request)), many=True).data)


class WorkerDetailView(KnownQueryParameters, APIView):
    def get_permissions(self) -> list:
        return [IsAdmin()] if self.request.method == "DELETE" else [IsHumanUser()]

    @extend_schema(
        tags=["Scheduler"],
        summary="Get worker details",
        responses={200: WorkerSerializer, 401: UNAUTHORIZED, 403: FORBIDDEN, 404: NOT_FOUND},
    )
    def get(self, request: Request, workerId: uuid.UUID) -> Response:
        worker = reads.worker_get(actor=actor_from_request(request), worker_id=workerId)
        return Response(WorkerSerializer(worker).data)

    @extend_schema(
        tags=["Scheduler"],
        summary="Drain worker",
        description=(
            "Admins only. The worker gets no new work; its running work finishes; it goes offline once "
            "empty. Audited as `scheduler_drain`. Draining a draining worker is a no-op; an offline one is 409."
        ),
        responses={204: None, 401: UNAUTHORIZED, 403: ADMIN_ONLY, 404: NOT_FOUND, 409: CONFLICT},
    )
    def delete(self, request: Request, workerId: uuid.UUID) -> Response:
        actor = actor_from_request(request)
        worker_drain(worker=reads.worker_get(actor=actor, worker_id=workerId), actor=actor)
        return Response(status=status.HTTP_204_NO_CONTENT)


class ReservationListCreateView(KnownQueryParameters, APIView):
    methods_checking_their_own = ("GET", "HEAD")
    permission_classes = [IsHumanUser]

    @extend_schema(
        tags=["Scheduler"],
        summary="List reservations",
        description=(
            "The caller's live reservations (pending, active, claimed); an admin's list holds everyone's. "
            "`include_ended=true` adds expired and cancelled ones."
        ),
        parameters=[ReservationListQuerySerializer],
        responses={200: ReservationSerializer(many=True), 400: BAD_REQUEST, 401: UNAUTHORIZED, 403: FORBIDDEN},
    )
    def get(self, request: Request) -> Response:
        query = validated_query(ReservationListQuerySerializer, request)
        found = reads.reservation_list(actor=actor_from_request(request), include_ended=query["include_ended"])
        return Response(ReservationSerializer(found, many=True).data)

    @extend_schema(
        tags=["Scheduler"],
        summary="Create reservation",
        description=(
            "Hold `gpu_count` GPUs (of `gpu_type`) on each of `node_count` workers for `expires_minutes`, "
            "from now or from `starts_at` (up to 60 s in the past counts as now: clock skew). Refused (422, "
            "with the reason and the field it is about) for a `starts_at` without a time zone, further in the "
            f"past or more than {reservations.STARTS_AT_MAX_LEAD.days} days ahead, beyond "
            "FETCHML_RESERVATIONS_PER_USER live reservations, or when "
            "the registered workers cannot hold it next to the other reservations of that window. Tasks "
            "submitted with its `reservation_id` run on it, and must fit in it (nodes, GPUs per node, GPU type)."
        ),
        request=CreateReservationSerializer,
        responses={201: ReservationSerializer, 401: UNAUTHORIZED, 403: FORBIDDEN, 422: VALIDATION},
    )
    def post(self, request: Request) -> Response:
        fields = validated_body(CreateReservationSerializer, request)
        actor = actor_from_request(request)
        created = reservations.reservation_create(owner=actor.user, actor=actor, **fields)
        return Response(ReservationSerializer(created).data, status=status.HTTP_201_CREATED)


class ReservationDetailView(KnownQueryParameters, APIView):
    permission_classes = [IsHumanUser]

    @extend_schema(
        tags=["Scheduler"],
        summary="Get reservation",
        responses={200: ReservationSerializer, 401: UNAUTHORIZED, 403: FORBIDDEN, 404: NOT_FOUND},
    )
    def get(self, request: Request, reservationId: uuid.UUID) -> Response:
        found = reads.reservation_get(actor=actor_from_request(request), reservation_id=reservationId)
        return Response(ReservationSerializer(found).data)

    @extend_schema(
        tags=["Scheduler"],
        summary="Cancel reservation",
        description="Release a pending or active reservation (owner or admin). Audited as `reservation_changed`.",
        responses={204: None, 401: UNAUTHORIZED, 403: FORBIDDEN, 404: NOT_FOUND, 409: CONFLICT},
    )
    def delete(self, request: Request, reservationId: uuid.UUID) -> Response:
        actor = actor_from_request(request)
        found = reads.reservation_get(actor=actor, reservation_id=reservationId)
        reservations.reservation_cancel(reservation=found, actor=actor)
        return Response(status=status.HTTP_204_NO_CONTENT)


class JobPriorityView(KnownQueryParameters, APIView):
    permission_classes = [IsHumanUser]

    @extend_schema(
        tags=["Scheduler"],
        summary="Update job priority",
        description=(
            "Owner or admin. A queued job is re-ordered at once (its fair-share offset is kept); a running "
            "job keeps the new priority for any retry. A finished job is 409."
        ),
        request=PrioritySerializer,
        responses={
            200: TaskSerializer,
            401: UNAUTHORIZED,
            403: FORBIDDEN,
            404: NOT_FOUND,
            409: CONFLICT,
            422: VALIDATION,
        },
    )
    def patch(self, request: Request, jobId: uuid.UUID) -> Response:
        actor = actor_from_request(request)
        task = task_get_for_actor(actor=actor, task_id=jobId)
        fields = validated_body(PrioritySerializer, request)
        task_set_priority(task=task, priority=fields["priority"], actor=actor)
        return Response(TaskSerializer(task_get_for_actor(actor=actor, task_id=jobId)).data)
