"""Reads of Jupyter services: visibility, and what a worker needs to start one."""

from typing import Any

from django.db.models import QuerySet

from fetchml.auth import Actor
from jupyter.models import JupyterService
from tasks.models import Task

DEFAULT_IMAGE = "jupyter/pytorch:latest"


def visible_services(actor: Actor) -> QuerySet[JupyterService]:
    """Owners see their own services; admins see every service."""
    services = JupyterService.objects.select_related("owner", "task")
    return services if actor.is_admin else services.filter(owner=actor.user)


def service_spec_for_task(task: Task) -> dict[str, Any] | None:
    """The `service` part of an `assign` message for a Jupyter task (None for other tasks)."""
    if task.kind != Task.Kind.SERVICE:
        return None
    service = JupyterService.objects.filter(task_id=task.id).values("id", "workspace", "image").first()
    if service is None:
        return None
    return {
        "type": "jupyter",
        "service_id": str(service["id"]),
        "workspace": service["workspace"],
        "image": service["image"] or DEFAULT_IMAGE,
    }
