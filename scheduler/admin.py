"""Operator console for the fleet: workers and reservations (read-mostly)."""

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest

from fetchml.admin import IdSearchMixin, ReadOnlyModelAdmin, apply_to_each
from scheduler.models import Reservation, Worker
from scheduler.services import worker_drain


@admin.register(Worker)
class WorkerAdmin(IdSearchMixin, ReadOnlyModelAdmin):
    list_display = ("name", "status", "capacity", "used", "last_heartbeat", "version", "hostname")
    list_filter = ("status", "gpu_type")
    search_fields = ("name", "hostname")
    search_help_text = "Worker name, hostname, or a worker id (whole or its first 6+ digits)."
    ordering = ("name",)
    hidden_fields = ("channel_name",)
    actions = ["drain_workers"]

    @admin.action(description="Drain selected workers (no new work; offline when idle)", permissions=["change"])
    def drain_workers(self, request: HttpRequest, queryset: QuerySet[Worker]) -> None:
        apply_to_each(
            self,
            request,
            queryset,
            "drain",
            lambda worker, actor: worker_drain(worker=worker, actor=actor),
            noun="worker",
        )

    @admin.display(description="capacity (cpu / GB / gpu / batch+service slots)")
    def capacity(self, worker: Worker) -> str:
        gpus = f"{worker.gpu_count}x{worker.gpu_type}" if worker.gpu_type else str(worker.gpu_count)
        return f"{worker.cpu_cores} / {worker.memory_gb} / {gpus} / {worker.batch_slots}+{worker.service_slots}"

    @admin.display(description="in use")
    def used(self, worker: Worker) -> str:
        return (
            f"{worker.used_cpu} / {worker.used_memory_gb} / {worker.used_gpus} / "
            f"{worker.used_batch_slots}+{worker.used_service_slots}"
        )


@admin.register(Reservation)
class ReservationAdmin(IdSearchMixin, ReadOnlyModelAdmin):
    list_display = ("id", "owner", "status", "gpu_count", "gpu_type", "node_count", "starts_at", "expires_at")
    list_filter = ("status", "gpu_type", "owner")
    list_select_related = ("owner",)
    search_fields = ("owner__username",)
    search_help_text = "Owner's username, or a reservation id (whole or its first 6+ digits)."
    ordering = ("-created_at",)
