"""Operator console: stopping Jupyter services goes through the service layer."""

import pytest
from django.test import Client
from django.urls import reverse

from audit.models import AuditEvent
from fetchml.auth import Actor
from jupyter.models import JupyterService
from jupyter.services import jupyter_start
from tasks.models import Task
from tasks.states import TaskStatus

pytestmark = pytest.mark.django_db

SERVICES_URL = reverse("admin:jupyter_jupyterservice_changelist")


def stop(console: Client, services: list[JupyterService]) -> list[str]:
    data = {"action": "stop_services", "_selected_action": [str(s.pk) for s in services]}
    response = console.post(SERVICES_URL, data, follow=True)
    assert response.status_code == 200
    return [str(message) for message in response.context["messages"]]


def test_stop_action_stops_a_queued_service_and_cancels_its_task(console, user, admin_user):
    service = jupyter_start(actor=Actor(user=user, role="user"), name="nb")

    messages = stop(console, [service])

    service.refresh_from_db()
    task = Task.objects.get(id=service.task_id)
    assert service.status == JupyterService.Status.STOPPED
    assert task.status == TaskStatus.CANCELLED
    assert task.cancelled_by == admin_user
    assert AuditEvent.objects.filter(event_type="job_cancelled", resource=f"task:{task.id}").exists()
    assert messages == ["Done: stop 1 service(s)."]


def test_service_list_shows_workspace_image_and_error(console, user):
    JupyterService.objects.create(
        owner=user, name="nb", workspace="/data/ws-7", image="jupyter/scipy", error="port in use", status="error"
    )

    page = console.get(SERVICES_URL).content.decode()

    assert "/data/ws-7" in page
    assert "jupyter/scipy" in page
    assert "port in use" in page
