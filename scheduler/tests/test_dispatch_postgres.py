"""PostgreSQL-only: the claim query is index-backed; concurrent schedulers never double-assign or overcommit."""

import os
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection
from django.db.models import Count, Sum
from django.utils import timezone

from conftest import requires_postgres
from scheduler.dispatch import any_task_may_starve, dispatch_round
from scheduler.models import NodeAssignment, Worker
from scheduler.policies import fair_share_offset
from scheduler.tests.factories import UserFactory, worker
from scheduler.tests.plans import plans_of
from tasks.models import Task
from tasks.services import dispatch_key

PROJECT = Path(settings.BASE_DIR)


def _peer_env() -> dict[str, str]:
    db = connection.settings_dict
    env = {
        **os.environ,
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT'] or 5432}/{db['NAME']}",
        "DJANGO_SECRET_KEY": "test",
        "FETCHML_WORKER_LEASE_SECONDS": "3600",
        "FETCHML_ASSIGN_RESEND_SECONDS": "3600",  # no agents here to acknowledge
        "FETCHML_LOG_LEVEL": "WARNING",
    }
    env.pop("REDIS_URL", None)  # notifications go nowhere: no agents in this test
    return env


def _run_peers(*extra_args: list[str]) -> list[str]:
    """One `dispatch_peer` process per entry of `extra_args`, started together; their outputs."""
    start_at = str(time.time() + 3)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "scheduler.tests.dispatch_peer", start_at, "50", *args],
            cwd=PROJECT,
            env=_peer_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in extra_args
    ]
    outputs = [proc.communicate(timeout=70) for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * len(procs), outputs
    return [out for out, _ in outputs]


def _tasks(owner, count: int, **fields) -> list[Task]:
    now = timezone.now()
    return Task.objects.bulk_create(
        [
            Task(
                owner=owner,
                job_name=f"job-{i}",
                priority=1 + i % 10,
                dispatch_key=dispatch_key(priority=1 + i % 10, queued_at=now),
                queued_at=now,
                created_at=now,
                **fields(i) if callable(fields) else fields,
            )
            for i in range(count)
        ]
    )


def _queue_burst_after_statistics(owner) -> None:
    """Statistics taken when a single task of 200 was queued, then 3,000 tasks queued at once:
    a queue the planner believes is a handful of rows, as right after a burst."""
    Task.objects.bulk_create(
        [Task(owner=owner, job_name=f"done-{i}", status="completed", dispatch_key=0.0) for i in range(199)]
    )
    _tasks(owner, 1)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE tasks_task")
    _tasks(owner, 3000)


def _plans_of_a_round_after_a_burst(statement_start: str) -> list[str]:
    """The plans of a round's statements beginning with `statement_start`, the round placing 8 tasks
    of a burst the planner's statistics have not seen (`_queue_burst_after_statistics`)."""
    owner = UserFactory()
    worker(cpu_cores=64, memory_gb=256, batch_slots=8)
    _queue_burst_after_statistics(owner)
    with plans_of(statement_start) as plans:
        assert dispatch_round() == 8
    return plans


def _assert_claims_walk_the_partial_index(plans: list[str]) -> None:
    claims = [plan for plan in plans if "LockRows" in plan and "tasks_task" in plan]
    assert claims, plans
    for plan in claims:
        assert "Index Scan using task_runnable_by_priority" in plan, plan
        assert "Sort" not in plan, plan


@requires_postgres
@pytest.mark.django_db
def test_a_round_claims_by_walking_the_partial_index_with_statistics_up_to_date():
    owner = UserFactory()
    worker(cpu_cores=64, memory_gb=256, gpu_count=8, batch_slots=8)
    Task.objects.bulk_create(
        [Task(owner=owner, job_name=f"done-{i}", status="completed", dispatch_key=0.0) for i in range(5000)]
    )
    _tasks(owner, 50)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE tasks_task")

    with plans_of("SELECT") as plans:
        assert dispatch_round() == 8

    _assert_claims_walk_the_partial_index(plans)


@requires_postgres
@pytest.mark.django_db
def test_a_round_claims_by_walking_the_partial_index_when_the_statistics_have_not_seen_a_burst():
    plans = _plans_of_a_round_after_a_burst("SELECT")

    _assert_claims_walk_the_partial_index(plans)


@requires_postgres
@pytest.mark.django_db
def test_a_round_marks_its_tasks_preparing_by_primary_key_when_the_statistics_have_not_seen_a_burst():
    plans = _plans_of_a_round_after_a_burst('UPDATE "tasks_task"')

    assert len(plans) == 1, plans
    assert "tasks_task_pkey" in plans[0], plans[0]


@requires_postgres
@pytest.mark.django_db
def test_the_starvation_check_probes_the_longest_waiting_tasks_when_the_statistics_have_not_seen_a_burst():
    _queue_burst_after_statistics(UserFactory())

    with plans_of("SELECT") as plans:
        any_task_may_starve(timezone.now())

    assert len(plans) == 1, plans
    assert "Index Scan using task_queued_since" in plans[0], plans[0]
    assert "Sort" not in plans[0], plans[0]


@requires_postgres
@pytest.mark.django_db
@pytest.mark.parametrize("analyzed", [True, False], ids=["statistics up to date", "never analyzed"])
def test_the_fair_share_count_reads_only_the_owners_queued_tasks_however_long_their_history(analyzed):
    # Counted at every submission: reading the owner's whole history, or everyone's queue,
    # would make each submission slower the longer the lab has used the system.
    owner, others = UserFactory(), UserFactory()
    for user, done in ((owner, 2000), (others, 8000)):
        Task.objects.bulk_create(
            [Task(owner=user, job_name=f"done-{i}", status="completed", dispatch_key=0.0) for i in range(done)]
        )
    _tasks(others, 2000)
    _tasks(owner, 20)
    if analyzed:
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE tasks_task")

    with plans_of("SELECT COUNT") as plans:
        offset = fair_share_offset(owner=owner, priority=6)

    assert offset == pytest.approx(10 * settings.FETCHML_FAIR_SHARE_STEP)
    assert len(plans) == 1, plans
    assert "task_queued_by_owner" in plans[0], plans[0]
    assert "task_owner_recent" not in plans[0] and "task_queued_since" not in plans[0], plans[0]


@requires_postgres
@pytest.mark.django_db
def test_task_table_statistics_are_refreshed_after_a_small_burst_of_submissions():
    with connection.cursor() as cursor:
        cursor.execute("SELECT reloptions FROM pg_class WHERE relname = 'tasks_task'")
        options = set(cursor.fetchone()[0] or [])

    assert {"autovacuum_analyze_scale_factor=0.02", "autovacuum_analyze_threshold=500"} <= options


@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_three_scheduler_processes_assign_each_task_once_and_never_overcommit():
    owner = UserFactory()
    # 2,500 slots for 2,000 tasks; 160 GPUs for 120 GPU tasks.
    for i in range(20):
        worker(name=f"sim-{i:02d}", cpu_cores=250, memory_gb=500, gpu_count=8, gpu_type="A100", batch_slots=125)
    _tasks(owner, 2000, cpu=2, memory_gb=4)
    gpu_ids = list(Task.objects.order_by("?").values_list("id", flat=True)[:120])
    Task.objects.filter(id__in=gpu_ids).update(gpu=1, gpu_type="A100")

    _run_peers([], [], [])

    assert not Task.objects.filter(status="queued").exists()
    per_task = Counter(NodeAssignment.objects.values_list("task_id", flat=True))
    assert len(per_task) == 2000 and set(per_task.values()) == {1}
    assert Task.objects.filter(status="preparing", attempt=1).count() == 2000

    _assert_within_capacity_and_counted()


def _assert_within_capacity_and_counted() -> None:
    """No worker holds more than it has, and its used_* counters match its assignments."""
    held = {
        row["worker_id"]: row
        for row in NodeAssignment.objects.values("worker_id").annotate(
            cpu=Sum("cpu"), memory=Sum("memory_gb"), gpus=Sum("gpus"), slots=Count("id")
        )
    }
    gpu_indices = defaultdict(list)
    for worker_id, indices in NodeAssignment.objects.values_list("worker_id", "gpu_indices"):
        gpu_indices[worker_id].extend(indices)
    for box in Worker.objects.all():
        row = held.get(box.id, {"cpu": 0, "memory": 0, "gpus": 0, "slots": 0})
        assert row["cpu"] <= box.cpu_cores and row["memory"] <= box.memory_gb
        assert row["gpus"] <= box.gpu_count and row["slots"] <= box.batch_slots
        assert (box.used_cpu, box.used_memory_gb, box.used_gpus, box.used_batch_slots) == (
            row["cpu"],
            row["memory"],
            row["gpus"],
            row["slots"],
        )
        assert len(gpu_indices[box.id]) == len(set(gpu_indices[box.id]))


@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_submissions_dispatching_beside_two_schedulers_assign_each_task_once_and_never_overcommit():
    owner = UserFactory(username="submitter")
    for i in range(20):
        worker(name=f"sim-{i:02d}", cpu_cores=200, memory_gb=500, batch_slots=100)
    _tasks(owner, 1000, cpu=2, memory_gb=4)

    outputs = _run_peers([], [], ["submit", "submitter", "300"], ["submit", "submitter", "300"])

    assert sum(int(out) for out in outputs[2:]) > 0  # some submissions placed tasks themselves
    # The schedulers may have stopped before the last submissions (one that found every worker
    # claimed by a round left its task queued): one more round here places what is left.
    while dispatch_round():
        pass
    assert not Task.objects.filter(status="queued").exists()
    per_task = Counter(NodeAssignment.objects.values_list("task_id", flat=True))
    assert len(per_task) == 1600 and set(per_task.values()) == {1}
    assert Task.objects.filter(status="preparing", attempt=1).count() == 1600
    _assert_within_capacity_and_counted()
