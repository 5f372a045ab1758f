"""How runs end: leases, retries with back-off, failure classes, multi-node, drain, the timeout backstop."""

import asyncio
from datetime import timedelta

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.test import override_settings
from django.utils import timezone

from artifacts.tests.factories import put, worker_key_pair
from audit.models import AuditEvent
from conftest import KeyClient
from fetchml import events
from fetchml.auth import Actor
from fetchml.errors import Conflict
from scheduler import services
from scheduler.dispatch import dispatch_round
from scheduler.models import NodeAssignment, Worker
from scheduler.protocol import outgoing
from scheduler.selectors import cancel_messages
from scheduler.services import (
    assignment_ack,
    assignment_status,
    end_run,
    enforce_timeouts,
    expire_leases,
    retry_backoff_seconds,
    worker_announced_drain,
    worker_drain,
    worker_heartbeat,
    worker_hello,
)
from scheduler.tests.factories import assignments_of, queued_task, run_started, worker
from tasks.models import Task
from tasks.services import task_cancel
from tasks.states import TaskStatus

pytestmark = pytest.mark.django_db

BACKOFF = {"FETCHML_RETRY_BACKOFF_BASE_SECONDS": 10.0, "FETCHML_RETRY_BACKOFF_MAX_SECONDS": 600.0}


def _report(assignment: NodeAssignment, status: str, **fields):
    return assignment_status(
        worker_id=assignment.worker_id,
        task_id=str(assignment.task_id),
        token=str(assignment.token),
        status=status,
        **fields,
    )


def _silence(box: Worker, seconds: float = 3600) -> None:
    Worker.objects.filter(id=box.id).update(last_heartbeat=timezone.now() - timedelta(seconds=seconds))


def _running_gang(**fields) -> tuple[Task, NodeAssignment, NodeAssignment]:
    """A two-node task placed on workers node-0 and node-1, rank 0 reported running."""
    worker(name="node-0")
    worker(name="node-1")
    gang = queued_task(node_count=2, **fields)
    dispatch_round()
    rank0, rank1 = assignments_of(gang)
    _report(rank0, "running")
    return gang, rank0, rank1


async def _status_event(layer, channel: str, event: str) -> dict:
    """The next status event `event` that reached `channel` (a bounded wait)."""
    async with asyncio.timeout(5):
        while True:
            message = await layer.receive(channel)
            if message.get("event") == event:
                return message


@override_settings(**BACKOFF)
def test_lease_expiry_requeues_the_run_with_a_retry_and_back_off():
    box = worker(cpu_cores=8)
    task = queued_task(cpu=4)
    assignment = run_started(task)
    _silence(box)
    before = timezone.now()

    assert expire_leases() >= 1

    task.refresh_from_db()
    box.refresh_from_db()
    assignment.refresh_from_db()
    assert (task.status, task.retry_count, task.failure_reason, task.worker_id) == ("queued", 1, "worker_lost", None)
    assert before + timedelta(seconds=10) <= task.runnable_after <= timezone.now() + timedelta(seconds=12.5)
    assert (box.status, box.used_cpu, box.used_batch_slots) == ("offline", 0, 0)
    assert (assignment.status, assignment.holds_capacity) == ("lost", False)


def test_lease_expiry_hands_a_run_never_acknowledged_back_without_a_retry():
    box = worker()
    task = queued_task(max_retries=0)
    dispatch_round()
    _silence(box)

    assert expire_leases() >= 1

    task.refresh_from_db()
    assert (task.status, task.retry_count, task.failure_reason, task.runnable_after) == ("queued", 0, "", None)
    [event] = AuditEvent.objects.filter(event_type="job_requeued", action="handed_back")
    assert event.metadata["reason"] == "worker lost before acknowledging the run"


def test_lease_expiry_ends_a_run_never_acknowledged_cancelled_when_a_cancel_is_pending():
    box = worker()
    task = queued_task()
    dispatch_round()
    task_cancel(task=Task.objects.get(id=task.id), actor=Actor(user=task.owner, role="user"))
    _silence(box)

    assert expire_leases() >= 1

    task.refresh_from_db()
    assert (task.status, task.failure_reason, task.retry_count) == ("cancelled", "cancelled", 0)


def test_a_run_whose_worker_said_hello_again_after_its_lease_expired_is_kept(monkeypatch):
    # The lease expired; before its runs were ended one by one, the agent came back and was told to keep them.
    box = worker()
    task = queued_task()
    dispatch_round()
    [assignment] = assignments_of(task)
    _report(assignment, "running")
    _silence(box)
    lose_run = services._lose_run

    def hello_first(*args, **kwargs):
        welcome = worker_hello(
            name=box.name,
            api_key_id=box.api_key_id,
            agent_version="1",
            hostname="",
            capabilities={},
            channel_name="again",
            running=[{"task_id": str(task.id), "token": str(assignment.token), "status": "running"}],
        )
        assert welcome.keep == [str(assignment.token)]
        return lose_run(*args, **kwargs)

    monkeypatch.setattr(services, "_lose_run", hello_first)

    expire_leases()

    task.refresh_from_db()
    assignment.refresh_from_db()
    assert (task.status, task.retry_count) == ("running", 0)
    assert (assignment.status, assignment.holds_capacity) == ("running", True)


def test_a_drain_ends_a_gang_as_lost_when_a_node_another_node_started_by_is_never_acknowledged():
    # The draining agent will never start its node, and goes on heartbeating while it finishes
    # its other runs: the lease would not end the gang, whose started node waits for it in vain.
    worker(name="node-0")
    draining = worker(name="node-1")
    gang = queued_task(node_count=2)
    dispatch_round()
    [unacknowledged] = [run for run in assignments_of(gang) if run.worker_id == draining.id]
    [started] = [run for run in assignments_of(gang) if run.worker_id != draining.id]
    _report(started, "running")

    assert worker_announced_drain(worker_id=draining.id) == 1

    for row in (unacknowledged, started, gang, draining):
        row.refresh_from_db()
    assert (unacknowledged.status, unacknowledged.holds_capacity) == ("lost", False)
    assert started.holds_capacity  # wound down as a cancel would, with its grace
    assert (gang.status, gang.failure_reason) == ("running", "worker_lost")  # ends with its last node
    assert gang.error == f"node {unacknowledged.node_id} (worker node-1): worker draining"
    assert draining.status == "offline"


def test_requeued_task_keeps_its_place_in_the_aging_order():
    worker()
    task = queued_task(queued_at=timezone.now() - timedelta(hours=1))
    key = task.dispatch_key
    box = Worker.objects.get()
    run_started(task)
    _silence(box)

    expire_leases()

    task.refresh_from_db()
    assert task.dispatch_key == key and task.queued_at < timezone.now() - timedelta(minutes=59)


# Far past any lease: heartbeats and leases read on host clocks this far apart would disagree.
SKEW = timedelta(hours=1)


def test_a_scheduler_whose_clock_runs_ahead_expires_no_worker_that_heartbeats(monkeypatch):
    box = worker()
    worker_heartbeat(worker_id=box.id, running=[])
    ahead = timezone.now() + SKEW
    monkeypatch.setattr(timezone, "now", lambda: ahead)

    assert expire_leases() == 0


def test_heartbeats_heard_by_a_server_whose_clock_runs_behind_keep_the_lease(monkeypatch):
    box = worker()
    behind = timezone.now() - SKEW
    with monkeypatch.context() as skewed:
        skewed.setattr(timezone, "now", lambda: behind)
        worker_heartbeat(worker_id=box.id, running=[])

    assert expire_leases() == 0


def test_lease_expiry_with_retries_exhausted_fails_the_task_as_worker_lost():
    box = worker()
    task = queued_task(max_retries=1, retry_count=1)
    run_started(task)
    _silence(box)

    expire_leases()

    task.refresh_from_db()
    assert (task.status, task.failure_reason) == ("failed", "worker_lost")


def test_worker_with_a_fresh_heartbeat_keeps_its_lease():
    box = worker()
    task = queued_task()
    run_started(task)
    _silence(box, seconds=1)

    assert expire_leases() == 0

    task.refresh_from_db()
    assert task.status == "running"


def test_retried_task_is_dispatched_again_with_a_new_attempt_and_token():
    first_box = worker(name="first")
    task = queued_task()
    first = run_started(task)
    _silence(first_box)
    expire_leases()
    Task.objects.filter(id=task.id).update(runnable_after=timezone.now() - timedelta(seconds=1))
    worker(name="second")

    assert dispatch_round() == 1

    second = assignments_of(task)[-1]
    task.refresh_from_db()
    assert (task.status, task.attempt, second.attempt) == ("preparing", 2, 2)
    assert second.token != first.token


def test_exit_code_failure_is_not_retried_by_default():
    worker()
    task = queued_task()
    assignment = run_started(task)

    assert _report(assignment, "failed", exit_code=3, failure_reason="exit_code", error="Traceback").accepted

    task.refresh_from_db()
    assert (task.status, task.exit_code, task.failure_reason, task.retry_count) == ("failed", 3, "exit_code", 0)
    assert AuditEvent.objects.filter(event_type="job_completed", success=False).count() == 1


@override_settings(**BACKOFF)
def test_exit_code_failure_is_retried_when_the_task_asks_for_it():
    worker()
    task = queued_task(retry_on_exit_code=True)
    assignment = run_started(task)

    _report(assignment, "failed", exit_code=3, failure_reason="exit_code")

    task.refresh_from_db()
    assert (task.status, task.retry_count, task.failure_reason) == ("queued", 1, "exit_code")
    assert task.runnable_after > timezone.now()
    assert AuditEvent.objects.filter(event_type="job_requeued", action="retry").exists()


def test_preparation_failure_is_retried():
    worker()
    task = queued_task()
    dispatch_round()

    _report(assignments_of(task)[0], "failed", failure_reason="preparation", error="snapshot download failed")

    task.refresh_from_db()
    assert (task.status, task.retry_count, task.failure_reason) == ("queued", 1, "preparation")


def test_timeout_failure_is_not_retried():
    worker()
    task = queued_task(retry_on_exit_code=True)
    assignment = run_started(task)

    _report(assignment, "failed", exit_code=-9, failure_reason="timeout")

    task.refresh_from_db()
    assert (task.status, task.failure_reason) == ("failed", "timeout")


def test_cancelled_report_without_a_cancel_request_is_retried_as_worker_lost():
    worker()
    task = queued_task()
    assignment = run_started(task)

    _report(assignment, "cancelled")

    task.refresh_from_db()
    assert (task.status, task.failure_reason) == ("queued", "worker_lost")


@override_settings(FETCHML_RETRY_BACKOFF_BASE_SECONDS=5.0, FETCHML_RETRY_BACKOFF_MAX_SECONDS=30.0)
def test_retry_back_off_grows_exponentially_with_jitter_and_is_capped():
    for retry, base in [(1, 5), (2, 10), (3, 20)]:
        assert base <= retry_backoff_seconds(retry) <= base * 1.25
    assert retry_backoff_seconds(10) == pytest.approx(30.0)


def test_a_gang_stays_running_while_its_other_nodes_wind_down_after_one_failed():
    boxes = [worker(name=f"node-{i}") for i in range(2)]
    gang = queued_task(node_count=2)
    dispatch_round()
    rank0, rank1 = assignments_of(gang)
    _report(rank0, "running")

    _report(rank1, "failed", exit_code=1, failure_reason="exit_code")

    rank0.refresh_from_db()
    gang.refresh_from_db()
    assert (gang.status, gang.failure_reason, gang.exit_code) == ("running", "exit_code", 1)
    assert rank0.holds_capacity  # rank 0 stores the run's files: it is let finish its grace period
    assert Worker.objects.filter(id=boxes[0].id, used_batch_slots=1).exists()


def test_files_rank_0_stores_while_winding_down_are_taken():
    key, raw_key = worker_key_pair()
    worker(name="node-0", api_key=key)
    worker(name="node-1", api_key=key)
    gang = queued_task(node_count=2)
    dispatch_round()
    rank0, rank1 = assignments_of(gang)
    _report(rank0, "running")
    _report(rank1, "failed", exit_code=1, failure_reason="exit_code")

    assert put(KeyClient(raw_key), rank0, "checkpoint.pt", b"weights").status_code == 201


def test_the_cancel_of_a_winding_down_node_is_sent_again_until_it_ends():
    gang, rank0, rank1 = _running_gang()

    _report(rank1, "failed", exit_code=1, failure_reason="exit_code")

    assert cancel_messages(worker_id=rank0.worker_id) == [
        outgoing(
            "cancel", task_id=str(gang.id), token=str(rank0.token), reason="another node of the run ended (exit_code)"
        )
    ]


def test_the_error_of_a_gang_ended_by_a_node_names_that_node_and_its_worker():
    gang, rank0, rank1 = _running_gang()
    ended_by = Worker.objects.get(id=rank1.worker_id).name

    _report(rank1, "failed", exit_code=1, failure_reason="exit_code", error="boom")
    _report(rank0, "cancelled")

    gang.refresh_from_db()
    assert gang.error == f"node {rank1.node_id} (worker {ended_by}): boom"


def test_a_gang_whose_node_failed_is_retried_once_its_last_node_ended():
    gang, rank0, rank1 = _running_gang(max_retries=1, retry_on_exit_code=True)
    _report(rank1, "failed", exit_code=1, failure_reason="exit_code")

    _report(rank0, "cancelled")

    gang.refresh_from_db()
    assert (gang.status, gang.retry_count) == ("queued", 1)
    assert [attempt["exit_code"] for attempt in gang.earlier_attempts] == [1]


def test_a_cancel_of_a_gang_ends_it_once_every_node_has_stopped():
    gang, rank0, rank1 = _running_gang()
    task_cancel(task=gang, actor=Actor(user=gang.owner, role="user"))

    _report(rank1, "cancelled")
    gang.refresh_from_db()
    assert gang.status == "running"

    _report(rank0, "cancelled")
    gang.refresh_from_db()
    assert (gang.status, gang.failure_reason) == ("cancelled", "cancelled")


def test_a_lost_node_of_a_gang_lets_the_others_wind_down_and_the_task_is_retried():
    boxes = [worker(name=f"node-{i}") for i in range(2)]
    gang = queued_task(node_count=2, max_retries=1)
    dispatch_round()
    rank0, rank1 = assignments_of(gang)
    _report(rank0, "running")

    end_run(assignment_id=rank1.id, reason="worker_lost", error="worker lost")
    gang.refresh_from_db()
    assert (gang.status, gang.failure_reason) == ("running", "worker_lost")

    _report(rank0, "cancelled")
    gang.refresh_from_db()
    assert (gang.status, gang.retry_count) == ("queued", 1)
    assert not Worker.objects.filter(id__in=[b.id for b in boxes], used_batch_slots__gt=0).exists()


def test_multi_node_task_completes_when_its_last_node_completes():
    gang, rank0, rank1 = _running_gang()

    _report(rank0, "completed", exit_code=0)
    gang.refresh_from_db()
    assert gang.status == "running"

    _report(rank1, "completed", exit_code=0)
    gang.refresh_from_db()
    assert gang.status == "completed"


def test_report_for_a_lost_run_is_stale():
    box = worker()
    task = queued_task()
    assignment = run_started(task)
    _silence(box)
    expire_leases()

    outcome = _report(assignment, "completed", exit_code=0)

    task.refresh_from_db()
    assert outcome.stale and task.status == "queued"


def test_drain_stops_new_work_and_is_audited(admin_user):
    box = worker(batch_slots=2)
    running = queued_task()
    run_started(running)
    queued = queued_task()

    drained = worker_drain(worker=box, actor=Actor(user=admin_user, role="admin"))

    assert drained.status == "draining"
    assert dispatch_round() == 0
    queued.refresh_from_db()
    assert queued.status == "queued"
    event = AuditEvent.objects.get(event_type="scheduler_drain")
    assert (event.user_id, event.resource) == ("root", f"worker:{box.name}")


def test_draining_worker_goes_offline_when_its_last_run_ends(admin_user):
    box = worker()
    task = queued_task()
    assignment = run_started(task)
    worker_drain(worker=box, actor=Actor(user=admin_user, role="admin"))

    _report(assignment, "completed", exit_code=0)

    box.refresh_from_db()
    assert box.status == "offline"


@pytest.mark.django_db(transaction=True)  # what is announced leaves on a real commit
def test_a_drained_worker_going_offline_is_audited_and_announced(admin_user):
    box = worker()
    assignment = run_started(queued_task())
    worker_drain(worker=box, actor=Actor(user=admin_user, role="admin"))
    layer = get_channel_layer()
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(events.STATUS_GROUP, channel)

    _report(assignment, "completed", exit_code=0)

    event = AuditEvent.objects.get(event_type="worker_changed")
    assert (event.resource, event.action) == (f"worker:{box.name}", "drained")
    announced = async_to_sync(_status_event)(layer, channel, "worker_offline")
    assert announced["worker_id"] == str(box.id)
    async_to_sync(layer.group_discard)(events.STATUS_GROUP, channel)


def test_draining_an_idle_worker_takes_it_offline_at_once(admin_user):
    box = worker()

    assert worker_drain(worker=box, actor=Actor(user=admin_user, role="admin")).status == "offline"


def test_draining_an_offline_worker_is_a_conflict(admin_user):
    box = worker(status=Worker.Status.OFFLINE)

    with pytest.raises(Conflict):
        worker_drain(worker=box, actor=Actor(user=admin_user, role="admin"))


@override_settings(FETCHML_TIMEOUT_MARGIN_SECONDS=60.0)
def test_run_past_its_timeout_plus_margin_is_failed_by_the_server():
    worker()
    task = queued_task(timeout_seconds=30)
    assignment = run_started(task)
    Task.objects.filter(id=task.id).update(started_at=timezone.now() - timedelta(seconds=91))

    assert enforce_timeouts() == 1

    task.refresh_from_db()
    assignment.refresh_from_db()
    assert (task.status, task.failure_reason) == ("failed", "timeout")
    assert not assignment.holds_capacity


@override_settings(FETCHML_TIMEOUT_MARGIN_SECONDS=60.0)
def test_run_within_its_timeout_margin_is_left_alone():
    worker()
    task = queued_task(timeout_seconds=30)
    run_started(task)
    Task.objects.filter(id=task.id).update(started_at=timezone.now() - timedelta(seconds=80))

    assert enforce_timeouts() == 0
    task.refresh_from_db()
    assert task.status == TaskStatus.RUNNING


def test_worker_lost_reported_by_the_agent_is_retried():
    worker()
    task = queued_task()
    assignment = run_started(task)

    assert _report(assignment, "failed", exit_code=137, failure_reason="worker_lost").accepted

    task.refresh_from_db()
    assert (task.status, task.failure_reason, task.retry_count) == ("queued", "worker_lost", 1)


def test_first_ack_marks_the_assignment_acked_and_a_repeated_ack_keeps_its_time():
    worker()
    task = queued_task()
    dispatch_round()
    [assignment] = assignments_of(task)
    run = {"worker_id": assignment.worker_id, "task_id": str(task.id), "token": str(assignment.token)}

    assert assignment_ack(**run)
    assignment.refresh_from_db()
    first = assignment.acked_at
    assert assignment.status == NodeAssignment.Status.ACKED and first is not None

    assert assignment_ack(**run)
    assignment.refresh_from_db()
    assert assignment.acked_at == first


def test_ack_of_an_ended_run_is_not_live():
    worker()
    task = queued_task()
    assignment = run_started(task)
    assert _report(assignment, "completed", exit_code=0).accepted

    assert not assignment_ack(worker_id=assignment.worker_id, task_id=str(task.id), token=str(assignment.token))
