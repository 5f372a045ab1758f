"""A retried task keeps how each earlier attempt ended: the outcome fields are cleared when the next
attempt is placed, and its owner still sees why the first did not finish."""

from datetime import timedelta

import pytest
from django.test import override_settings
from django.utils import timezone

from scheduler.dispatch import dispatch_round
from scheduler.models import Worker
from scheduler.services import assignment_status, expire_leases
from scheduler.tests.factories import assignments_of, queued_task, run_started, worker
from tasks.models import Task

pytestmark = pytest.mark.django_db

NO_BACKOFF = {"FETCHML_RETRY_BACKOFF_BASE_SECONDS": 0.0, "FETCHML_RETRY_BACKOFF_MAX_SECONDS": 0.0}


def _place_again(task: Task) -> None:
    Task.objects.filter(id=task.id).update(runnable_after=timezone.now() - timedelta(seconds=1))
    assert dispatch_round() == 1


@override_settings(**NO_BACKOFF)
def test_an_attempt_lost_with_its_worker_is_kept_after_the_next_attempt_is_placed(user_client, user):
    first_box = worker(name="first")
    task = queued_task(owner=user)
    run_started(task)
    Worker.objects.filter(id=first_box.id).update(last_heartbeat=timezone.now() - timedelta(hours=1))
    expire_leases()
    worker(name="second")
    _place_again(task)

    body = user_client.get(f"/v1/tasks/{task.id}").json()

    assert (body["status"], body["attempt"], body["failure_reason"]) == ("preparing", 2, "")
    [earlier] = body["earlier_attempts"]
    assert (earlier["attempt"], earlier["worker_id"], earlier["failure_reason"]) == (
        1,
        str(first_box.id),
        "worker_lost",
    )
    assert earlier["ended_at"].endswith("Z") and earlier["exit_code"] is None


@override_settings(**NO_BACKOFF)
def test_each_retried_attempt_is_kept_in_order_with_the_end_of_its_error():
    worker()
    task = queued_task(retry_on_exit_code=True)
    for attempt, code in ((1, 3), (2, 4)):
        if attempt > 1:
            _place_again(task)
        run = assignments_of(task)[-1] if attempt > 1 else run_started(task)
        assignment_status(
            worker_id=run.worker_id,
            task_id=str(task.id),
            token=str(run.token),
            status="failed",
            exit_code=code,
            failure_reason="exit_code",
            error="x" * 5000 + f"attempt {attempt} failed",
        )

    task.refresh_from_db()
    assert [(e["attempt"], e["exit_code"]) for e in task.earlier_attempts] == [(1, 3), (2, 4)]
    assert all(len(e["error"]) == 2000 for e in task.earlier_attempts)
    assert task.earlier_attempts[1]["error"].endswith("attempt 2 failed")


def test_a_task_not_retried_has_no_earlier_attempts(user_client, user):
    worker()
    task = queued_task(owner=user)
    run = run_started(task)
    assignment_status(worker_id=run.worker_id, task_id=str(task.id), token=str(run.token), status="failed", exit_code=1)

    assert user_client.get(f"/v1/tasks/{task.id}").json()["earlier_attempts"] == []
