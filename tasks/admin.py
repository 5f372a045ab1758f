"""Operator console for tasks and experiments.

Rows are read-only here: every change is an action that calls the same service
the API uses, so the state machine, the audit chain and the live events apply.
"""

from collections.abc import Callable

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.helpers import ActionForm
from django.db.models import QuerySet
from django.http import HttpRequest

from fetchml.admin import IdSearchMixin, ReadOnlyModelAdmin, apply_to_each
from fetchml.auth import Actor
from scheduler.models import NodeAssignment
from tasks import services
from tasks.models import Experiment, Task


def run_per_task(
    modeladmin: admin.ModelAdmin,
    request: HttpRequest,
    queryset: QuerySet[Task],
    verb: str,
    apply: Callable[[Task, Actor], object],
) -> None:
    apply_to_each(modeladmin, request, queryset.select_related("owner"), verb, apply, noun="task")


class PriorityForm(forms.Form):
    priority = forms.IntegerField(min_value=1, max_value=10)


class TaskActionForm(ActionForm):
    """The action bar with a priority box beside it, read by “Set priority”.

    Lenient here (any text) so a bad value reaches the action, which explains it,
    instead of the admin's generic "No action selected".
    """

    priority = forms.CharField(
        required=False,
        max_length=8,
        widget=forms.NumberInput(attrs={"min": 1, "max": 10}),
        help_text="For “Set priority”: 1..10, higher runs sooner.",
    )


class NodeAssignmentInline(admin.TabularInline):
    model = NodeAssignment
    fields = ("attempt", "node_id", "worker", "status", "holds_capacity", "cpu", "memory_gb", "gpus", "created_at")
    readonly_fields = fields
    extra = 0
    can_delete = False
    ordering = ("-attempt", "node_id")

    def has_add_permission(self, request: HttpRequest, obj: Task | None = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Task | None = None) -> bool:
        return False


@admin.register(Task)
class TaskAdmin(IdSearchMixin, ReadOnlyModelAdmin):
    list_display = (
        "job_name",
        "id",
        "status",
        "failure_reason",
        "priority",
        "owner",
        "worker",
        "kind",
        "created_at",
        "ended_at",
    )
    # Owners are listed from the (small) user table, not by scanning tasks for distinct owners.
    list_filter = ("status", "failure_reason", "kind", "priority", "owner")
    list_select_related = ("owner", "worker")
    search_fields = ("job_name", "owner__username", "worker__name")
    search_help_text = "Job name, owner's username, worker name, or a task id (whole or its first 6+ digits)."
    ordering = ("-created_at",)
    date_hierarchy = "created_at"
    inlines = [NodeAssignmentInline]
    action_form = TaskActionForm
    actions = ["cancel_tasks", "requeue_tasks", "set_priority"]

    @admin.action(description="Cancel selected tasks", permissions=["change"])
    def cancel_tasks(self, request: HttpRequest, queryset: QuerySet[Task]) -> None:
        run_per_task(
            self, request, queryset, "cancel", lambda task, actor: services.task_cancel(task=task, actor=actor)
        )

    @admin.action(description="Re-queue selected failed/cancelled tasks", permissions=["change"])
    def requeue_tasks(self, request: HttpRequest, queryset: QuerySet[Task]) -> None:
        run_per_task(
            self, request, queryset, "re-queue", lambda task, actor: services.task_requeue(task=task, actor=actor)
        )

    @admin.action(description="Set priority of selected tasks (enter it below)", permissions=["change"])
    def set_priority(self, request: HttpRequest, queryset: QuerySet[Task]) -> None:
        form = PriorityForm(request.POST)
        if not form.is_valid():
            self.message_user(request, "Enter a priority from 1 to 10 next to the action.", messages.ERROR)
            return
        priority = form.cleaned_data["priority"]
        run_per_task(
            self,
            request,
            queryset,
            f"set priority {priority} on",
            lambda task, actor: services.task_set_priority(task=task, priority=priority, actor=actor),
        )


@admin.register(Experiment)
class ExperimentAdmin(IdSearchMixin, ReadOnlyModelAdmin):
    list_display = ("name", "id", "owner", "status", "commit_id", "created_at")
    list_filter = ("status", "owner")
    list_select_related = ("owner",)
    search_fields = ("name", "owner__username", "^commit_id")
    search_help_text = "Name, owner's username, start of the commit id, or an experiment id (whole or first 6+ digits)."
    ordering = ("-created_at",)
