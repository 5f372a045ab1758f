"""Audit endpoints (admin only): query events, verify the chain, read its root."""

from drf_spectacular.utils import extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from audit import selectors, services
from audit.api.serializers import (
    AuditEventListSerializer,
    AuditEventQuerySerializer,
    ChainRootSerializer,
    VerificationResultSerializer,
    VerifyRequestSerializer,
)
from audit.checkpoints import warnings_for
from fetchml.auth import actor_from_request
from fetchml.permissions import IsAdmin
from fetchml.query import KnownQueryParameters, validated_query
from fetchml.schema import error_response

BAD_QUERY = error_response("Invalid query parameter (`details` names it)")


class AuditEventListView(APIView):
    permission_classes = [IsAdmin]

    @extend_schema(
        operation_id="audit_events_list",
        summary="Query audit events",
        description="Events in chain order, filtered by time range (inclusive), event type and user.",
        tags=["Audit"],
        parameters=[AuditEventQuerySerializer],
        responses={200: AuditEventListSerializer, 400: BAD_QUERY},
    )
    def get(self, request: Request) -> Response:
        query = validated_query(AuditEventQuerySerializer, request)
        events = selectors.audit_event_list(
            since=query.get("from"),
            until=query.get("to"),
            event_type=query.get("event_type"),
            user_id=query.get("user_id"),
            resource=query.get("resource"),
        )
        limit, offset = query["limit"], query["offset"]
        body = {"events": events[offset : offset + limit], "total": events.count(), "limit": limit, "offset": offset}
        return Response(AuditEventListSerializer(body).data)


class AuditVerifyView(KnownQueryParameters, APIView):
    permission_classes = [IsAdmin]

    @extend_schema(
        operation_id="audit_verify",
        summary="Verify audit chain integrity",
        description=(
            "Walks the whole hash chain and reports the first event that no longer matches. With a checkpoint "
            "saved earlier (from chain-root) it also detects truncation, rollback and a fully recomputed chain. "
            "Records an `audit_verified` event."
        ),
        tags=["Audit"],
        request=VerifyRequestSerializer,
        responses={200: VerificationResultSerializer},
    )
    def post(self, request: Request) -> Response:
        # No body at all parses as {}; anything sent must be a valid object.
        serializer = VerifyRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        checkpoint = serializer.validated_data["checkpoint"]
        actor = actor_from_request(request)
        result = services.audit_verify(user=actor.user, ip_address=actor.ip_address, checkpoint=checkpoint)
        return Response(VerificationResultSerializer(result).data)


class ChainRootView(KnownQueryParameters, APIView):
    permission_classes = [IsAdmin]

    @extend_schema(
        operation_id="audit_chain_root",
        summary="Get current chain root hash",
        description=(
            "The newest event's hash for external verification, as a checkpoint signed with "
            "FETCHML_AUDIT_SIGNING_KEY when one is configured. Keep it outside the database and POST it to "
            "/v1/audit/verify later as `checkpoint`."
        ),
        tags=["Audit"],
        responses={200: ChainRootSerializer},
    )
    def get(self, request: Request) -> Response:
        checkpoint = selectors.chain_checkpoint()
        body = {
            **checkpoint.as_dict(),
            "timestamp": checkpoint.timestamp,
            "total_events": checkpoint.sequence_num,
            "warnings": warnings_for(),
        }
        return Response(ChainRootSerializer(body).data)
