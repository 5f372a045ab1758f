import hashlib
import io
import threading
import time

import pytest
from django.db import connection, connections, transaction

from artifacts.models import Artifact
from artifacts.services import artifact_upload
from artifacts.tests.factories import live_run, stored_files, worker_key_pair
from conftest import requires_postgres
from fetchml.auth import Actor
from fetchml.errors import PayloadTooLarge
from scheduler.models import NodeAssignment

pytestmark = [requires_postgres, pytest.mark.django_db(transaction=True)]


def _wait_for_lock_waiter(timeout: float = 10.0) -> None:
    """Until some other session waits on a row lock (the upload blocked on the assignment)."""
    deadline = time.monotonic() + timeout
    with connection.cursor() as cursor:
        while time.monotonic() < deadline:
            cursor.execute("SELECT count(*) FROM pg_locks WHERE NOT granted AND pid <> pg_backend_pid()")
            if cursor.fetchone()[0]:
                return
    raise AssertionError("the upload never waited on the assignment lock")


def test_parallel_uploads_cannot_overrun_the_task_budget_together(settings, storage_dir):
    settings.FETCHML_MAX_ARTIFACT_BYTES_PER_TASK = 100
    key, _ = worker_key_pair()
    run = live_run(key=key)
    actor = Actor(user=key.user, role="worker")
    data = b"b" * 60
    outcome: list[BaseException | Artifact] = []

    def second_upload() -> None:
        try:
            outcome.append(
                artifact_upload(
                    actor=actor,
                    task_id=run.task_id,
                    token=run.token,
                    path="second.bin",
                    expected_sha256=hashlib.sha256(data).hexdigest(),
                    stream=io.BytesIO(data),
                    declared_length=len(data),
                )
            )
        except BaseException as exc:
            outcome.append(exc)
        finally:
            connections.close_all()

    # A first upload holds the assignment lock, its 60 bytes not yet committed,
    # while the second (which saw an empty budget) streams in and reaches the lock.
    with transaction.atomic():
        NodeAssignment.objects.select_for_update().get(pk=run.pk)
        Artifact.objects.create(
            task_id=run.task_id, attempt=1, path="first.bin", size=60, sha256="a" * 64, storage_key="first"
        )
        thread = threading.Thread(target=second_upload)
        thread.start()
        _wait_for_lock_waiter()
    thread.join(timeout=30)

    assert len(outcome) == 1 and isinstance(outcome[0], PayloadTooLarge)
    assert list(Artifact.objects.values_list("path", flat=True)) == ["first.bin"]
    assert stored_files(storage_dir) == []
