"""Dispatch rounds: order, matching, back-off, capacity accounting, multi-node gangs."""

from datetime import timedelta

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import IntegrityError
from django.utils import timezone

from audit.models import AuditEvent
from fetchml import events
from scheduler import dispatch
from scheduler.dispatch import dispatch_round
from scheduler.models import NodeAssignment, Worker
from scheduler.tests.factories import assignments_of, queued_task, worker
from tasks.states import TaskStatus

pytestmark = pytest.mark.django_db


def test_higher_priority_task_is_dispatched_first():
    worker()
    low = queued_task(priority=3)
    high = queued_task(priority=8)

    assert dispatch_round() == 1

    high.refresh_from_db()
    low.refresh_from_db()
    assert (high.status, low.status) == (TaskStatus.PREPARING, TaskStatus.QUEUED)


def test_equal_priority_goes_to_the_task_queued_first():
    worker()
    now = timezone.now()
    newer = queued_task(queued_at=now)
    older = queued_task(queued_at=now - timedelta(minutes=1))

    dispatch_round()

    assert NodeAssignment.objects.get().task_id == older.id
    newer.refresh_from_db()
    assert newer.status == TaskStatus.QUEUED


def test_aging_lets_an_old_low_priority_task_pass_a_newer_high_one():
    worker()
    # One point per hour of aging (the default): 2 + 10 h beats 8 + 0 h.
    old_low = queued_task(priority=2, queued_at=timezone.now() - timedelta(hours=10))
    new_high = queued_task(priority=8)

    dispatch_round()

    assert NodeAssignment.objects.get().task_id == old_low.id
    new_high.refresh_from_db()
    assert new_high.status == TaskStatus.QUEUED


@pytest.mark.parametrize(
    ("need", "small", "big"),
    [
        ({"cpu": 16}, {"cpu_cores": 8}, {"cpu_cores": 16}),
        ({"memory_gb": 64}, {"memory_gb": 32}, {"memory_gb": 64}),
        ({"gpu": 4}, {"gpu_count": 2}, {"gpu_count": 4}),
        ({"gpu": 1, "gpu_type": "A100"}, {"gpu_count": 8, "gpu_type": "V100"}, {"gpu_count": 1, "gpu_type": "A100"}),
        ({"kind": "service"}, {"batch_slots": 4, "service_slots": 0}, {"batch_slots": 0, "service_slots": 1}),
    ],
    ids=["cpu", "memory", "gpu-count", "gpu-type", "service-slot"],
)
def test_task_is_placed_only_on_a_worker_that_has_what_it_needs(need, small, big):
    worker(name="small", **small)
    fitting = worker(name="big", **big)
    task = queued_task(**need)

    assert dispatch_round() == 1

    assert [a.worker_id for a in assignments_of(task)] == [fitting.id]


def test_task_that_fits_no_worker_stays_queued_and_lets_smaller_work_pass():
    worker(cpu_cores=8)
    too_big = queued_task(priority=9, cpu=64)
    small = queued_task(priority=1, cpu=2)

    assert dispatch_round() == 1

    too_big.refresh_from_db()
    small.refresh_from_db()
    assert (too_big.status, small.status) == (TaskStatus.QUEUED, TaskStatus.PREPARING)


def test_task_in_retry_back_off_is_not_dispatched_until_it_passes():
    worker()
    task = queued_task(runnable_after=timezone.now() + timedelta(minutes=5))

    assert dispatch_round() == 0
    assert dispatch_round(now=timezone.now() + timedelta(minutes=6)) == 1

    task.refresh_from_db()
    assert task.status == TaskStatus.PREPARING


def test_worker_is_never_given_more_than_its_capacity():
    box = worker(batch_slots=2, cpu_cores=8)
    tasks = [queued_task(cpu=3) for _ in range(5)]

    assert dispatch_round() == 2
    assert dispatch_round() == 0

    box.refresh_from_db()
    assert (box.used_batch_slots, box.used_cpu) == (2, 6)
    assert sum(task.node_assignments.count() for task in tasks) == 2


def test_database_refuses_a_counter_update_that_would_overcommit():
    box = worker(batch_slots=1)

    with pytest.raises(IntegrityError):
        Worker.objects.filter(id=box.id).update(used_batch_slots=2)


def test_tasks_sharing_a_worker_get_distinct_gpu_indices():
    worker(gpu_count=4, batch_slots=2)
    first, second = queued_task(gpu=2), queued_task(gpu=2)

    dispatch_round()

    indices = [assignments_of(task)[0].gpu_indices for task in (first, second)]
    assert sorted(indices) == [[0, 1], [2, 3]]


def test_gpu_indices_held_by_a_live_run_are_not_handed_out_again():
    worker(gpu_count=2, batch_slots=2)
    first = queued_task(gpu=1, priority=9)
    dispatch_round()
    second = queued_task(gpu=1)

    dispatch_round()

    assert assignments_of(first)[0].gpu_indices != assignments_of(second)[0].gpu_indices


def test_multi_node_task_is_not_placed_when_fewer_workers_fit_than_nodes():
    worker(name="a", batch_slots=4)
    worker(name="b", batch_slots=4)
    gang = queued_task(node_count=3)

    assert dispatch_round() == 0

    gang.refresh_from_db()
    assert gang.status == TaskStatus.QUEUED
    assert not NodeAssignment.objects.exists()
    assert not Worker.objects.filter(used_batch_slots__gt=0).exists()


def test_multi_node_task_takes_all_its_nodes_on_distinct_workers_at_once():
    boxes = [worker(name=f"node-{i}", gpu_count=2) for i in range(3)]
    gang = queued_task(node_count=3, gpu=2)

    assert dispatch_round() == 1

    placed = assignments_of(gang)
    assert [a.node_id for a in placed] == [0, 1, 2]
    assert {a.worker_id for a in placed} == {box.id for box in boxes}
    gang.refresh_from_db()
    assert gang.worker_id == placed[0].worker_id


def test_dispatch_moves_the_task_to_preparing_with_its_next_attempt_and_audits_it_as_its_owners():
    box = worker()
    task = queued_task(attempt=2)

    dispatch_round()

    task.refresh_from_db()
    assignment = assignments_of(task)[0]
    assert (task.status, task.attempt, task.worker_id) == (TaskStatus.PREPARING, 3, box.id)
    assert (assignment.attempt, assignment.status, assignment.holds_capacity) == (3, "assigned", True)
    event = AuditEvent.objects.get(event_type="job_started")
    assert (event.action, event.resource, event.metadata["workers"]) == ("assign", f"task:{task.id}", [box.name])
    assert event.user_id == task.owner.username


def test_each_assignment_gets_a_fresh_fencing_token():
    worker(batch_slots=2)
    queued_task(), queued_task()

    dispatch_round()

    tokens = list(NodeAssignment.objects.values_list("token", flat=True))
    assert len(set(tokens)) == 2


def test_no_round_without_an_active_worker():
    worker(status=Worker.Status.DRAINING)
    worker(status=Worker.Status.OFFLINE)
    queued_task()

    assert dispatch_round() == 0


def test_claim_takes_no_more_tasks_than_the_free_slots_rounded_up_to_a_power_of_two(monkeypatch):
    limits = []
    claim = dispatch.claim_tasks
    monkeypatch.setattr(
        dispatch, "claim_tasks", lambda nodes, *, limit, now: limits.append(limit) or claim(nodes, limit=limit, now=now)
    )
    worker(batch_slots=3)
    worker(batch_slots=3, used_batch_slots=1)
    for _ in range(10):
        queued_task()

    assert dispatch_round(batch_size=16) == 5
    assert limits == [8]


def test_round_is_bounded_by_the_batch_size():
    worker(batch_slots=10)
    for _ in range(6):
        queued_task()

    assert dispatch_round(batch_size=4) == 4


def test_worker_group_is_told_about_its_round_of_assignments_in_one_message_after_commit(
    django_capture_on_commit_callbacks,
):
    box = worker(batch_slots=3)
    for _ in range(3):
        queued_task()
    layer = get_channel_layer()
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(events.worker_group(box.id), channel)

    with django_capture_on_commit_callbacks(execute=True):
        dispatch_round()

    message = async_to_sync(layer.receive)(channel)
    assert message["type"] == "worker.assign"
    tokens = [assign["token"] for assign in events.assigns_of(message)]
    assert sorted(tokens) == sorted(str(a.token) for a in NodeAssignment.objects.all())


def test_a_retried_task_placed_again_shows_nothing_of_its_last_attempts_outcome():
    worker()
    task = queued_task(retry_count=1, failure_reason="worker_lost", exit_code=137, error="worker shut down", output="x")

    assert dispatch_round() == 1

    task.refresh_from_db()
    assert (task.status, task.failure_reason, task.exit_code, task.error, task.output) == (
        TaskStatus.PREPARING,
        "",
        None,
        "",
        "",
    )
