"""POST /v1/tasks with a `reservation_id`: the task must fit in what the reservation holds."""

import pytest

from fetchml.testing import refused_field
from scheduler.tests.factories import worker
from tasks.models import Task
from tasks.tests.factories import ReservationFactory

pytestmark = pytest.mark.django_db


def _submit(client, reservation, **fields):
    body = {"job_name": "j", "entrypoint": "python train.py", "reservation_id": str(reservation.id), **fields}
    return client.post("/v1/tasks", body, format="json")


def test_a_task_on_more_nodes_than_its_reservation_holds_is_422_naming_node_count(user_client):
    worker(name="a", gpu_count=4)
    worker(name="b", gpu_count=4)
    booked = user_client.post("/v1/scheduler/reservations", {"gpu_count": 1}, format="json").json()

    response = user_client.post(
        "/v1/tasks",
        {"job_name": "j", "entrypoint": "python train.py", "gpu": 1, "node_count": 2, "reservation_id": booked["id"]},
        format="json",
    )

    assert refused_field(response) == "node_count"
    assert "on each of 1 worker(s)" in response.json()["error"]
    assert not Task.objects.exists()


def test_a_task_with_more_gpus_per_node_than_its_reservation_holds_is_422_naming_gpu(user_client, user):
    reservation = ReservationFactory(owner=user, gpu_count=2)

    response = _submit(user_client, reservation, gpu=4)

    assert refused_field(response) == "gpu"
    assert not Task.objects.exists()


def test_a_task_asking_for_another_gpu_type_than_its_reservation_holds_is_422_naming_gpu_type(user_client, user):
    reservation = ReservationFactory(owner=user, gpu_count=2, gpu_type="A100")

    response = _submit(user_client, reservation, gpu=1, gpu_type="H100")

    assert refused_field(response) == "gpu_type"
    assert not Task.objects.exists()


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"gpu": 2, "node_count": 2},
        {"gpu": 1, "node_count": 1, "gpu_type": "A100"},
        {"gpu": 2, "gpu_type": ""},
        {"gpu": 2, "cpu": 64, "memory_gb": 512},
    ],
    ids=["cpu-only", "the-whole-reservation", "part-of-it", "any-gpu-type", "cpu-and-memory"],
)
def test_a_task_within_its_reservation_is_accepted(user_client, user, fields):
    reservation = ReservationFactory(owner=user, gpu_count=2, gpu_type="A100", node_count=2)

    response = _submit(user_client, reservation, **fields)

    assert response.status_code == 201, response.json()
    assert response.json()["reservation_id"] == str(reservation.id)


def test_a_task_of_a_gpu_type_fits_a_reservation_of_any_type(user_client, user):
    reservation = ReservationFactory(owner=user, gpu_count=2, gpu_type="")

    response = _submit(user_client, reservation, gpu=2, gpu_type="H100")

    assert response.status_code == 201, response.json()
