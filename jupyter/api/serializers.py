"""Jupyter service request and response bodies (spec: StartJupyterRequest, JupyterService)."""

from typing import Any

from rest_framework import serializers

from fetchml.auth import Actor
from fetchml.clock import api_time
from jupyter.models import JupyterService
from jupyter.sealing import unseal
from jupyter.selectors import DEFAULT_IMAGE
from jupyter.services import MAX_WORKSPACE
from tasks.api.fields import StrictCharField, StrictSerializer, WholeValueRegexValidator
from tasks.states import TaskStatus


def _pattern(regex: str) -> WholeValueRegexValidator:
    return WholeValueRegexValidator(regex, message="This value does not match the required pattern.")


class StartJupyterSerializer(StrictSerializer):
    name = StrictCharField(max_length=64, validators=[_pattern(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")])
    # Checked (relative, no `..`) by jupyter.services.clean_workspace, the rule every caller gets.
    workspace = StrictCharField(max_length=MAX_WORKSPACE, required=False, allow_blank=True, default="")
    image = StrictCharField(max_length=255, required=False, default=DEFAULT_IMAGE, validators=[_pattern(r"^[^\s]+$")])

    def validate_image(self, value: str) -> str:
        # The worker passes the image to `docker|podman run`, which would take "--privileged" as
        # one of its options (the agent refuses it too: scheduler.agent.services.jupyter_command).
        if value.startswith("-"):
            raise serializers.ValidationError("Must not begin with '-'.")
        return value


class JupyterServiceSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    name = serializers.CharField()
    status = serializers.ChoiceField(choices=JupyterService.Status.choices)
    url = serializers.URLField(allow_null=True, help_text="Set once the service answers")
    token = serializers.CharField(allow_null=True, help_text="The notebook token; shown to the service's owner only")
    created_at = serializers.DateTimeField()
    user_id = serializers.CharField(help_text="The owner's username")
    workspace = serializers.CharField(allow_blank=True)
    image = serializers.CharField(allow_blank=True)
    task_id = serializers.UUIDField(allow_null=True)
    task_status = serializers.ChoiceField(
        choices=TaskStatus.choices,
        allow_null=True,
        help_text="Its task's status: `queued` while a `starting` service waits for a worker with a free service "
        "slot (the task's `pending_reason` says why)",
    )
    error = serializers.CharField(allow_blank=True)
    last_activity_at = serializers.DateTimeField(allow_null=True)


def service_data(service: JupyterService, viewer: Actor) -> dict[str, Any]:
    """The response body of one service; the token only for its owner, and only while it runs."""
    running = service.status == JupyterService.Status.RUNNING
    token = unseal(service.token_sealed) if running and service.owner_id == viewer.user.pk else ""
    return {
        "id": str(service.id),
        "name": service.name,
        "status": service.status,
        "url": service.url if running and service.url else None,
        "token": token or None,
        "created_at": api_time(service.created_at),
        "user_id": service.owner.get_username(),
        "workspace": service.workspace,
        "image": service.image,
        "task_id": str(service.task_id) if service.task_id else None,
        "task_status": service.task.status if service.task_id else None,
        "error": service.error,
        "last_activity_at": api_time(service.last_activity_at) if service.last_activity_at else None,
    }
