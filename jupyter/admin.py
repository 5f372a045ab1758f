"""Operator console: Jupyter services (the notebook token is never shown here)."""

from django.contrib import admin

from fetchml.admin import ReadOnlyModelAdmin
from jupyter.models import JupyterService


@admin.register(JupyterService)
class JupyterServiceAdmin(ReadOnlyModelAdmin):
    list_display = ("name", "owner", "status", "url", "task", "created_at", "last_activity_at")
    list_filter = ("status",)
    list_select_related = ("owner", "task")
    search_fields = ("name", "owner__username")
    ordering = ("-created_at",)
    hidden_fields = ("token_sealed",)
