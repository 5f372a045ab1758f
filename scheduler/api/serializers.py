"""Scheduler API representations, per the SchedulerStatus, Worker and Reservation schemas of the spec."""

from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from fetchml.conf import app_settings
from scheduler.models import Reservation, Worker
from scheduler.reservations import STARTS_AT_MAX_LEAD, STARTS_AT_SKEW
from tasks.api.fields import StrictCharField, StrictIntegerField, StrictSerializer, ZonedDateTimeField


class SchedulerStatusSerializer(serializers.Serializer):
    workers_total = serializers.IntegerField()
    workers_active = serializers.IntegerField()
    workers_draining = serializers.IntegerField()
    batch_queue_depth = serializers.IntegerField()
    service_queue_depth = serializers.IntegerField()
    tasks_running = serializers.IntegerField(help_text="Tasks preparing, running or collecting")
    tasks_completed_24h = serializers.IntegerField()
    reservations_active = serializers.IntegerField()
    timestamp = serializers.DateTimeField()


class CapabilitiesSerializer(serializers.Serializer):
    gpu_count = serializers.IntegerField()
    gpu_type = serializers.CharField()
    cpu_cores = serializers.IntegerField()
    memory_gb = serializers.IntegerField()


class SlotsSerializer(serializers.Serializer):
    batch_available = serializers.IntegerField(
        help_text="Batch slots a task naming no reservation could take now (free less reserved; 0 unless active)"
    )
    batch_total = serializers.IntegerField()
    batch_reserved = serializers.IntegerField(
        help_text="Batch slots held here by active reservations (one each), not counted as available"
    )
    service_available = serializers.IntegerField()
    service_total = serializers.IntegerField()


class WorkerSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    name = serializers.CharField()
    status = serializers.ChoiceField(choices=Worker.Status.choices)
    connected_at = serializers.DateTimeField(allow_null=True)
    last_heartbeat = serializers.DateTimeField(allow_null=True)
    capabilities = serializers.SerializerMethodField()
    slots = serializers.SerializerMethodField()
    gpus_available = serializers.IntegerField(
        source="availability.gpus",
        help_text="GPUs a task naming no reservation could get now (free less reserved; 0 unless active)",
    )
    gpus_reserved = serializers.IntegerField(
        source="availability.reserved_gpus", help_text="GPUs held here by active reservations"
    )
    active_tasks = serializers.SerializerMethodField(
        help_text="IDs of the caller's tasks holding capacity on this worker (an admin's: everyone's)"
    )

    @extend_schema_field(CapabilitiesSerializer)
    def get_capabilities(self, worker: Worker) -> dict[str, Any]:
        return {
            "gpu_count": worker.gpu_count,
            "gpu_type": worker.gpu_type,
            "cpu_cores": worker.cpu_cores,
            "memory_gb": worker.memory_gb,
        }

    @extend_schema_field(SlotsSerializer)
    def get_slots(self, worker: Worker) -> dict[str, int]:
        # `availability` is attached by the read (scheduler.selectors.worker_availability).
        return {
            "batch_available": worker.availability.batch_slots,
            "batch_total": worker.batch_slots,
            "batch_reserved": worker.availability.reserved_batch_slots,
            "service_available": worker.availability.service_slots,
            "service_total": worker.service_slots,
        }

    @extend_schema_field(serializers.ListField(child=serializers.UUIDField()))
    def get_active_tasks(self, worker: Worker) -> list[str]:
        # `live_assignments` is prefetched by the read; no query per worker.
        return sorted({str(assignment.task_id) for assignment in worker.live_assignments})


class ReservationSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    user_id = serializers.CharField(source="owner.username", help_text="The owner's username")
    gpu_count = serializers.IntegerField()
    gpu_type = serializers.CharField()
    node_count = serializers.IntegerField()
    starts_at = serializers.DateTimeField()
    expires_at = serializers.DateTimeField()
    status = serializers.ChoiceField(
        choices=Reservation.Status.choices,
        help_text="active, claimed, expired; also pending (booked for a later window) and cancelled",
    )
    created_at = serializers.DateTimeField()


class CreateReservationSerializer(StrictSerializer):
    gpu_count = StrictIntegerField(min_value=1, max_value=1024)
    gpu_type = StrictCharField(required=False, default="", allow_blank=True, max_length=64)
    node_count = StrictIntegerField(required=False, default=1, min_value=1, max_value=1024)
    expires_minutes = StrictIntegerField(required=False, default=30, min_value=1, help_text="Window length")
    starts_at = ZonedDateTimeField(
        required=False,
        allow_null=True,
        default=None,
        help_text=(
            "Start of the window (default: now), with its time zone; at most "
            f"{STARTS_AT_SKEW.seconds} s in the past, taken as now, and at most {STARTS_AT_MAX_LEAD.days} days ahead"
        ),
    )

    def validate_expires_minutes(self, value: int) -> int:
        limit = app_settings.RESERVATION_MAX_MINUTES
        if value > limit:
            raise serializers.ValidationError(f"Ensure this value is less than or equal to {limit}.")
        return value


class ReservationListQuerySerializer(serializers.Serializer):
    include_ended = serializers.BooleanField(required=False, default=False)


class PrioritySerializer(StrictSerializer):
    priority = StrictIntegerField(min_value=1, max_value=10)
