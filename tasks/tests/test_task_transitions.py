"""Transitions of many tasks written together (tasks.services.TaskTransitions)."""

import pytest
from django.db import transaction
from django.utils import timezone

from audit.models import AuditEvent
from audit.services import appended_together
from fetchml import events
from tasks.models import Task
from tasks.services import TasksChanged, TaskTransitions
from tasks.states import TaskStatus
from tasks.tests.factories import TaskFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def published(monkeypatch) -> list[tuple[list[str], dict]]:
    """Every (groups, message) the channel layer was handed."""
    sent: list[tuple[list[str], dict]] = []
    monkeypatch.setattr(events, "send_batch_now", sent.extend)
    return sent


def _task_events(published) -> list[tuple[str, str, str]]:
    return [(m["task_id"], m["event"], m["status"]) for _, m in published if m["type"] == "task.event"]


def test_moves_are_audited_and_published_with_the_write_in_their_order(published, django_capture_on_commit_callbacks):
    first, second = (TaskFactory(status=TaskStatus.PREPARING) for _ in range(2))
    with django_capture_on_commit_callbacks(execute=True), transaction.atomic(), appended_together():
        transitions = TaskTransitions(now=timezone.now())
        transitions.move(first, TaskStatus.RUNNING)
        transitions.move(second, TaskStatus.RUNNING)
        transitions.move(first, TaskStatus.COMPLETED, exit_code=0)
        transitions.write()

    audited = list(AuditEvent.objects.order_by("sequence_num").values_list("resource", "action"))
    assert audited == [
        (f"task:{first.id}", "running"),
        (f"task:{second.id}", "running"),
        (f"task:{first.id}", "completed"),
    ]
    assert _task_events(published) == [
        (str(first.id), "task_update", "running"),
        (str(second.id), "task_update", "running"),
        (str(first.id), "task_complete", "completed"),
    ]
    assert Task.objects.get(id=first.id).status == TaskStatus.COMPLETED


def test_moves_of_a_write_that_finds_a_task_changed_are_neither_audited_nor_published(
    published, django_capture_on_commit_callbacks
):
    task = TaskFactory(status=TaskStatus.PREPARING)
    capturing = django_capture_on_commit_callbacks(execute=True)
    with capturing, pytest.raises(TasksChanged), transaction.atomic(), appended_together():
        transitions = TaskTransitions(now=timezone.now())
        transitions.move(task, TaskStatus.RUNNING)
        Task.objects.filter(id=task.id).update(status=TaskStatus.CANCELLED)  # changed meanwhile
        transitions.write()

    assert not AuditEvent.objects.exists()
    assert _task_events(published) == []
