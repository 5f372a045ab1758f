"""Operator console: Jupyter services (the notebook token is never shown here)."""

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest

from fetchml.admin import IdSearchMixin, ReadOnlyModelAdmin, apply_to_each
from jupyter.models import JupyterService
from jupyter.services import jupyter_stop


@admin.register(JupyterService)
class JupyterServiceAdmin(IdSearchMixin, ReadOnlyModelAdmin):
    list_display = (
        "name",
        "owner",
        "status",
        "url",
        "workspace",
        "image",
        "task",
        "error",
        "created_at",
        "last_activity_at",
    )
    list_filter = ("status", "owner")
    list_select_related = ("owner", "task")
    search_fields = ("name", "owner__username", "workspace", "image")
    search_help_text = "Name, owner's username, workspace, image, or a service id (whole or its first 6+ digits)."
    ordering = ("-created_at",)
    hidden_fields = ("token_sealed",)
    actions = ["stop_services"]

    @admin.action(description="Stop selected services", permissions=["change"])
    def stop_services(self, request: HttpRequest, queryset: QuerySet[JupyterService]) -> None:
        apply_to_each(
            self,
            request,
            queryset.select_related("owner"),
            "stop",
            lambda service, actor: jupyter_stop(service=service, actor=actor),
            noun="service",
        )
