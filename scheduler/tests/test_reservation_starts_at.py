"""POST /v1/scheduler/reservations: what a `starts_at` may be (its zone, how far ahead)."""

from datetime import timedelta

import pytest
from django.utils import timezone

from fetchml.testing import refused_field
from scheduler.models import Reservation
from scheduler.reservations import STARTS_AT_MAX_LEAD
from scheduler.tests.factories import worker

pytestmark = pytest.mark.django_db

RESERVATIONS = "/v1/scheduler/reservations"


@pytest.fixture(autouse=True)
def gpu_worker(db):
    return worker(name="gpu-0", gpu_count=4)


def _book(client, starts_at: str):
    return client.post(RESERVATIONS, {"gpu_count": 1, "starts_at": starts_at}, format="json")


def test_a_start_at_the_end_of_the_calendar_is_422_naming_starts_at(user_client):
    response = _book(user_client, "9999-12-31T23:45:00Z")

    assert refused_field(response) == "starts_at"
    assert not Reservation.objects.exists()


def test_a_start_further_ahead_than_the_longest_lead_is_422_naming_starts_at(user_client):
    too_far = timezone.now() + STARTS_AT_MAX_LEAD + timedelta(hours=1)

    response = _book(user_client, too_far.isoformat())

    assert refused_field(response) == "starts_at"
    assert f"more than {STARTS_AT_MAX_LEAD.days} days ahead" in response.json()["error"]


def test_a_start_within_the_longest_lead_is_booked(user_client):
    starts_at = timezone.now() + STARTS_AT_MAX_LEAD - timedelta(days=1)

    response = _book(user_client, starts_at.isoformat())

    assert response.status_code == 201, response.json()
    assert response.json()["status"] == Reservation.Status.PENDING


def test_a_start_without_a_time_zone_is_422_naming_starts_at(user_client):
    naive = (timezone.now() + timedelta(days=30)).replace(tzinfo=None, microsecond=0)

    response = _book(user_client, naive.isoformat())

    assert refused_field(response) == "starts_at"
    assert response.json()["details"][0]["message"] == "Must carry a time zone (e.g. `Z`)."
    assert not Reservation.objects.exists()


def test_a_start_with_an_offset_is_taken_in_that_zone(user_client):
    utc = (timezone.now() + timedelta(days=30)).replace(microsecond=0)
    local = (utc + timedelta(hours=2)).replace(tzinfo=None)

    response = _book(user_client, f"{local.isoformat()}+02:00")

    assert response.status_code == 201, response.json()
    assert response.json()["starts_at"] == utc.isoformat().replace("+00:00", "Z")
