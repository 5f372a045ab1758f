""" "Why is my job still queued?": pending_reason and queue_position."""

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from conftest import requires_postgres
from scheduler.dispatch import dispatch_round
from scheduler.models import Worker
from scheduler.policies import FleetNode, Shape, node_could_ever_hold, tasks_fleet_could_ever_run
from scheduler.selectors import pending_reason, queue_position
from scheduler.tests.factories import UserFactory, queued_task, worker
from scheduler.tests.plans import plans_of
from tasks.models import Task
from tasks.services import dispatch_key
from tasks.tests.factories import ReservationFactory

pytestmark = pytest.mark.django_db


def test_no_worker_connected():
    assert pending_reason(queued_task()) == "no active worker is connected"


def test_a_worker_whose_connection_closed_does_not_count_as_connected():
    worker(channel_name="")

    assert pending_reason(queued_task()) == "no active worker is connected"


def test_no_worker_has_the_gpu_type():
    worker(gpu_count=8, gpu_type="V100")

    reason = pending_reason(queued_task(gpu=4, gpu_type="A100", allow_unschedulable=True))

    assert reason == "no active worker has GPUs of type A100; it waits until one connects"


def test_no_worker_has_enough_free_gpus_of_the_type():
    worker(gpu_count=8, gpu_type="A100", batch_slots=2)
    queued_task(gpu=6, gpu_type="A100", priority=9)
    dispatch_round()

    reason = pending_reason(queued_task(gpu=4, gpu_type="A100"))

    assert reason == "no worker with 4 free GPU(s) of type A100, a free batch slot"


def test_waiting_for_back_off():
    worker()
    until = timezone.now() + timedelta(minutes=2)

    assert pending_reason(queued_task(runnable_after=until)) == f"waiting for retry back-off until {until.isoformat()}"


def test_multi_node_task_lacking_free_workers():
    for name in ("a", "b", "c"):
        worker(name=name)
    queued_task(priority=9, node_count=2)
    dispatch_round()

    assert pending_reason(queued_task(node_count=3)) == "only 1 of 3 workers have a free batch slot"


def test_multi_node_task_lacking_workers_says_when_a_reservation_holds_the_others():
    worker(name="a", gpu_count=2, gpu_type="A100")
    worker(name="b", gpu_count=2, gpu_type="A100")
    ReservationFactory(gpu_count=2, gpu_type="A100")

    reason = pending_reason(queued_task(node_count=2, gpu=1, gpu_type="A100"))

    assert reason == (
        "only 1 of 2 workers have 1 free GPU(s) of type A100, a free batch slot; "
        "on others it is held by active reservations"
    )


def test_multi_node_task_needing_more_workers_than_are_active_waits_for_more():
    worker(name="a")

    reason = pending_reason(queued_task(node_count=3, allow_unschedulable=True))

    assert reason == "only 1 active worker(s) could ever hold one of its 3 nodes; it waits until more connect"


def test_behind_runnable_tasks_first_in_dispatch_order():
    worker()
    for _ in range(3):
        queued_task(priority=9)
    task = queued_task(priority=2)

    assert queue_position(task) == 3
    assert pending_reason(task) == "behind 3 runnable task(s) in dispatch order"


def test_queue_position_ignores_tasks_in_back_off_and_later_ones():
    queued_task(priority=9, runnable_after=timezone.now() + timedelta(minutes=5))
    task = queued_task(priority=5)
    queued_task(priority=1)

    assert queue_position(task) == 0


def test_first_in_line_waits_for_the_next_round():
    worker()

    assert pending_reason(queued_task()) == "waiting for the next scheduling round"


def test_capacity_held_by_another_users_reservation():
    worker(gpu_count=2, gpu_type="A100")
    ReservationFactory(gpu_count=2, gpu_type="A100")

    reason = pending_reason(queued_task(gpu=1, gpu_type="A100"))

    assert reason == "the capacity it needs is held by active reservations"


def test_task_of_a_reservation_whose_window_has_not_started():
    worker(gpu_count=2)
    starts_at = timezone.now() + timedelta(hours=2)
    reservation = ReservationFactory(
        status="pending", starts_at=starts_at, expires_at=starts_at + timedelta(hours=1), gpu_count=1
    )

    reason = pending_reason(queued_task(gpu=1, reservation=reservation, owner=reservation.owner))

    assert reason == f"waiting for its reservation's window to start at {starts_at.isoformat()}"


def test_workers_held_for_a_starving_multi_node_job(settings):
    settings.FETCHML_STARVATION_SECONDS = 60
    for i in range(3):
        worker(name=f"node-{i}", batch_slots=1)
    queued_task(priority=10)
    dispatch_round()  # one node is busy, so the gang cannot start
    gang = queued_task(node_count=3, queued_at=timezone.now() - timedelta(minutes=10))
    small = queued_task(queued_at=timezone.now() - timedelta(minutes=5))

    assert pending_reason(small) == f"the workers it could use are held for task {gang.id}, which has waited longest"


def test_a_queued_tasks_detail_counts_the_queue_ahead_of_it_once(user_client, user):
    worker()
    for _ in range(3):
        queued_task(priority=9)
    task = queued_task(priority=2, owner=user)

    with CaptureQueriesContext(connection) as queries:
        body = user_client.get(f"/v1/tasks/{task.id}").json()

    assert (body["queue_position"], body["pending_reason"]) == (3, "behind 3 runnable task(s) in dispatch order")
    assert sum('"dispatch_key" >' in query["sql"] for query in queries) == 1


# --- only runnable tasks count as ahead ------------------------------------------------


def test_queue_position_skips_tasks_no_active_worker_could_ever_run():
    worker(gpu_count=4, gpu_type="A100")
    queued_task(priority=9, gpu=8, gpu_type="A100", allow_unschedulable=True)
    queued_task(priority=9, gpu=1, gpu_type="H100", allow_unschedulable=True)
    queued_task(priority=9, cpu=64, allow_unschedulable=True)
    queued_task(priority=9, gpu=4, gpu_type="A100")
    task = queued_task(priority=2)

    assert queue_position(task) == 1


def test_queue_position_counts_a_multi_node_task_only_if_enough_active_workers_could_hold_it():
    worker(name="a", gpu_count=2)
    worker(name="b", gpu_count=4)
    queued_task(priority=9, gpu=2, node_count=2)
    queued_task(priority=9, gpu=4, node_count=2, allow_unschedulable=True)
    queued_task(priority=9, node_count=3, allow_unschedulable=True)
    task = queued_task(priority=2)

    assert queue_position(task) == 1


def test_queue_position_skips_tasks_only_a_worker_that_is_not_active_could_run():
    worker(name="small", gpu_count=1)
    worker(name="big", gpu_count=8, status="offline")
    queued_task(priority=9, gpu=8)
    task = queued_task(priority=2)

    assert queue_position(task) == 0


def test_queue_position_counts_every_runnable_task_ahead_while_no_worker_is_active():
    queued_task(priority=9, gpu=8)
    queued_task(priority=9)
    task = queued_task(priority=2)

    assert queue_position(task) == 2


def test_an_older_task_of_the_same_priority_is_ahead_and_a_newer_one_is_not():
    worker()
    now = timezone.now()
    queued_task(queued_at=now - timedelta(seconds=2))
    task = queued_task(queued_at=now - timedelta(seconds=1))
    queued_task(queued_at=now)

    assert queue_position(task) == 1


@pytest.mark.parametrize(
    "fleet",
    [
        [{"gpu_count": 4, "gpu_type": "A100"}],
        [{"gpu_count": 8, "gpu_type": "A100", "cpu_cores": 4}, {"gpu_count": 0, "cpu_cores": 64}],
        [{"gpu_count": 2, "gpu_type": "V100"}, {"gpu_count": 2, "gpu_type": "V100"}, {"gpu_count": 4}],
        [{"batch_slots": 0, "service_slots": 2}, {"gpu_count": 1, "gpu_type": "H100", "memory_gb": 512}],
    ],
    ids=["one-box", "gpus-or-cores", "alike-and-untyped", "service-only"],
)
def test_the_task_filter_of_the_queue_position_agrees_with_node_could_ever_hold(fleet):
    for i, fields in enumerate(fleet):
        worker(name=f"w{i}", **fields)
    tasks = [
        queued_task(gpu=gpu, gpu_type=gpu_type, cpu=cpu, memory_gb=memory, kind=kind, node_count=nodes)
        for gpu, gpu_type in ((0, ""), (1, ""), (2, "V100"), (4, "A100"), (8, "A100"), (1, "H100"))
        for cpu, memory in ((0, 0), (16, 0), (0, 256))
        for kind in ("batch", "service")
        for nodes in (1, 2, 3)
    ]
    fleet_nodes = [FleetNode.of(box) for box in Worker.objects.all()]

    selected = set(Task.objects.filter(tasks_fleet_could_ever_run(fleet_nodes)).values_list("id", flat=True))

    def could_run(task: Task) -> bool:
        shape = Shape(gpu=task.gpu, gpu_type=task.gpu_type, cpu=task.cpu, memory_gb=task.memory_gb, kind=task.kind)
        return sum(node_could_ever_hold(node, shape) for node in fleet_nodes) >= task.node_count

    assert selected == {task.id for task in tasks if could_run(task)}


def _queued_in_bulk(count: int, *, priority: int, status: str = "queued") -> None:
    owner, now = UserFactory(), timezone.now()
    Task.objects.bulk_create(
        Task(
            owner=owner,
            job_name=f"bulk-{priority}-{i}",
            status=status,
            priority=priority,
            created_at=now - timedelta(seconds=i),
            queued_at=now - timedelta(seconds=i),
            dispatch_key=dispatch_key(priority=priority, queued_at=now - timedelta(seconds=i)),
        )
        for i in range(count)
    )


@requires_postgres
def test_the_queue_position_is_counted_along_the_queues_partial_index_after_a_burst_statistics_missed():
    worker(gpu_count=4)
    _queued_in_bulk(5000, priority=5, status="completed")
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE tasks_task")
    _queued_in_bulk(20, priority=9)
    queued_task(priority=9, gpu=8, allow_unschedulable=True)
    _queued_in_bulk(3000, priority=3)
    task = queued_task(priority=8)

    with plans_of("SELECT COUNT") as plans:
        assert queue_position(task) == 20

    assert len(plans) == 1
    assert "Index Cond: (dispatch_key >= " in plans[0], plans[0]
    assert "task_runnable_by_priority" in plans[0], plans[0]
    assert "Seq Scan" not in plans[0], plans[0]


# --- a task no active worker could ever run ----------------------------------------------


def test_a_task_larger_than_every_active_worker_says_so_and_waits_for_one():
    worker(gpu_count=4, gpu_type="A100")

    reason = pending_reason(queued_task(gpu=8, gpu_type="A100", allow_unschedulable=True))

    assert reason == "no active worker has 8 GPUs of type A100; it waits until one connects"


def test_a_task_needing_more_cores_and_memory_than_any_active_worker_names_both():
    worker(cpu_cores=8, memory_gb=32)

    reason = pending_reason(queued_task(cpu=16, memory_gb=64, allow_unschedulable=True))

    assert reason == "no active worker has 16 CPU cores or 64 GB of memory; it waits until one connects"


def test_a_task_no_active_worker_could_hold_only_in_combination_names_its_whole_need():
    worker(name="gpus", gpu_count=8, cpu_cores=4)
    worker(name="cores", gpu_count=0, cpu_cores=64)

    reason = pending_reason(queued_task(gpu=8, cpu=16, allow_unschedulable=True))

    assert reason == "no active worker has 8 GPUs, 16 CPU cores and a batch slot at once; it waits until one connects"


def test_a_service_without_any_active_service_slot_says_so():
    worker(service_slots=0)

    reason = pending_reason(queued_task(kind="service", allow_unschedulable=True))

    assert reason == "no active worker has a service slot; it waits until one connects"


def test_a_task_behind_only_unrunnable_tasks_waits_for_the_next_round():
    worker(gpu_count=4)
    queued_task(priority=9, gpu=8, allow_unschedulable=True)
    queued_task(priority=9, runnable_after=timezone.now() + timedelta(minutes=5))
    task = queued_task(priority=2)

    assert (queue_position(task), pending_reason(task)) == (0, "waiting for the next scheduling round")
