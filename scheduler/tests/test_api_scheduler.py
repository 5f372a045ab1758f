"""Scheduler API over HTTP: status, workers and drain, reservations, job priority; auth and validation."""

import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from audit.models import AuditEvent
from conftest import KeyClient
from fetchml.testing import refused_field
from scheduler.dispatch import dispatch_round
from scheduler.models import Reservation, Worker
from scheduler.tests.factories import UserFactory, queued_task, worker
from tasks.models import Task

pytestmark = pytest.mark.django_db

STATUS = "/v1/scheduler/status"
WORKERS = "/v1/scheduler/workers"
RESERVATIONS = "/v1/scheduler/reservations"


def _priority_url(task: Task) -> str:
    return f"/v1/scheduler/jobs/{task.id}/priority"


@pytest.fixture
def worker_client(worker_key) -> KeyClient:
    return KeyClient(worker_key)


# --- status ---------------------------------------------------------------------


def test_status_counts_workers_queues_and_reservations(user_client, user):
    worker(name="a")
    worker(name="b", status=Worker.Status.DRAINING)
    worker(name="c", status=Worker.Status.OFFLINE)
    queued_task(owner=user)
    queued_task(owner=user, kind=Task.Kind.SERVICE)
    queued_task(owner=user, status="running")
    Reservation.objects.create(owner=user, gpu_count=1, expires_at=timezone.now() + timedelta(minutes=5))

    body = user_client.get(STATUS).json()

    assert {k: v for k, v in body.items() if k != "timestamp"} == {
        "workers_total": 3,
        "workers_active": 1,
        "workers_draining": 1,
        "batch_queue_depth": 1,
        "service_queue_depth": 1,
        "tasks_running": 1,
        "tasks_completed_24h": 0,
        "reservations_active": 1,
    }


@pytest.mark.parametrize("path", [STATUS, WORKERS, RESERVATIONS])
def test_reads_need_a_key(anon_client, path):
    assert anon_client.get(path).status_code == 401


@pytest.mark.parametrize("path", [STATUS, WORKERS, RESERVATIONS])
def test_worker_keys_may_not_read_the_scheduler_api(worker_client, path):
    assert worker_client.get(path).status_code == 403


# --- workers ----------------------------------------------------------------------


def test_worker_representation_has_capabilities_slots_and_active_tasks(user_client, user):
    box = worker(name="gpu-1", gpu_count=4, gpu_type="A100", batch_slots=2, service_slots=1)
    task = queued_task(owner=user, gpu=1)
    dispatch_round()

    body = user_client.get(f"{WORKERS}/{box.id}").json()
    assert body["name"] == "gpu-1"
    assert body["capabilities"] == {"gpu_count": 4, "gpu_type": "A100", "cpu_cores": 8, "memory_gb": 32}
    assert body["slots"] == {
        "batch_available": 1,
        "batch_total": 2,
        "batch_reserved": 0,
        "service_available": 1,
        "service_total": 1,
    }
    assert (body["gpus_available"], body["gpus_reserved"]) == (3, 0)
    assert body["active_tasks"] == [str(task.id)]
    assert body["status"] == "active"
    assert [w["id"] for w in user_client.get(WORKERS).json()] == [str(box.id)]


def test_a_worker_lists_only_the_callers_own_active_tasks_but_all_to_an_admin(user_client, admin_client_key, user):
    box = worker(name="gpu-1", batch_slots=2)
    mine = queued_task(owner=user)
    theirs = queued_task(owner=UserFactory(username="mallory"))
    dispatch_round()

    assert user_client.get(f"{WORKERS}/{box.id}").json()["active_tasks"] == [str(mine.id)]
    assert [w["active_tasks"] for w in user_client.get(WORKERS).json()] == [[str(mine.id)]]
    everyone = admin_client_key.get(f"{WORKERS}/{box.id}").json()["active_tasks"]
    assert everyone == sorted([str(mine.id), str(theirs.id)])


def test_unknown_worker_is_404(user_client):
    assert user_client.get(f"{WORKERS}/{uuid.uuid4()}").status_code == 404


def test_admin_drains_a_worker_which_goes_offline_when_empty_and_is_audited(admin_client_key):
    box = worker()

    response = admin_client_key.delete(f"{WORKERS}/{box.id}")

    assert response.status_code == 204
    box.refresh_from_db()
    assert box.status == Worker.Status.OFFLINE
    assert AuditEvent.objects.filter(event_type="scheduler_drain", resource=f"worker:{box.name}").exists()


def test_draining_a_busy_worker_keeps_it_draining_and_gives_it_no_new_work(admin_client_key, user):
    box = worker(batch_slots=2)
    queued_task(owner=user)
    dispatch_round()

    assert admin_client_key.delete(f"{WORKERS}/{box.id}").status_code == 204
    waiting = queued_task(owner=user)

    assert dispatch_round() == 0
    box.refresh_from_db()
    assert box.status == Worker.Status.DRAINING
    waiting.refresh_from_db()
    assert waiting.status == "queued"


def test_users_may_not_drain_workers(user_client):
    box = worker()
    assert user_client.delete(f"{WORKERS}/{box.id}").status_code == 403
    box.refresh_from_db()
    assert box.status == Worker.Status.ACTIVE


def test_draining_an_unknown_worker_is_404(admin_client_key):
    assert admin_client_key.delete(f"{WORKERS}/{uuid.uuid4()}").status_code == 404


def test_draining_an_offline_worker_is_409(admin_client_key):
    box = worker(status=Worker.Status.OFFLINE)
    assert admin_client_key.delete(f"{WORKERS}/{box.id}").status_code == 409


# --- reservations -------------------------------------------------------------------


def test_user_books_a_reservation_with_defaults(user_client):
    worker(gpu_count=4)

    response = user_client.post(RESERVATIONS, {"gpu_count": 2}, format="json")

    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["gpu_count"], body["node_count"], body["status"], body["user_id"]) == (2, 1, "active", "alice")
    assert AuditEvent.objects.filter(event_type="reservation_changed", action="create").exists()


def test_unsatisfiable_reservation_is_422_with_the_reason(user_client):
    worker(gpu_count=4)

    response = user_client.post(RESERVATIONS, {"gpu_count": 8}, format="json")

    assert response.status_code == 422
    assert "cannot hold 8 GPU" in response.json()["error"]


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"gpu_count": 0},
        {"gpu_count": 1, "node_count": 0},
        {"gpu_count": 1, "expires_minutes": 0},
        {"gpu_count": 1, "expires_minutes": 10**7},
        {"gpu_count": 1, "colour": "red"},
    ],
)
def test_invalid_reservation_body_is_422(user_client, body):
    worker(gpu_count=4)
    assert user_client.post(RESERVATIONS, body, format="json").status_code == 422


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"gpu_count": "1"}, "gpu_count"),
        ({"gpu_count": 1.0}, "gpu_count"),
        ({"gpu_count": 1, "node_count": "1"}, "node_count"),
        ({"gpu_count": 1, "expires_minutes": 30.0}, "expires_minutes"),
        ({"gpu_count": 1, "gpu_type": 100}, "gpu_type"),
    ],
)
def test_reservation_fields_of_the_wrong_json_type_are_422(user_client, body, field):
    worker(gpu_count=4)
    response = user_client.post(RESERVATIONS, body, format="json")
    assert response.status_code == 422, response.content
    assert [detail["field"] for detail in response.json()["details"]] == [field]
    assert not Reservation.objects.exists()


def test_users_see_their_own_reservations_and_admins_see_all(user_client, admin_client_key, other_client):
    worker(gpu_count=8, batch_slots=4)
    mine = user_client.post(RESERVATIONS, {"gpu_count": 1}, format="json").json()
    theirs = other_client.post(RESERVATIONS, {"gpu_count": 1}, format="json").json()

    assert [r["id"] for r in user_client.get(RESERVATIONS).json()] == [mine["id"]]
    assert {r["id"] for r in admin_client_key.get(RESERVATIONS).json()} == {mine["id"], theirs["id"]}
    assert user_client.get(f"{RESERVATIONS}/{theirs['id']}").status_code == 404


def test_owner_cancels_a_reservation_and_others_get_404(user_client, other_client):
    worker(gpu_count=4)
    booked = user_client.post(RESERVATIONS, {"gpu_count": 4}, format="json").json()

    assert other_client.delete(f"{RESERVATIONS}/{booked['id']}").status_code == 404
    assert user_client.delete(f"{RESERVATIONS}/{booked['id']}").status_code == 204
    assert user_client.delete(f"{RESERVATIONS}/{booked['id']}").status_code == 409
    listed = user_client.get(RESERVATIONS, {"include_ended": "true"}).json()
    assert [r["status"] for r in listed] == ["cancelled"]


# --- job priority ----------------------------------------------------------------------


def test_owner_changes_priority_and_gets_the_task_back(user_client, user):
    task = queued_task(owner=user, priority=3)

    response = user_client.patch(_priority_url(task), {"priority": 8}, format="json")

    assert response.status_code == 200
    assert (response.json()["id"], response.json()["priority"]) == (str(task.id), 8)
    assert AuditEvent.objects.filter(event_type="job_priority_changed").exists()


def test_admin_may_change_anyones_priority(admin_client_key, user):
    task = queued_task(owner=user)
    assert admin_client_key.patch(_priority_url(task), {"priority": 1}, format="json").status_code == 200


def test_someone_elses_job_priority_is_404(other_client, user):
    task = queued_task(owner=user)
    assert other_client.patch(_priority_url(task), {"priority": 9}, format="json").status_code == 404


@pytest.mark.parametrize("body", [{}, {"priority": 0}, {"priority": 11}, {"priority": "high"}])
def test_priority_outside_one_to_ten_is_422(user_client, user, body):
    task = queued_task(owner=user)
    assert user_client.patch(_priority_url(task), body, format="json").status_code == 422


@pytest.mark.parametrize("priority", ["9", 8.0])
def test_priority_that_is_not_a_json_integer_is_422_as_at_submission(user_client, user, priority):
    task = queued_task(owner=user, priority=3)

    response = user_client.patch(_priority_url(task), {"priority": priority}, format="json")

    assert response.status_code == 422, response.content
    assert response.json()["details"] == [{"field": "priority", "message": "A valid integer is required."}]
    task.refresh_from_db()
    assert task.priority == 3


def test_priority_of_a_finished_job_is_409(user_client, user):
    task = queued_task(owner=user, status="completed")
    assert user_client.patch(_priority_url(task), {"priority": 9}, format="json").status_code == 409


def test_priority_change_needs_a_human_key(anon_client, worker_client, user):
    task = queued_task(owner=user)
    assert anon_client.patch(_priority_url(task), {"priority": 9}, format="json").status_code == 401
    assert worker_client.patch(_priority_url(task), {"priority": 9}, format="json").status_code == 403


# --- unschedulable tasks at submission -------------------------------------------------------


def test_task_no_registered_worker_could_run_is_refused_with_the_reason(user_client):
    worker(name="small", gpu_count=2, gpu_type="A100")

    response = user_client.post(
        "/v1/tasks", {"job_name": "huge", "entrypoint": "python train.py", "gpu": 8}, format="json"
    )

    assert response.status_code == 422
    assert "8 GPUs per node requested; the largest registered worker has 2" in response.json()["error"]


@pytest.mark.parametrize(
    ("fields", "reason", "field"),
    [
        ({"gpu": 1, "gpu_type": "H100"}, "no registered worker has GPUs of type H100", "gpu_type"),
        ({"gpu": 8, "gpu_type": "A100"}, "8 GPUs per node", "gpu"),
        ({"memory_gb": 64}, "64 GB of memory per node", "memory_gb"),
        ({"cpu": 16}, "16 CPU cores per node", "cpu"),
        ({"node_count": 3}, "3 nodes requested; only 2", "node_count"),
    ],
)
def test_each_kind_of_impossible_request_is_named(user_client, fields, reason, field):
    worker(name="a", gpu_count=2, gpu_type="A100")
    worker(name="b", gpu_count=2, gpu_type="A100")

    response = user_client.post(
        "/v1/tasks", {"job_name": "x", "entrypoint": "python train.py", **fields}, format="json"
    )

    assert response.status_code == 422
    assert reason in response.json()["error"]
    assert refused_field(response) == field


def test_needs_each_met_by_some_worker_but_never_by_one_are_named_together(user_client):
    worker(name="gpu-box", gpu_count=1, memory_gb=16)
    worker(name="big-memory", gpu_count=0, memory_gb=23)

    response = user_client.post(
        "/v1/tasks", {"job_name": "x", "entrypoint": "python train.py", "gpu": 1, "memory_gb": 20}, format="json"
    )

    assert response.status_code == 422
    assert response.json()["details"] == [
        {
            "field": None,
            "message": "no registered worker has 1 GPU, 20 GB of memory and a batch slot at once; "
            "set allow_unschedulable to true to queue it anyway.",
        }
    ]


def test_allow_unschedulable_queues_it_anyway(user_client):
    worker(gpu_count=2)
    body = {"job_name": "huge", "entrypoint": "python train.py", "gpu": 8, "allow_unschedulable": True}
    assert user_client.post("/v1/tasks", body, format="json").status_code == 201


def test_any_task_is_accepted_before_the_first_worker_registers(user_client):
    assert not Worker.objects.exists()
    assert (
        user_client.post(
            "/v1/tasks", {"job_name": "early", "entrypoint": "python train.py", "gpu": 8}, format="json"
        ).status_code
        == 201
    )


def test_offline_workers_still_count_as_registered_capacity(user_client):
    worker(gpu_count=8, status=Worker.Status.OFFLINE)
    assert (
        user_client.post(
            "/v1/tasks", {"job_name": "x", "entrypoint": "python train.py", "gpu": 8}, format="json"
        ).status_code
        == 201
    )


def test_owners_submit_with_a_reservation_named_in_the_body(user_client, user):
    worker(gpu_count=4)
    booked = user_client.post(RESERVATIONS, {"gpu_count": 4}, format="json").json()
    body = {"job_name": "big", "entrypoint": "python train.py", "gpu": 4, "reservation_id": booked["id"]}

    response = user_client.post("/v1/tasks", body, format="json")

    assert response.status_code == 201
    assert response.json()["reservation_id"] == booked["id"]
