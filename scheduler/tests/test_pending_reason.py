""" "Why is my job still queued?": pending_reason and queue_position."""

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from scheduler.dispatch import dispatch_round
from scheduler.selectors import pending_reason, queue_position
from scheduler.tests.factories import queued_task, worker
from tasks.tests.factories import ReservationFactory

pytestmark = pytest.mark.django_db


def test_no_worker_connected():
    assert pending_reason(queued_task()) == "no active worker is connected"


def test_no_worker_has_the_gpu_type():
    worker(gpu_count=8, gpu_type="V100")

    assert pending_reason(queued_task(gpu=4, gpu_type="A100")) == "no active worker has GPUs of type A100"


def test_no_worker_has_enough_free_gpus_of_the_type():
    worker(gpu_count=8, gpu_type="A100", batch_slots=2)
    queued_task(gpu=6, gpu_type="A100", priority=9)
    dispatch_round()

    reason = pending_reason(queued_task(gpu=4, gpu_type="A100"))

    assert reason == "no worker with 4 free GPU(s) of type A100, a free batch slot"


def test_waiting_for_back_off():
    worker()
    until = timezone.now() + timedelta(minutes=2)

    assert pending_reason(queued_task(runnable_after=until)) == f"waiting for retry back-off until {until.isoformat()}"


def test_multi_node_task_lacking_workers():
    worker(name="a")

    assert pending_reason(queued_task(node_count=3)) == "only 1 of 3 workers have a free batch slot"


def test_behind_higher_priority_tasks():
    worker()
    for _ in range(3):
        queued_task(priority=9)
    task = queued_task(priority=2)

    assert queue_position(task) == 3
    assert pending_reason(task) == "behind 3 higher-priority task(s)"


def test_queue_position_ignores_tasks_in_back_off_and_later_ones():
    queued_task(priority=9, runnable_after=timezone.now() + timedelta(minutes=5))
    task = queued_task(priority=5)
    queued_task(priority=1)

    assert queue_position(task) == 0


def test_first_in_line_waits_for_the_next_round():
    worker()

    assert pending_reason(queued_task()) == "waiting for the next scheduling round"


def test_capacity_held_by_another_users_reservation():
    worker(gpu_count=2, gpu_type="A100")
    ReservationFactory(gpu_count=2, gpu_type="A100")

    reason = pending_reason(queued_task(gpu=1, gpu_type="A100"))

    assert reason == "the capacity it needs is held by active reservations"


def test_task_of_a_reservation_whose_window_has_not_started():
    worker(gpu_count=2)
    starts_at = timezone.now() + timedelta(hours=2)
    reservation = ReservationFactory(
        status="pending", starts_at=starts_at, expires_at=starts_at + timedelta(hours=1), gpu_count=1
    )

    reason = pending_reason(queued_task(gpu=1, reservation=reservation, owner=reservation.owner))

    assert reason == f"waiting for its reservation's window to start at {starts_at.isoformat()}"


def test_workers_held_for_a_starving_multi_node_job(settings):
    settings.FETCHML_STARVATION_SECONDS = 60
    for i in range(3):
        worker(name=f"node-{i}", batch_slots=1)
    queued_task(priority=10)
    dispatch_round()  # one node is busy, so the gang cannot start
    gang = queued_task(node_count=3, queued_at=timezone.now() - timedelta(minutes=10))
    small = queued_task(queued_at=timezone.now() - timedelta(minutes=5))

    assert pending_reason(small) == f"the workers it could use are held for task {gang.id}, which has waited longest"


def test_a_queued_tasks_detail_counts_the_queue_ahead_of_it_once(user_client, user):
    worker()
    for _ in range(3):
        queued_task(priority=9)
    task = queued_task(priority=2, owner=user)

    with CaptureQueriesContext(connection) as queries:
        body = user_client.get(f"/v1/tasks/{task.id}").json()

    assert (body["queue_position"], body["pending_reason"]) == (3, "behind 3 higher-priority task(s)")
    assert sum('"dispatch_key" >' in query["sql"] for query in queries) == 1
