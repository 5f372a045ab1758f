"""POST /v1/tasks with an Idempotency-Key: one task per (API key, key), whatever the retries."""

import threading
import time
from datetime import timedelta

import pytest
from django.db import close_old_connections, connection, transaction
from django.test import override_settings
from django.utils import timezone

from audit.models import AuditEvent
from conftest import KeyClient, requires_postgres
from fetchml.auth import Actor
from fetchml.tests.factories import ApiKeyFactory, UserFactory
from tasks.models import IdempotencyRecord, Task
from tasks.services import idempotency_prune, task_submit_idempotent

pytestmark = pytest.mark.django_db

BODY = {"job_name": "train", "entrypoint": "python train.py", "priority": 7, "metadata": {"a": "1", "b": "2"}}


def post(client, body=BODY, key="key-1"):
    return client.post("/v1/tasks", body, format="json", HTTP_IDEMPOTENCY_KEY=key)


def test_first_request_creates_the_task_without_replay_header(user_client):
    response = post(user_client)
    assert response.status_code == 201
    assert "Idempotent-Replayed" not in response
    assert Task.objects.count() == 1


def test_replay_with_same_body_returns_the_same_task(user_client):
    first = post(user_client)
    replay = post(user_client)
    assert replay.status_code == 201
    assert replay["Idempotent-Replayed"] == "true"
    assert replay.json()["id"] == first.json()["id"]
    assert Task.objects.count() == 1


def test_replay_does_not_audit_a_second_submission(user_client):
    post(user_client)
    post(user_client)
    assert AuditEvent.objects.filter(event_type="job_queued").count() == 1


def test_replay_with_keys_in_another_order_is_the_same_body(user_client):
    first = post(user_client)
    reordered = {"metadata": {"b": "2", "a": "1"}, "priority": 7, "entrypoint": "python train.py", "job_name": "train"}
    replay = post(user_client, reordered)
    assert replay.json()["id"] == first.json()["id"]


def test_replay_shows_the_tasks_current_state(user_client):
    first = post(user_client).json()
    user_client.delete(f"/v1/tasks/{first['id']}")
    assert post(user_client).json()["status"] == "cancelled"


def test_same_key_with_different_body_is_invalid(user_client):
    post(user_client)
    response = post(user_client, {**BODY, "priority": 8})
    assert response.status_code == 422
    assert response.json()["details"][0]["field"] == "Idempotency-Key"
    assert Task.objects.count() == 1


def test_different_idempotency_keys_create_different_tasks(user_client):
    assert post(user_client, key="a").json()["id"] != post(user_client, key="b").json()["id"]


def test_same_key_under_another_api_key_of_the_same_user_is_a_separate_task(user_client, user):
    second_client = KeyClient(ApiKeyFactory.raw(user=user))
    first = post(user_client)
    second = post(second_client)
    assert second.status_code == 201
    assert "Idempotent-Replayed" not in second
    assert second.json()["id"] != first.json()["id"]


def test_same_key_of_another_user_is_a_separate_task(user_client, other_client):
    first = post(user_client)
    second = post(other_client)
    assert second.json()["id"] != first.json()["id"]
    assert second.json()["user_id"] == "bob"


def test_invalid_body_leaves_the_key_unused(user_client):
    assert post(user_client, {"job_name": "bad name", "entrypoint": "python train.py"}).status_code == 422
    assert not IdempotencyRecord.objects.exists()
    assert post(user_client).status_code == 201


@override_settings(FETCHML_IDEMPOTENCY_TTL_HOURS=1)
def test_record_older_than_ttl_is_ignored_and_pruned(user_client):
    first = post(user_client).json()
    IdempotencyRecord.objects.update(created_at=timezone.now() - timedelta(hours=2))
    second = post(user_client, {**BODY, "priority": 3})
    assert second.status_code == 201
    assert second.json()["id"] != first["id"]
    assert list(IdempotencyRecord.objects.values_list("task_id", flat=True)) == [Task.objects.get(priority=3).id]


@override_settings(FETCHML_IDEMPOTENCY_TTL_HOURS=1)
def test_prune_deletes_only_expired_records(user_client):
    post(user_client, key="old")
    post(user_client, key="new")
    IdempotencyRecord.objects.filter(key="old").update(created_at=timezone.now() - timedelta(hours=2))
    assert idempotency_prune() == 1
    assert list(IdempotencyRecord.objects.values_list("key", flat=True)) == ["new"]


def test_key_of_255_characters_is_accepted(user_client):
    assert post(user_client, key="k" * 255).status_code == 201


@pytest.mark.parametrize("key", ["", "k" * 256, "tab\there"])
def test_malformed_idempotency_key_is_bad_request(user_client, key):
    response = post(user_client, key=key)
    assert response.status_code == 400
    assert response.json()["details"][0]["field"] == "Idempotency-Key"
    assert not Task.objects.exists()


def test_idempotency_key_needs_api_key_authentication(user):
    client = KeyClient()
    client.force_authenticate(user=user)
    response = post(client)
    assert response.status_code == 400
    assert not Task.objects.exists()


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def _blocked_lock_waiters() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_locks WHERE NOT granted")
        return cursor.fetchone()[0]


@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_concurrent_first_requests_create_one_task():
    """B reads 'no record' while A's insert is uncommitted, then loses on the unique constraint."""
    user = UserFactory(username="carol")
    api_key = ApiKeyFactory.create(user=user)
    actor = Actor(user=user, role="user", api_key_id=str(api_key.id))
    arguments = {"owner": user, "actor": actor, "api_key": api_key, "idempotency_key": "k", "body_sha256": "0" * 64}
    a_submitted, release_a = threading.Event(), threading.Event()
    results: dict[str, tuple[Task, bool]] = {}
    errors: list[BaseException] = []

    def first() -> None:
        try:
            with transaction.atomic():
                results["a"] = task_submit_idempotent(
                    fields={"job_name": "a", "entrypoint": "python train.py"}, **arguments
                )
                a_submitted.set()
                assert release_a.wait(10)
        except BaseException as exc:
            errors.append(exc)
            a_submitted.set()
        finally:
            close_old_connections()
            connection.close()

    def second() -> None:
        try:
            results["b"] = task_submit_idempotent(
                fields={"job_name": "a", "entrypoint": "python train.py"}, **arguments
            )
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    thread_a = threading.Thread(target=first)
    thread_a.start()
    assert a_submitted.wait(10)
    thread_b = threading.Thread(target=second)
    thread_b.start()
    try:
        _wait_for(lambda: _blocked_lock_waiters() > 0)  # B is queued behind A's uncommitted rows
    finally:
        release_a.set()
        thread_a.join(10)
        thread_b.join(10)
    assert not errors, errors
    (task_a, replayed_a), (task_b, replayed_b) = results["a"], results["b"]
    assert (replayed_a, replayed_b) == (False, True)
    assert task_b.id == task_a.id
    assert list(Task.objects.values_list("id", flat=True)) == [task_a.id]
