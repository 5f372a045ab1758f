"""A dispatch round inside the submitting transaction (FETCHML_DISPATCH_ON_SUBMIT, on by default)."""

import asyncio
import logging

import psycopg
import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import connection
from django.test.utils import CaptureQueriesContext

from audit.models import AuditEvent
from audit.tests.factories import append_events
from audit.verification import verify_chain
from conftest import requires_postgres
from fetchml import events
from fetchml.auth import Actor
from jupyter.services import jupyter_start
from scheduler import dispatch
from scheduler.models import NodeAssignment, Worker
from scheduler.tests.factories import assignments_of, queued_task, worker
from tasks.models import Task
from tasks.services import task_submit
from tasks.states import TaskStatus

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("channel_layer")]

SENTINEL = {"type": "test.sentinel"}


def _listening(group: str) -> str:
    layer = get_channel_layer()
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(group, channel)
    return channel


def _received_until_sentinel(channel: str) -> list[dict]:
    """What reached `channel` before a sentinel sent now (a channel's messages arrive in order)."""

    async def receive_all() -> list[dict]:
        layer = get_channel_layer()
        await layer.send(channel, SENTINEL)
        received = []
        while (message := await asyncio.wait_for(layer.receive(channel), timeout=10)) != SENTINEL:
            received.append(message)
        return received

    return async_to_sync(receive_all)()


def test_task_submitted_while_a_worker_is_free_leaves_the_submission_assigned(user):
    box = worker(batch_slots=1)

    task = task_submit(owner=user, job_name="now", entrypoint="true")

    assert task.status == TaskStatus.PREPARING
    stored = Task.objects.get(id=task.id)
    answered = [(t.status, t.attempt, t.worker_id, t.updated_at) for t in (task, stored)]
    assert answered[0] == answered[1]
    assert [run.worker_id for run in assignments_of(task)] == [box.id]
    assert Worker.objects.get(id=box.id).used_batch_slots == 1
    assert AuditEvent.objects.filter(resource=f"task:{task.id}", event_type="job_started", action="assign").exists()


def test_the_assign_leaves_on_the_submissions_commit(user, django_capture_on_commit_callbacks):
    box = worker(batch_slots=1)
    to_worker = _listening(events.worker_group(box.id))

    with django_capture_on_commit_callbacks(execute=True):
        task = task_submit(owner=user, job_name="now", entrypoint="true")

    (notice,) = _received_until_sentinel(to_worker)
    assert [assign["task_id"] for assign in events.assigns_of(notice)] == [str(task.id)]


def test_a_task_placed_at_submission_does_not_wake_the_scheduler(user, django_capture_on_commit_callbacks):
    worker(batch_slots=1)
    scheduler = _listening(events.WAKE_GROUP)

    with django_capture_on_commit_callbacks(execute=True):
        task_submit(owner=user, job_name="now", entrypoint="true")

    assert _received_until_sentinel(scheduler) == []


def test_a_task_without_a_free_worker_stays_queued_and_wakes_the_scheduler(user, django_capture_on_commit_callbacks):
    worker(batch_slots=1, used_batch_slots=1)
    scheduler = _listening(events.WAKE_GROUP)

    with django_capture_on_commit_callbacks(execute=True):
        task = task_submit(owner=user, job_name="later", entrypoint="true")

    assert task.status == TaskStatus.QUEUED
    assert [message["reason"] for message in _received_until_sentinel(scheduler)] == ["task_submitted"]


def test_a_free_worker_goes_to_the_best_runnable_task_not_to_the_one_submitted(user):
    worker(batch_slots=1)
    urgent = queued_task(priority=9)

    submitted = task_submit(owner=user, job_name="routine", entrypoint="true", priority=5)

    urgent.refresh_from_db()
    assert (urgent.status, submitted.status) == (TaskStatus.PREPARING, TaskStatus.QUEUED)


def test_the_submissions_event_and_the_rounds_are_appended_under_one_lock_of_the_chain_head(user):
    worker(batch_slots=1)
    append_events(1)  # the chain's head exists (the first append of a database creates it)

    with CaptureQueriesContext(connection) as queries:
        task = task_submit(owner=user, job_name="now", entrypoint="true")

    # Read FOR UPDATE on PostgreSQL; on SQLite the write lock taken at BEGIN covers it.
    head_reads = [query for query in queries if query["sql"].startswith("SELECT") and "audit_chainhead" in query["sql"]]
    assert len(head_reads) == 1
    events_of_task = AuditEvent.objects.filter(resource=f"task:{task.id}").order_by("sequence_num")
    assert [(event.event_type, event.action) for event in events_of_task] == [
        ("job_queued", "submit"),
        ("job_started", "assign"),
    ]
    assert verify_chain().valid


def test_a_failed_round_leaves_the_submission_queued_with_nothing_of_the_round_sent(
    user, monkeypatch, django_capture_on_commit_callbacks
):
    box = worker(batch_slots=1)
    to_worker = _listening(events.worker_group(box.id))
    scheduler = _listening(events.WAKE_GROUP)
    write = dispatch._write

    def written_then_failed(*args, **kwargs):
        write(*args, **kwargs)  # the assignment written and its `assign` queued for the commit
        raise RuntimeError("lost the database mid-round")

    monkeypatch.setattr(dispatch, "_write", written_then_failed)

    with django_capture_on_commit_callbacks(execute=True):
        task = task_submit(owner=user, job_name="kept", entrypoint="true")

    task.refresh_from_db()
    assert task.status == TaskStatus.QUEUED
    assert not NodeAssignment.objects.exists()
    assert Worker.objects.get(id=box.id).used_batch_slots == 0
    assert AuditEvent.objects.filter(resource=f"task:{task.id}", event_type="job_queued").exists()
    assert not AuditEvent.objects.filter(event_type="job_started").exists()
    assert _received_until_sentinel(to_worker) == []
    assert [message["reason"] for message in _received_until_sentinel(scheduler)] == ["task_submitted"]


def test_a_jupyter_service_started_while_a_slot_is_free_is_assigned_with_its_service(
    user, django_capture_on_commit_callbacks
):
    box = worker(service_slots=1)
    to_worker = _listening(events.worker_group(box.id))

    with django_capture_on_commit_callbacks(execute=True):
        service = jupyter_start(actor=Actor(user=user, role="user"), name="nb")

    (notice,) = _received_until_sentinel(to_worker)
    (assign,) = events.assigns_of(notice)
    assert assign["task_id"] == str(service.task_id)
    assert assign["service"]["service_id"] == str(service.id)


def test_with_dispatch_on_submit_off_the_task_waits_for_the_scheduler(user, settings):
    settings.FETCHML_DISPATCH_ON_SUBMIT = False
    worker(batch_slots=1)

    task = task_submit(owner=user, job_name="later", entrypoint="true")

    assert task.status == TaskStatus.QUEUED
    assert not NodeAssignment.objects.exists()


def test_api_submission_answers_with_the_task_already_assigned(user_client):
    worker(batch_slots=1)

    response = user_client.post("/v1/tasks", {"job_name": "now", "entrypoint": "true"}, format="json")

    assert response.status_code == 201, response.content
    assert response.json()["status"] == TaskStatus.PREPARING


@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_a_submission_passes_over_a_worker_a_scheduler_holds_instead_of_waiting(user, caplog):
    box = worker(batch_slots=1)
    db = connection.settings_dict
    holder = psycopg.connect(host=db["HOST"], port=db["PORT"] or 5432, user=db["USER"], dbname=db["NAME"])
    try:
        # A scheduler's round in progress: the worker's row is locked until it commits.
        holder.execute(f"SELECT id FROM {Worker._meta.db_table} WHERE id = %s FOR UPDATE", [box.id])
        with connection.cursor() as cursor:
            cursor.execute("SET lock_timeout = '5s'")  # were it to wait, the round would fail and log it

        task = task_submit(owner=user, job_name="waits", entrypoint="true")
    finally:
        holder.close()

    assert task.status == TaskStatus.QUEUED
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
