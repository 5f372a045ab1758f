"""A preparation failure is retried only while the datasets the task pinned at submission are intact."""

import pytest

from artifacts.models import Dataset
from artifacts.tests.factories import DatasetFactory
from audit.models import AuditEvent
from scheduler.dispatch import dispatch_round
from scheduler.services import assignment_status
from scheduler.tests.factories import assignments_of, worker
from tasks.models import Task
from tasks.services import task_submit

pytestmark = pytest.mark.django_db

PINNED = "a" * 64
UPLOADED_AGAIN = "b" * 64
MISMATCH = f"dataset mnist: sha256 mismatch: expected {PINNED}, got {UPLOADED_AGAIN}"


def placed_task(user) -> Task:
    DatasetFactory(owner=user, name="mnist", sha256=PINNED)
    DatasetFactory(owner=user, name="labels")
    worker()
    task = task_submit(
        owner=user,
        job_name="pinned",
        entrypoint="true",
        datasets=["labels"],
        dataset_specs=[{"name": "mnist"}],
        max_retries=3,
    )
    dispatch_round()
    return task


def preparation_failed(task: Task, error: str) -> Task:
    [assignment] = assignments_of(task)
    assert assignment_status(
        worker_id=assignment.worker_id,
        task_id=str(task.id),
        token=str(assignment.token),
        status="failed",
        failure_reason="preparation",
        error=error,
    ).accepted
    task.refresh_from_db()
    return task


def test_a_task_whose_dataset_was_uploaded_again_fails_its_preparation_without_retry(user):
    task = placed_task(user)
    Dataset.objects.filter(owner=user, name="mnist").delete()
    DatasetFactory(owner=user, name="mnist", sha256=UPLOADED_AGAIN)

    task = preparation_failed(task, MISMATCH)

    assert (task.status, task.retry_count, task.failure_reason) == ("failed", 0, "preparation")
    assert "dataset mnist was uploaded again" in task.error
    assert "resubmitting the task pins the current dataset" in task.error
    assert MISMATCH in task.error
    assert not AuditEvent.objects.filter(event_type="job_requeued").exists()


def test_a_task_whose_dataset_was_deleted_fails_its_preparation_without_retry(user):
    task = placed_task(user)
    Dataset.objects.filter(owner=user, name="labels").delete()

    task = preparation_failed(task, "dataset labels: download refused (HTTP 404)")

    assert (task.status, task.retry_count, task.failure_reason) == ("failed", 0, "preparation")
    assert "dataset labels was deleted" in task.error


def test_a_transient_preparation_failure_with_the_datasets_intact_is_still_retried(user):
    task = placed_task(user)

    task = preparation_failed(task, "dataset mnist: download failed: connection reset")

    assert (task.status, task.retry_count, task.failure_reason) == ("queued", 1, "preparation")
    assert task.error == "dataset mnist: download failed: connection reset"
