"""The worker list and detail show the capacity an ordinary task could really get: what active
reservations hold is deducted from what is available, and shown apart."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from scheduler.dispatch import dispatch_round
from scheduler.models import Reservation, Worker
from scheduler.tests.factories import queued_task, worker
from tasks.tests.factories import ReservationFactory

pytestmark = pytest.mark.django_db

WORKERS = "/v1/scheduler/workers"


def test_a_reservation_on_a_worker_is_not_shown_as_available(user_client):
    box = worker(gpu_count=4, gpu_type="A100", batch_slots=2)
    ReservationFactory(gpu_count=3, gpu_type="A100")

    body = user_client.get(f"{WORKERS}/{box.id}").json()

    assert (body["slots"]["batch_available"], body["slots"]["batch_reserved"]) == (1, 1)
    assert (body["gpus_available"], body["gpus_reserved"]) == (1, 3)


def test_the_worker_list_deducts_reservations_from_the_worker_that_holds_them_only(user_client):
    worker(name="a", gpu_count=4, batch_slots=2)
    worker(name="b", gpu_count=8, batch_slots=2)
    ReservationFactory(gpu_count=6)  # only b can hold it

    rows = {row["name"]: row for row in user_client.get(WORKERS).json()}

    assert (rows["a"]["gpus_available"], rows["a"]["slots"]["batch_available"]) == (4, 2)
    assert (rows["b"]["gpus_available"], rows["b"]["slots"]["batch_available"]) == (2, 1)


def test_the_shown_free_gpus_are_what_dispatch_gives_a_task_naming_no_reservation(user_client):
    box = worker(gpu_count=4, batch_slots=4)
    ReservationFactory(gpu_count=2)
    shown = user_client.get(f"{WORKERS}/{box.id}").json()["gpus_available"]
    queued_task(gpu=shown + 1)

    assert dispatch_round() == 0
    queued_task(gpu=shown)
    assert dispatch_round() == 1


def test_a_reservation_whose_task_started_is_no_longer_deducted(user_client, user):
    box = worker(gpu_count=4, batch_slots=2)
    reservation = ReservationFactory(owner=user, gpu_count=2)
    queued_task(owner=user, gpu=2, reservation=reservation)
    dispatch_round()

    body = user_client.get(f"{WORKERS}/{box.id}").json()

    assert Reservation.objects.get(id=reservation.id).status == Reservation.Status.CLAIMED
    assert (body["gpus_available"], body["gpus_reserved"]) == (2, 0)
    assert (body["slots"]["batch_available"], body["slots"]["batch_reserved"]) == (1, 0)


def test_the_worker_list_reads_as_many_queries_for_many_workers_as_for_one(user_client):
    worker(name="first", gpu_count=4)
    ReservationFactory(gpu_count=1)
    user_client.get(WORKERS)  # the key's first use reads more than the next ones
    with CaptureQueriesContext(connection) as one:
        user_client.get(WORKERS)
    for i in range(5):
        worker(name=f"more-{i}", gpu_count=4)
        ReservationFactory(gpu_count=1)

    with CaptureQueriesContext(connection) as many:
        user_client.get(WORKERS)

    assert len(many) == len(one)


@pytest.mark.parametrize("status", [Worker.Status.DRAINING, Worker.Status.OFFLINE])
def test_a_worker_not_taking_work_shows_nothing_available(user_client, status):
    box = worker(gpu_count=4, batch_slots=2, service_slots=1, status=status)

    body = user_client.get(f"{WORKERS}/{box.id}").json()

    assert (body["gpus_available"], body["slots"]["batch_available"], body["slots"]["service_available"]) == (0, 0, 0)
    assert (body["slots"]["batch_total"], body["slots"]["service_total"]) == (2, 1)
