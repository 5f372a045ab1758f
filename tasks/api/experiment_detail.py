"""GET and PATCH of one experiment: parse, call tasks.experiments, render."""

import uuid

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from fetchml.auth import actor_from_request
from fetchml.jsonbody import validated_body
from fetchml.permissions import IsHumanUser
from fetchml.query import KnownQueryParameters
from fetchml.schema import error_response
from tasks.api.fields import StrictCharField, StrictSerializer
from tasks.api.serializers import commit_id_field, experiment_name_field
from tasks.experiments import SETTABLE_STATUSES, experiment_get, experiment_update
from tasks.models import Experiment


class ExperimentDetailSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    name = serializers.CharField()
    description = serializers.CharField()
    commit_id = serializers.CharField()
    status = serializers.ChoiceField(choices=Experiment.Status.choices)
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()
    user_id = serializers.CharField(source="owner.username")


class ExperimentUpdateSerializer(StrictSerializer):
    name = experiment_name_field(required=False)
    description = StrictCharField(max_length=10_000, required=False, allow_blank=True)
    commit_id = commit_id_field()
    # What a client may set (`deleted` is not); the service owns the rule, the schema shows it.
    status = serializers.ChoiceField(choices=SETTABLE_STATUSES, required=False, help_text="active or archived")


class ExperimentDetailView(KnownQueryParameters, APIView):
    permission_classes = [IsHumanUser]

    @extend_schema(
        summary="Get experiment",
        description="Owner or admin; anyone else gets a 404.",
        responses={200: ExperimentDetailSerializer},
    )
    def get(self, request: Request, experimentId: uuid.UUID) -> Response:
        experiment = experiment_get(actor=actor_from_request(request), experiment_id=experimentId)
        return Response(ExperimentDetailSerializer(experiment).data)

    @extend_schema(
        summary="Update experiment",
        description=(
            "Rename, describe, set `commit_id`, or archive (`status`: active or archived). Owner or admin. "
            "A name already used by another of the owner's experiments is a 409. "
            "Tasks cannot be submitted into an archived experiment."
        ),
        request=ExperimentUpdateSerializer,
        responses={
            200: ExperimentDetailSerializer,
            409: error_response("The owner has an experiment of this name"),
            422: error_response("Invalid or unknown field"),
        },
    )
    def patch(self, request: Request, experimentId: uuid.UUID) -> Response:
        actor = actor_from_request(request)
        experiment = experiment_get(actor=actor, experiment_id=experimentId)
        fields = validated_body(ExperimentUpdateSerializer, request)
        updated = experiment_update(experiment=experiment, actor=actor, **fields)
        return Response(ExperimentDetailSerializer(updated).data)
