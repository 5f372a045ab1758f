"""POST /v1/tasks, GET/DELETE /v1/tasks/{taskId}: roles, tenant isolation, cancel semantics."""

import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from artifacts.tests.factories import DatasetFactory, SnapshotFactory
from audit.models import AuditEvent
from conftest import KeyClient
from plugins.models import PluginConfig
from scheduler.models import NodeAssignment
from tasks.models import Task
from tasks.states import TaskStatus
from tasks.tests.factories import (
    ExperimentFactory,
    NodeAssignmentFactory,
    ReservationFactory,
    TaskFactory,
    WorkerFactory,
)

pytestmark = pytest.mark.django_db

SPEC_TASK_FIELDS = {
    "id", "job_name", "status", "priority", "created_at", "started_at", "ended_at", "worker_id", "error",
    "output", "entrypoint", "snapshot_id", "datasets", "cpu", "memory_gb", "gpu", "user_id", "retry_count",
    "max_retries", "plugin_status", "node_assignments", "priority_aged",
}  # fmt: skip
FETCHML_TASK_FIELDS = {
    "args", "metadata", "dataset_specs", "env", "gpu_type", "node_count", "reservation_id", "experiment_id",
    "kind", "attempt", "exit_code", "failure_reason", "timeout_seconds", "cancel_grace_seconds",
    "cancel_requested", "cancelled_by", "queued_at", "updated_at",
}  # fmt: skip


def audit_events(event_type: str, task_id) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(event_type=event_type, resource=f"task:{task_id}"))


# --- authentication and roles ------------------------------------------------

ENDPOINTS = [
    ("get", "/v1/tasks"),
    ("post", "/v1/tasks"),
    ("get", f"/v1/tasks/{uuid.uuid4()}"),
    ("delete", f"/v1/tasks/{uuid.uuid4()}"),
    ("get", "/v1/queue"),
    ("get", "/v1/experiments"),
    ("post", "/v1/experiments"),
]


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
def test_request_without_api_key_is_unauthorized(anon_client, method, path):
    response = getattr(anon_client, method)(path, {}, format="json")
    assert response.status_code == 401
    assert response.json()["code"] == "UNAUTHORIZED"


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
def test_request_with_unknown_api_key_is_unauthorized(db, method, path):
    client = KeyClient("fetchml_abcdefghij_" + "x" * 40)
    response = getattr(client, method)(path, {}, format="json")
    assert response.status_code == 401


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
def test_worker_key_is_forbidden(worker_key, method, path):
    response = getattr(KeyClient(worker_key), method)(path, {}, format="json")
    assert response.status_code == 403
    assert response.json()["code"] == "FORBIDDEN"


# --- submission ---------------------------------------------------------------


def test_submit_minimal_task_queues_it_with_defaults(user_client, user):
    response = user_client.post("/v1/tasks", {"job_name": "train-1", "entrypoint": "python train.py"}, format="json")
    assert response.status_code == 201
    body = response.json()
    assert body["status"] == "queued"
    assert body["priority"] == 5
    assert body["user_id"] == "alice"
    assert body["node_count"] == 1
    assert body["cancel_requested"] is False
    task = Task.objects.get(id=body["id"])
    assert task.owner == user
    assert task.job_name == "train-1"


def test_submit_records_job_queued_audit_event(user_client):
    body = user_client.post(
        "/v1/tasks", {"job_name": "train-1", "entrypoint": "python train.py", "priority": 7}, format="json"
    ).json()
    [event] = audit_events("job_queued", body["id"])
    assert event.user_id == "alice"
    assert event.metadata["priority"] == 7


def test_submit_is_rolled_back_when_its_audit_event_cannot_be_written(user_client, monkeypatch):
    def broken_record(**kwargs):
        raise RuntimeError("audit store unavailable")

    monkeypatch.setattr("tasks.services.record", broken_record)
    response = user_client.post("/v1/tasks", {"job_name": "train-1", "entrypoint": "python train.py"}, format="json")
    assert response.status_code == 500
    assert not Task.objects.exists()


def test_submit_stores_every_fetchml_extension(user_client, user):
    experiment = ExperimentFactory(owner=user)
    reservation = ReservationFactory(owner=user, gpu_count=2, gpu_type="a100", node_count=2)
    snapshot = SnapshotFactory(uploaded_by=[user])
    DatasetFactory(owner=user, name="mnist")
    PluginConfig.objects.create(name="tensorboard", enabled=True, mode="sidecar")  # a task may tune enabled ones
    payload = {
        "job_name": "big_run-2",
        "priority": 9,
        "args": "--epochs 10",
        "entrypoint": "train.py",
        "snapshot_id": snapshot.sha256,
        "datasets": ["mnist"],
        "dataset_specs": [
            {"name": "mnist", "source": "https://data.example/mnist", "sha256": "a" * 64, "mount_path": "data/m"}
        ],
        "cpu": 8,
        "memory_gb": 32,
        "gpu": 2,
        "metadata": {"team": "vision"},
        "experiment_id": str(experiment.id),
        "env": {"SEED": "1"},
        "gpu_type": "a100",
        "node_count": 2,
        "reservation_id": str(reservation.id),
        "plugin_configs": {"tensorboard": {"enabled": True, "settings": {"log_subdir": "runs"}}},
        "timeout_seconds": 3600,
        "max_retries": 0,
        "retry_on_exit_code": True,
        "cancel_grace_seconds": 5,
        "allow_unschedulable": True,
    }
    response = user_client.post("/v1/tasks", payload, format="json")
    assert response.status_code == 201, response.json()
    body = response.json()
    for name in ("args", "snapshot_id", "datasets", "dataset_specs", "metadata", "env", "gpu_type", "node_count"):
        assert body[name] == payload[name]
    assert body["experiment_id"] == str(experiment.id)
    assert body["reservation_id"] == str(reservation.id)
    task = Task.objects.get(id=body["id"])
    assert task.plugin_configs == {"tensorboard": {"enabled": True, "settings": {"log_subdir": "runs"}}}
    assert (task.timeout_seconds, task.max_retries, task.cancel_grace_seconds) == (3600, 0, 5)
    assert task.retry_on_exit_code is True
    assert task.allow_unschedulable is True


def test_higher_priority_sorts_before_an_older_lower_priority_task(user_client):
    low = user_client.post(
        "/v1/tasks", {"job_name": "low", "entrypoint": "python train.py", "priority": 1}, format="json"
    ).json()
    high = user_client.post(
        "/v1/tasks", {"job_name": "high", "entrypoint": "python train.py", "priority": 9}, format="json"
    ).json()
    assert Task.objects.get(id=high["id"]).dispatch_key > Task.objects.get(id=low["id"]).dispatch_key
    assert high["priority_aged"] > low["priority_aged"]


def test_submit_with_another_users_reservation_is_invalid(user_client, other_user):
    reservation = ReservationFactory(owner=other_user)
    response = user_client.post(
        "/v1/tasks",
        {"job_name": "j", "entrypoint": "python train.py", "reservation_id": str(reservation.id)},
        format="json",
    )
    assert response.status_code == 422
    assert response.json()["details"][0]["field"] == "reservation_id"
    assert not Task.objects.exists()


def test_submit_with_expired_reservation_is_invalid(user_client, user):
    reservation = ReservationFactory(
        owner=user, starts_at=timezone.now() - timedelta(hours=2), expires_at=timezone.now() - timedelta(hours=1)
    )
    response = user_client.post(
        "/v1/tasks",
        {"job_name": "j", "entrypoint": "python train.py", "reservation_id": str(reservation.id)},
        format="json",
    )
    assert response.status_code == 422


def test_submit_with_unknown_reservation_is_invalid(user_client):
    response = user_client.post(
        "/v1/tasks",
        {"job_name": "j", "entrypoint": "python train.py", "reservation_id": str(uuid.uuid4())},
        format="json",
    )
    assert response.status_code == 422


def test_submit_into_another_users_experiment_is_invalid(user_client, other_user):
    experiment = ExperimentFactory(owner=other_user)
    response = user_client.post(
        "/v1/tasks",
        {"job_name": "j", "entrypoint": "python train.py", "experiment_id": str(experiment.id)},
        format="json",
    )
    assert response.status_code == 422
    assert response.json()["details"][0]["field"] == "experiment_id"


# --- reading one task ---------------------------------------------------------


def test_task_detail_has_every_spec_and_fetchml_field(user_client, user):
    task = TaskFactory(owner=user)
    body = user_client.get(f"/v1/tasks/{task.id}").json()
    assert set(body) >= SPEC_TASK_FIELDS | FETCHML_TASK_FIELDS
    assert body["id"] == str(task.id)


def test_queued_task_detail_says_where_it_is_in_the_queue_and_why(user_client, user):
    WorkerFactory(gpu_count=0, batch_slots=1)
    ahead = TaskFactory(owner=user, priority=9)
    task = TaskFactory(owner=user, priority=2, gpu=2)

    body = user_client.get(f"/v1/tasks/{task.id}").json()

    assert ahead.status == TaskStatus.QUEUED
    assert body["queue_position"] == 1
    assert body["pending_reason"] == "no active worker has 2 GPUs; it waits until one connects"


def test_started_task_detail_has_no_queue_position(user_client, user):
    task = TaskFactory(owner=user, status=TaskStatus.RUNNING, started_at=timezone.now())

    body = user_client.get(f"/v1/tasks/{task.id}").json()

    assert (body["queue_position"], body["pending_reason"]) == (None, "")


def test_task_of_another_user_is_not_found(user_client, other_user):
    task = TaskFactory(owner=other_user)
    response = user_client.get(f"/v1/tasks/{task.id}")
    assert response.status_code == 404
    assert response.json()["code"] == "NOT_FOUND"


def test_other_user_cannot_see_my_task(other_client, user):
    task = TaskFactory(owner=user)
    assert other_client.get(f"/v1/tasks/{task.id}").status_code == 404


def test_admin_sees_any_users_task(admin_client_key, user):
    task = TaskFactory(owner=user)
    response = admin_client_key.get(f"/v1/tasks/{task.id}")
    assert response.status_code == 200
    assert response.json()["user_id"] == "alice"


def test_unknown_task_id_is_not_found(user_client):
    assert user_client.get(f"/v1/tasks/{uuid.uuid4()}").status_code == 404


def test_malformed_task_id_is_not_found(user_client):
    response = user_client.get("/v1/tasks/not-a-uuid")
    assert response.status_code == 404
    assert response.json()["code"] == "NOT_FOUND"


def test_node_assignments_show_only_the_current_attempt(user_client, user):
    task = TaskFactory(owner=user, status=TaskStatus.RUNNING, attempt=2)
    worker = WorkerFactory()
    NodeAssignmentFactory(task=task, attempt=1, worker=worker, holds_capacity=False)
    NodeAssignmentFactory(task=task, attempt=2, node_id=0, worker=worker)
    NodeAssignmentFactory(task=task, attempt=2, node_id=1, worker=worker)
    Task.objects.filter(id=task.id).update(worker=worker)
    body = user_client.get(f"/v1/tasks/{task.id}").json()
    assert body["node_assignments"] == [
        {"node_id": 0, "worker_id": str(worker.id), "slot_assigned": True},
        {"node_id": 1, "worker_id": str(worker.id), "slot_assigned": True},
    ]
    assert body["worker_id"] == str(worker.id)
    assert NodeAssignment.objects.filter(task=task).count() == 3


def test_queued_task_priority_ages_with_waiting_time(user_client, user):
    hours_ago = timezone.now() - timedelta(hours=3)
    task = TaskFactory(owner=user, priority=2, created_at=hours_ago, queued_at=hours_ago)
    body = user_client.get(f"/v1/tasks/{task.id}").json()
    # default aging is 1 priority point per hour
    assert 4.99 < body["priority_aged"] < 5.01


# --- cancel -----------------------------------------------------------------


def test_cancel_of_queued_task_cancels_it_at_once(user_client, user):
    task = TaskFactory(owner=user)
    response = user_client.delete(f"/v1/tasks/{task.id}")
    assert response.status_code == 204
    task.refresh_from_db()
    assert task.status == TaskStatus.CANCELLED
    assert task.cancelled_by == user
    assert task.ended_at is not None


def test_cancel_of_a_task_waiting_to_retry_shows_no_outcome_of_the_attempt_before(user_client, user):
    task = TaskFactory(
        owner=user,
        attempt=1,
        retry_count=1,
        exit_code=9,
        error="exited with code 9",
        output="partial",
        failure_reason="",
    )

    user_client.delete(f"/v1/tasks/{task.id}")

    body = user_client.get(f"/v1/tasks/{task.id}").json()
    assert (body["status"], body["failure_reason"]) == ("cancelled", "cancelled")
    assert (body["exit_code"], body["error"], body["output"]) == (None, "", "")


def test_cancel_of_queued_task_records_job_cancelled(user_client, user):
    task = TaskFactory(owner=user)
    user_client.delete(f"/v1/tasks/{task.id}")
    [event] = audit_events("job_cancelled", task.id)
    assert event.user_id == "alice"


@pytest.mark.parametrize("status", [TaskStatus.PREPARING, TaskStatus.RUNNING, TaskStatus.COLLECTING])
def test_cancel_of_active_task_requests_cancellation(user_client, user, status):
    task = TaskFactory(owner=user, status=status)
    response = user_client.delete(f"/v1/tasks/{task.id}")
    assert response.status_code == 204
    body = user_client.get(f"/v1/tasks/{task.id}").json()
    assert body["status"] == status
    assert body["cancel_requested"] is True
    assert body["cancelled_by"] == "alice"


@pytest.mark.parametrize("status", [TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED])
def test_cancel_of_finished_task_is_conflict(user_client, user, status):
    task = TaskFactory(owner=user, status=status, ended_at=timezone.now())
    response = user_client.delete(f"/v1/tasks/{task.id}")
    assert response.status_code == 409
    assert response.json()["code"] == "CONFLICT"
    task.refresh_from_db()
    assert task.status == status


def test_cancel_of_another_users_task_is_not_found_and_changes_nothing(other_client, user):
    task = TaskFactory(owner=user)
    assert other_client.delete(f"/v1/tasks/{task.id}").status_code == 404
    task.refresh_from_db()
    assert task.status == TaskStatus.QUEUED
    assert not audit_events("job_cancelled", task.id)


def test_admin_can_cancel_any_users_task(admin_client_key, user, admin_user):
    task = TaskFactory(owner=user)
    assert admin_client_key.delete(f"/v1/tasks/{task.id}").status_code == 204
    task.refresh_from_db()
    assert task.status == TaskStatus.CANCELLED
    assert task.cancelled_by == admin_user


def test_submit_with_a_snapshot_nobody_uploaded_is_refused_with_the_field(user_client):
    response = user_client.post(
        "/v1/tasks", {"job_name": "j", "entrypoint": "python train.py", "snapshot_id": "f" * 64}, format="json"
    )

    assert response.status_code == 422
    assert response.json()["details"][0]["field"] == "snapshot_id"
    assert not Task.objects.exists()


def test_submit_with_a_snapshot_only_another_user_uploaded_is_refused(user_client, other_user):
    snapshot = SnapshotFactory(uploaded_by=[other_user])

    response = user_client.post(
        "/v1/tasks", {"job_name": "j", "entrypoint": "python train.py", "snapshot_id": snapshot.sha256}, format="json"
    )

    assert response.status_code == 422
    assert not Task.objects.exists()
