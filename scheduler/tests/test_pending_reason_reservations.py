""" "Why is my job still queued?" for a task naming an active reservation: it may use only the
workers that reservation holds, so its reason is about them, not about the whole fleet."""

import pytest

from scheduler.models import Reservation, Worker
from scheduler.selectors import pending_reason
from scheduler.tests.factories import queued_task, worker
from tasks.tests.factories import ReservationFactory

pytestmark = pytest.mark.django_db


def _reservation(**fields) -> Reservation:
    reservation = ReservationFactory(**fields)
    reservation.refresh_from_db()
    return reservation


def _until(reservation: Reservation) -> str:
    return f"; it may run only on them until the reservation ends at {reservation.expires_at.isoformat()}"


def test_a_gpu_type_only_other_workers_have_is_said_to_be_missing_on_the_reservations_workers():
    worker(name="a", gpu_count=4, gpu_type="A100")  # the reservation is bound here (first by name)
    worker(name="b", gpu_count=4, gpu_type="V100")
    reservation = _reservation(gpu_count=2)

    reason = pending_reason(queued_task(gpu=1, gpu_type="V100", reservation=reservation, owner=reservation.owner))

    assert reason == "the worker(s) its reservation holds have no GPUs of type V100" + _until(reservation)


def test_a_busy_reserved_worker_is_named_while_others_are_free():
    worker(name="a", gpu_count=4, batch_slots=2, used_cpu=6)
    worker(name="b", gpu_count=4, batch_slots=2)
    reservation = _reservation(gpu_count=2)

    reason = pending_reason(queued_task(gpu=1, cpu=4, reservation=reservation, owner=reservation.owner))

    assert reason == (
        "no worker its reservation holds has 1 free GPU(s), 4 free CPU core(s), a free batch slot" + _until(reservation)
    )


def test_a_task_wider_than_its_reservation_is_told_how_many_workers_it_holds():
    # Queued before submission refused such tasks.
    worker(name="a", gpu_count=4)
    worker(name="b", gpu_count=4)
    reservation = _reservation(gpu_count=1)

    reason = pending_reason(queued_task(gpu=1, node_count=2, reservation=reservation, owner=reservation.owner))

    assert reason == "its reservation holds 1 worker, fewer than its 2 nodes" + _until(reservation)


def test_a_reservation_held_on_no_active_worker_is_said_so():
    worker(name="a", gpu_count=4)
    worker(name="b", gpu_count=4, status=Worker.Status.OFFLINE)
    reservation = _reservation(gpu_count=2, node_count=2)

    reason = pending_reason(queued_task(gpu=2, reservation=reservation, owner=reservation.owner))

    assert reason == "its reservation is not held on any active worker (too few are connected)" + _until(reservation)


def test_a_task_on_a_reservation_its_workers_can_hold_only_in_part_counts_them():
    worker(name="a", gpu_count=4, batch_slots=2)
    worker(name="b", gpu_count=4, batch_slots=2, used_cpu=6)
    reservation = _reservation(gpu_count=2, node_count=2)

    reason = pending_reason(queued_task(gpu=2, cpu=4, node_count=2, reservation=reservation, owner=reservation.owner))

    assert reason == (
        "only 1 of the 2 worker(s) its reservation holds have 2 free GPU(s), 4 free CPU core(s), a free batch slot"
        + _until(reservation)
    )
