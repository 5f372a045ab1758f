"""The audit log in the admin: browsable, never editable (not even by superusers)."""

from django.contrib import admin
from django.http import HttpRequest

from audit.models import AuditEvent


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    list_display = ("sequence_num", "timestamp", "event_type", "user_id", "resource", "action", "success")
    list_filter = ("event_type", "success")
    search_fields = ("user_id", "resource")
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
