"""Reservations: booking rules, capacity held from others, claimed by the owner's task, expiry, cancel."""

from datetime import timedelta

import pytest
from django.utils import timezone

from audit.models import AuditEvent
from fetchml.auth import Actor
from fetchml.errors import Conflict, Invalid
from scheduler.dispatch import dispatch_round
from scheduler.models import Reservation
from scheduler.reservations import reservation_cancel, reservation_create, reservations_tick
from scheduler.tests.factories import UserFactory, assignments_of, queued_task, worker
from tasks.models import Task
from tasks.services import task_submit
from tasks.states import TaskStatus

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("queued_until_a_round")]


@pytest.fixture
def owner(db):
    return UserFactory(username="carol")


def _book(owner, **fields) -> Reservation:
    return reservation_create(owner=owner, actor=Actor(user=owner, role="user"), **{"gpu_count": 4, **fields})


def _status(task: Task) -> str:
    return Task.objects.get(id=task.id).status


def test_reservation_holds_its_gpus_from_other_users_tasks(owner):
    worker(name="a100-0", gpu_count=4, gpu_type="A100")
    _book(owner, gpu_type="A100")
    other = queued_task(gpu=1)

    assert dispatch_round() == 0
    assert _status(other) == TaskStatus.QUEUED


def test_capacity_beyond_the_reservation_stays_usable_by_others(owner):
    worker(name="big", gpu_count=8, batch_slots=2)
    _book(owner, gpu_count=4)
    other = queued_task(gpu=4)

    assert dispatch_round() == 1
    assert _status(other) == TaskStatus.PREPARING


def test_owners_task_naming_the_reservation_runs_on_it_and_claims_it(owner):
    held = worker(name="held", gpu_count=4)
    reservation = _book(owner)
    task = task_submit(owner=owner, job_name="big", gpu=4, reservation_id=reservation.id)

    assert dispatch_round() == 1

    assert assignments_of(task)[0].worker_id == held.id
    reservation.refresh_from_db()
    assert reservation.status == Reservation.Status.CLAIMED
    assert AuditEvent.objects.filter(event_type="reservation_changed", action="claim").exists()


def test_a_task_on_its_reservation_runs_on_a_worker_held_for_a_starving_task(owner, settings):
    settings.FETCHML_STARVATION_SECONDS = 60
    worker(name="g1", gpu_count=4, batch_slots=3)
    reservation = _book(owner, gpu_count=2)
    queued_task(gpu=2, priority=10)
    assert dispatch_round() == 1  # two of g1's GPUs busy, two reserved
    starving = queued_task(gpu=2, queued_at=timezone.now() - timedelta(minutes=10))
    on_reservation = task_submit(owner=owner, job_name="mine", gpu=2, reservation_id=reservation.id)

    assert dispatch_round() == 1

    assert (_status(on_reservation), _status(starving)) == (TaskStatus.PREPARING, TaskStatus.QUEUED)


def test_a_worker_whose_reservations_keep_a_starving_task_off_it_is_not_held_for_it(owner, settings):
    settings.FETCHML_STARVATION_SECONDS = 60
    worker(name="g1", gpu_count=4, batch_slots=3)
    _book(owner, gpu_count=2)
    starving = queued_task(gpu=4, queued_at=timezone.now() - timedelta(minutes=10))
    small = queued_task(queued_at=timezone.now() - timedelta(minutes=5))

    assert dispatch_round() == 1

    assert (_status(small), _status(starving)) == (TaskStatus.PREPARING, TaskStatus.QUEUED)


def test_no_worker_is_held_for_a_starving_gang_that_others_reservations_keep_too_narrow(owner, settings):
    settings.FETCHML_STARVATION_SECONDS = 60
    worker(name="w1", gpu_count=2, gpu_type="A100", batch_slots=2)
    worker(name="w2", gpu_count=2, gpu_type="A100", batch_slots=2)
    _book(owner, gpu_count=1, gpu_type="A100")
    gang = queued_task(node_count=2, gpu=2, gpu_type="A100", queued_at=timezone.now() - timedelta(minutes=10))
    small = [queued_task(gpu=1, gpu_type="A100", queued_at=timezone.now() - timedelta(minutes=5)) for _ in range(2)]

    assert dispatch_round() == 2

    assert [_status(task) for task in (gang, *small)] == [TaskStatus.QUEUED, TaskStatus.PREPARING, TaskStatus.PREPARING]


def test_task_naming_a_reservation_runs_only_on_the_workers_it_holds(owner):
    worker(name="a-held", gpu_count=4)
    worker(name="b-free", gpu_count=4)
    reservation = _book(owner)
    hog = queued_task(gpu=4, priority=10)
    mine = task_submit(owner=owner, job_name="mine", gpu=4, reservation_id=reservation.id)

    assert dispatch_round() == 2

    assert assignments_of(mine)[0].worker.name == "a-held"
    assert assignments_of(hog)[0].worker.name == "b-free"


def test_expired_reservation_releases_its_capacity(owner):
    worker(gpu_count=4)
    reservation = _book(owner, expires_minutes=5)
    other = queued_task(gpu=2)
    assert dispatch_round() == 0

    assert reservations_tick(now=timezone.now() + timedelta(minutes=6)) == 1

    reservation.refresh_from_db()
    assert reservation.status == Reservation.Status.EXPIRED
    assert dispatch_round() == 1
    assert _status(other) == TaskStatus.PREPARING


def test_reservation_larger_than_the_fleet_is_refused_with_the_reason(owner):
    worker(gpu_count=4, gpu_type="A100")
    worker(gpu_count=4, gpu_type="A100")

    with pytest.raises(Invalid, match="cannot hold 4 A100 GPU"):
        _book(owner, gpu_type="A100", node_count=3)
    assert not Reservation.objects.exists()


def test_reservation_overlapping_one_that_takes_the_fleet_is_refused(owner):
    worker(gpu_count=4)
    _book(UserFactory())

    with pytest.raises(Invalid, match="already reserved"):
        _book(owner)


def test_user_cannot_hold_more_live_reservations_than_the_limit(owner, settings):
    settings.FETCHML_RESERVATIONS_PER_USER = 2
    worker(gpu_count=8, batch_slots=4)
    _book(owner, gpu_count=1)
    _book(owner, gpu_count=1)

    with pytest.raises(Invalid, match="limit is 2"):
        _book(owner, gpu_count=1)


def test_future_window_is_pending_holds_nothing_until_it_starts_then_holds(owner):
    worker(gpu_count=4)
    reservation = _book(owner, starts_at=timezone.now() + timedelta(hours=1), expires_minutes=60)
    assert reservation.status == Reservation.Status.PENDING
    early = queued_task(gpu=4)
    assert dispatch_round() == 1
    assert _status(early) == TaskStatus.PREPARING

    reservations_tick(now=timezone.now() + timedelta(hours=1, minutes=1))

    reservation.refresh_from_db()
    assert reservation.status == Reservation.Status.ACTIVE


def test_owners_task_on_a_pending_reservation_waits_for_the_window(owner):
    worker(gpu_count=4)
    reservation = _book(owner, starts_at=timezone.now() + timedelta(hours=1))
    task = task_submit(owner=owner, job_name="later", gpu=4, reservation_id=reservation.id)

    assert dispatch_round() == 0
    assert _status(task) == TaskStatus.QUEUED


def test_windows_that_do_not_overlap_may_each_take_the_whole_fleet(owner):
    worker(gpu_count=4)
    _book(UserFactory(), expires_minutes=60)

    later = _book(owner, starts_at=timezone.now() + timedelta(hours=2))

    assert later.status == Reservation.Status.PENDING


def test_cancelled_reservation_releases_capacity_and_cannot_be_cancelled_twice(owner):
    worker(gpu_count=4)
    reservation = _book(owner)
    other = queued_task(gpu=4)
    actor = Actor(user=owner, role="user")

    reservation_cancel(reservation=reservation, actor=actor)

    assert dispatch_round() == 1
    assert _status(other) == TaskStatus.PREPARING
    with pytest.raises(Conflict):
        reservation_cancel(reservation=reservation, actor=actor)


# --- what a refusal names ----------------------------------------------------------------


def _refused_field(owner, **fields) -> str | None:
    with pytest.raises(Invalid) as refused:
        _book(owner, **fields)
    [detail] = refused.value.details
    return detail["field"]


def test_start_in_the_past_beyond_the_clock_skew_is_refused_naming_starts_at(owner):
    worker(gpu_count=4)

    assert _refused_field(owner, starts_at=timezone.now() - timedelta(minutes=5)) == "starts_at"
    assert not Reservation.objects.exists()


def test_start_a_few_seconds_in_the_past_is_taken_as_now(owner):
    worker(gpu_count=4)
    before = timezone.now()

    reservation = _book(owner, starts_at=before - timedelta(seconds=10), expires_minutes=30)

    assert reservation.status == Reservation.Status.ACTIVE
    assert reservation.starts_at >= before
    assert reservation.expires_at == reservation.starts_at + timedelta(minutes=30)


def test_too_few_workers_for_the_node_count_is_refused_naming_node_count(owner):
    worker(gpu_count=4)
    worker(gpu_count=4)

    assert _refused_field(owner, gpu_count=4, node_count=3) == "node_count"


def test_no_worker_with_that_many_gpus_is_refused_naming_gpu_count(owner):
    worker(gpu_count=4)

    assert _refused_field(owner, gpu_count=8) == "gpu_count"


def test_gpu_type_no_worker_has_is_refused_naming_gpu_type(owner):
    worker(gpu_count=4, gpu_type="A100")

    assert _refused_field(owner, gpu_type="H100") == "gpu_type"


def test_window_already_reserved_is_refused_naming_starts_at(owner):
    worker(gpu_count=4)
    _book(UserFactory())

    assert _refused_field(owner) == "starts_at"


def test_live_reservation_limit_is_refused_naming_no_field(owner, settings):
    settings.FETCHML_RESERVATIONS_PER_USER = 1
    worker(gpu_count=8, batch_slots=4)
    _book(owner, gpu_count=1)

    assert _refused_field(owner, gpu_count=1) is None


@pytest.mark.parametrize("minutes", [0, 7 * 24 * 60 + 1])
def test_window_length_out_of_range_is_refused_naming_expires_minutes(owner, minutes):
    worker(gpu_count=4)

    assert _refused_field(owner, expires_minutes=minutes) == "expires_minutes"


def test_reservation_starting_in_the_past_is_422_naming_starts_at(user_client):
    worker(gpu_count=4)
    body = {"gpu_count": 1, "starts_at": (timezone.now() - timedelta(days=1)).isoformat()}

    response = user_client.post("/v1/scheduler/reservations", body, format="json")

    assert response.status_code == 422, response.content
    assert response.json()["code"] == "VALIDATION_ERROR"
    assert [detail["field"] for detail in response.json()["details"]] == ["starts_at"]


def test_reservation_too_wide_for_the_fleet_is_422_naming_node_count(user_client):
    worker(gpu_count=4)

    response = user_client.post("/v1/scheduler/reservations", {"gpu_count": 1, "node_count": 2}, format="json")

    assert response.status_code == 422, response.content
    assert [detail["field"] for detail in response.json()["details"]] == ["node_count"]


# --- an ended reservation holds nothing --------------------------------------------------


def test_cancelled_reservation_leaves_its_window_free_for_another_booking(owner):
    worker(gpu_count=4)
    theirs = _book(UserFactory(), expires_minutes=60)
    reservation_cancel(reservation=theirs, actor=Actor(user=theirs.owner, role="user"))

    assert _book(owner).status == Reservation.Status.ACTIVE


def test_cancelled_reservation_does_not_count_against_the_owners_limit(owner, settings):
    settings.FETCHML_RESERVATIONS_PER_USER = 1
    worker(gpu_count=4)
    first = _book(owner)
    reservation_cancel(reservation=first, actor=Actor(user=owner, role="user"))

    assert _book(owner).status == Reservation.Status.ACTIVE
