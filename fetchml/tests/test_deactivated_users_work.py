"""Deactivating an account in the operator console winds down the work it left behind."""

import pytest

from fetchml.auth import Actor
from fetchml.services import user_save
from jupyter.services import jupyter_start
from scheduler.tests.factories import queued_task, run_started, worker
from tasks.models import Task

pytestmark = pytest.mark.django_db


def _deactivate(user, operator) -> None:
    user.is_active = False
    user_save(user=user, operator=operator, created=False, changed_fields=["is_active"])


def test_a_deactivated_users_queued_tasks_are_cancelled_by_the_operator(user, admin_user):
    waiting = queued_task(owner=user)

    _deactivate(user, admin_user)

    waiting.refresh_from_db()
    assert (waiting.status, waiting.failure_reason, waiting.cancelled_by) == ("cancelled", "cancelled", admin_user)


def test_a_deactivated_users_running_task_finishes(user, admin_user):
    worker(batch_slots=1)
    running = queued_task(owner=user)
    run_started(running)

    _deactivate(user, admin_user)

    running.refresh_from_db()
    assert (running.status, running.cancel_requested_at) == ("running", None)


def test_a_deactivated_users_jupyter_service_is_stopped(user, admin_user):
    service = jupyter_start(actor=Actor(user=user, role="user"), name="nb")

    _deactivate(user, admin_user)

    service.refresh_from_db()
    assert service.status == "stopped"
    assert Task.objects.get(id=service.task_id).status == "cancelled"
