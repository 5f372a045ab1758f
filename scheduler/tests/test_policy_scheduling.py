"""Dispatch policies: service vs batch slots, priority re-ordering, fairness between users, anti-starvation."""

from datetime import timedelta

import pytest
from django.utils import timezone

from fetchml.auth import Actor
from fetchml.tests.factories import UserFactory
from scheduler.dispatch import any_task_may_starve, dispatch_round
from scheduler.models import NodeAssignment, Worker
from scheduler.tests.factories import assignments_of, queued_task, worker
from tasks.models import Task
from tasks.services import task_set_priority, task_submit
from tasks.states import TaskStatus

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("queued_until_a_round")]


def _started(*tasks: Task) -> list[bool]:
    return [Task.objects.get(id=t.id).status == TaskStatus.PREPARING for t in tasks]


def test_service_task_uses_a_service_slot_and_leaves_the_batch_slot_free():
    box = worker(batch_slots=1, service_slots=1)
    service = queued_task(kind=Task.Kind.SERVICE)
    batch = queued_task()

    assert dispatch_round() == 2

    assert {a.slot_kind for a in NodeAssignment.objects.all()} == {"batch", "service"}
    box.refresh_from_db()
    assert (box.used_batch_slots, box.used_service_slots) == (1, 1)
    assert _started(service, batch) == [True, True]


def test_batch_backlog_never_takes_a_service_slot():
    worker(batch_slots=1, service_slots=2)
    batch = [queued_task() for _ in range(3)]

    assert dispatch_round() == 1

    assert _started(*batch) == [True, False, False]


def test_raising_a_queued_jobs_priority_puts_it_first_at_once(user):
    worker(batch_slots=1)
    first = queued_task(priority=5, queued_at=timezone.now() - timedelta(minutes=5))
    later = queued_task(priority=5)

    task_set_priority(task=later, priority=9, actor=Actor(user=user, role="admin"))
    dispatch_round()

    assert _started(first, later) == [False, True]


def test_a_users_single_job_is_not_locked_out_by_another_users_thousand_at_equal_priority():
    heavy, light = UserFactory(), UserFactory()
    worker(batch_slots=1)
    backlog = [task_submit(owner=heavy, job_name=f"sweep-{i}") for i in range(1000)]
    single = task_submit(owner=light, job_name="one")

    for _ in range(12):
        if dispatch_round() == 0:
            break
        # Each round's job finishes at once, freeing the one slot for the next round.
        NodeAssignment.objects.filter(holds_capacity=True).update(holds_capacity=False)
        Worker.objects.update(used_batch_slots=0)

    started = set(Task.objects.filter(status=TaskStatus.PREPARING).values_list("id", flat=True))
    assert single.id in started
    assert len(started & {t.id for t in backlog}) < 12


def test_fair_share_keeps_a_users_own_higher_priority_job_ahead_of_their_backlog(user):
    worker(batch_slots=1)
    for i in range(20):
        task_submit(owner=user, job_name=f"sweep-{i}", priority=5)
    urgent = task_submit(owner=user, job_name="urgent", priority=9)

    dispatch_round()

    assert _started(urgent) == [True]


def _gang_and_small_job_behind_a_busy_node() -> tuple:
    """Three one-slot nodes, one busy; a 3-node job queued 10 minutes ago, a 1-node job 5 minutes ago."""
    for i in range(3):
        worker(name=f"node-{i}", batch_slots=1)
    queued_task(priority=10)
    dispatch_round()  # one node is busy
    gang = queued_task(node_count=3, queued_at=timezone.now() - timedelta(minutes=10))
    small = queued_task(queued_at=timezone.now() - timedelta(minutes=5))
    return gang, small


def test_starving_multi_node_job_gets_the_free_nodes_held_instead_of_small_jobs(settings):
    settings.FETCHML_STARVATION_SECONDS = 60
    gang, small = _gang_and_small_job_behind_a_busy_node()

    assert dispatch_round() == 0

    assert _started(gang, small) == [False, False]


def test_a_round_told_no_task_may_starve_lets_small_jobs_pass_the_waiting_head(settings):
    settings.FETCHML_STARVATION_SECONDS = 60
    gang, small = _gang_and_small_job_behind_a_busy_node()

    assert dispatch_round(starvation_possible=False) == 1

    assert _started(gang, small) == [False, True]


def test_a_task_may_starve_once_a_runnable_one_waited_past_the_threshold(settings):
    settings.FETCHML_STARVATION_SECONDS = 600
    queued_task(queued_at=timezone.now() - timedelta(minutes=5))
    assert not any_task_may_starve(timezone.now())

    queued_task(queued_at=timezone.now() - timedelta(minutes=11))
    assert any_task_may_starve(timezone.now())


def test_a_task_waiting_out_its_back_off_does_not_make_starvation_possible(settings):
    settings.FETCHML_STARVATION_SECONDS = 600
    now = timezone.now()
    queued_task(queued_at=now - timedelta(minutes=30), runnable_after=now + timedelta(minutes=1))
    queued_task(queued_at=now - timedelta(minutes=5))

    assert not any_task_may_starve(now)


def test_small_jobs_still_pass_a_waiting_multi_node_job_before_the_threshold(settings):
    settings.FETCHML_STARVATION_SECONDS = 3600
    gang, small = _gang_and_small_job_behind_a_busy_node()

    assert dispatch_round() == 1

    assert _started(gang, small) == [False, True]


def _two_gpu_nodes_one_busy_and_a_cpu_node() -> None:
    worker(name="gpu-0", gpu_count=4, batch_slots=1)
    worker(name="gpu-1", gpu_count=4, batch_slots=1)
    worker(name="cpu-only", gpu_count=0, batch_slots=1)
    queued_task(gpu=4, priority=10)
    dispatch_round()  # one GPU node busy


def test_small_job_is_backfilled_on_a_node_the_starving_job_cannot_use(settings):
    settings.FETCHML_STARVATION_SECONDS = 60
    _two_gpu_nodes_one_busy_and_a_cpu_node()
    gang = queued_task(node_count=2, gpu=4, queued_at=timezone.now() - timedelta(minutes=10))
    cpu_job = queued_task(queued_at=timezone.now() - timedelta(minutes=5))
    gpu_job = queued_task(gpu=1, queued_at=timezone.now() - timedelta(minutes=4))

    dispatch_round()

    assert _started(gang, cpu_job, gpu_job) == [False, True, False]
    assert assignments_of(cpu_job)[0].worker.name == "cpu-only"


def test_a_starving_gang_wider_than_the_active_workers_holds_none_of_them(settings):
    settings.FETCHML_STARVATION_SECONDS = 60
    worker(name="node-0", batch_slots=1)
    worker(name="node-1", batch_slots=1)
    too_wide = queued_task(node_count=3, queued_at=timezone.now() - timedelta(minutes=10))
    small = queued_task(queued_at=timezone.now() - timedelta(minutes=5))

    dispatch_round()

    assert _started(too_wide, small) == [False, True]


def test_the_first_starving_task_the_active_workers_could_run_gets_the_hold(settings):
    settings.FETCHML_STARVATION_SECONDS = 60
    _two_gpu_nodes_one_busy_and_a_cpu_node()
    too_wide = queued_task(node_count=4, queued_at=timezone.now() - timedelta(minutes=20))
    gang = queued_task(node_count=2, gpu=4, queued_at=timezone.now() - timedelta(minutes=10))
    cpu_job = queued_task(queued_at=timezone.now() - timedelta(minutes=5))
    gpu_job = queued_task(gpu=1, queued_at=timezone.now() - timedelta(minutes=4))

    dispatch_round()

    # The free GPU node is held for the gang; the too-wide task behind which it waits holds nothing.
    assert _started(too_wide, gang, cpu_job, gpu_job) == [False, False, True, False]
