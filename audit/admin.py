"""The audit log in the admin: browsable, never editable (not even by superusers)."""

from django import forms
from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest

from audit.models import AuditEvent
from fetchml.admin import IdSearchMixin


@admin.register(AuditEvent)
class AuditEventAdmin(IdSearchMixin, admin.ModelAdmin):
    list_display = ("sequence_num", "timestamp", "event_type", "user_id", "resource", "action", "success")
    list_filter = ("event_type", "success")
    search_fields = ("user_id", "resource", "^ip_address")
    search_help_text = "Username, resource (e.g. a task id), start of an IP address, or a sequence number."
    ordering = ("-sequence_num",)
    # Counting a long chain on every page view is needless work.
    show_full_result_count = False
    list_per_page = 100

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: AuditEvent | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: AuditEvent | None = None) -> bool:
        return False

    # Beyond the permissions above: nothing reached through this class ever writes a row,
    # since any change would break the hash chain.
    def save_model(self, request: HttpRequest, obj: AuditEvent, form: forms.ModelForm, change: bool) -> None:
        raise PermissionDenied

    def delete_model(self, request: HttpRequest, obj: AuditEvent) -> None:
        raise PermissionDenied

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[AuditEvent]) -> None:
        raise PermissionDenied
