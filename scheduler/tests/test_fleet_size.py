"""What a submission and a dispatch round read of the fleet: their cost must not grow with idle workers' rows."""

import random
import uuid

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from scheduler.dispatch import CAPACITY_FIELDS, NodeCapacity, NodesAlike, dispatch_round, pick_nodes
from scheduler.models import Worker
from scheduler.policies import (
    FleetNode,
    Shape,
    current_holds,
    node_could_ever_hold,
    registered_fleet,
    unschedulable_reason,
    workers_that_could_ever_hold,
)
from scheduler.tests.factories import queued_task, worker
from tasks.models import Task
from tasks.tests.factories import ReservationFactory

pytestmark = pytest.mark.django_db

SHAPES = [
    Shape(),
    Shape(cpu=8),
    Shape(cpu=9),
    Shape(memory_gb=64),
    Shape(gpu=2),
    Shape(gpu=4, gpu_type="A100"),
    Shape(gpu=1, gpu_type="H100"),
    Shape(gpu=0, gpu_type="H100"),  # a type without GPUs asks for nothing
    Shape(kind=Task.Kind.SERVICE),
    Shape(kind=Task.Kind.SERVICE, gpu=2, gpu_type="A100"),
]


def _mixed_fleet() -> None:
    worker(name="cpu-small", cpu_cores=4, memory_gb=16, batch_slots=2)
    worker(name="cpu-large", cpu_cores=8, memory_gb=64, batch_slots=1, service_slots=1)
    worker(name="a100", cpu_cores=32, memory_gb=256, gpu_count=4, gpu_type="A100", batch_slots=4)
    worker(name="a100-svc", cpu_cores=16, memory_gb=128, gpu_count=2, gpu_type="A100", batch_slots=0, service_slots=2)
    worker(name="h100-off", gpu_count=8, gpu_type="H100", status=Worker.Status.OFFLINE)


@pytest.mark.parametrize("shape", SHAPES, ids=repr)
def test_the_database_count_of_workers_that_could_hold_a_shape_follows_the_matching_rule(shape):
    _mixed_fleet()

    by_rule = sum(node_could_ever_hold(node, shape) for node in registered_fleet())

    assert workers_that_could_ever_hold(shape) == by_rule


def test_checking_that_a_submission_could_ever_run_reads_no_worker_row():
    for index in range(3):
        worker(name=f"box-{index}", gpu_count=2, gpu_type="A100")

    with CaptureQueriesContext(connection) as queries:
        assert unschedulable_reason(Shape(gpu=2, gpu_type="A100", node_count=3)) is None

    assert len(queries) == 1
    assert queries[0]["sql"].startswith("SELECT COUNT(*)")


def test_a_round_reads_of_the_workers_it_claims_only_what_matching_needs():
    worker(name="box", batch_slots=2)
    queued_task()

    with CaptureQueriesContext(connection) as queries:
        assert dispatch_round() == 1

    claim = next(query["sql"] for query in queries if query["sql"].startswith('SELECT "scheduler_worker"'))
    selected = claim.split(" FROM ")[0]
    columns = {field.column for field in Worker._meta.concrete_fields if f'"{field.column}"' in selected}
    assert columns == set(CAPACITY_FIELDS)


@pytest.fixture
def fleet_nodes_made(monkeypatch) -> list[str]:
    """The names of the workers whose totals (`FleetNode.of`) are made while the test runs."""
    made: list[str] = []
    of = FleetNode.of.__func__
    monkeypatch.setattr(FleetNode, "of", classmethod(lambda cls, worker: made.append(worker.name) or of(cls, worker)))
    return made


def test_binding_active_reservations_reads_only_workers_with_gpus_enough_for_one(fleet_nodes_made):
    for index in range(5):
        worker(name=f"cpu-{index}")
    worker(name="one-gpu", gpu_count=1, gpu_type="A100")
    big = worker(name="eight-gpus", gpu_count=8, gpu_type="A100")
    reservation = ReservationFactory(gpu_count=4, gpu_type="A100")

    holds = current_holds(timezone.now())

    assert holds.by_worker == {big.id: {reservation.id: 4}}
    assert fleet_nodes_made == ["eight-gpus"]


def test_a_round_without_a_starving_task_builds_no_worker_totals(fleet_nodes_made):
    for index in range(3):
        worker(name=f"box-{index}")
    queued_task()

    assert dispatch_round() == 1

    assert fleet_nodes_made == []


# --- matching a round over many workers ---------------------------------------------------------

RESERVATIONS = [uuid.UUID(int=number) for number in (1, 2, 3)]


def _random_node(rng: random.Random, index: int) -> NodeCapacity:
    gpus = rng.choice([0, 0, 2, 4, 8])
    node = NodeCapacity(
        worker_id=uuid.UUID(int=rng.getrandbits(128)),
        name=f"w{rng.randrange(1000):03}-{index}",  # names in no particular order of creation
        hostname="",
        gpu_type=rng.choice(["A100", "H100"]) if gpus else "",
        cpu=rng.choice([4, 8, 8, 16]),
        memory_gb=rng.choice([16, 32, 32, 64]),
        gpu_indices=list(range(gpus)),
        batch_slots=rng.choice([1, 2, 4]),
        service_slots=rng.choice([0, 0, 1]),
    )
    if gpus and rng.random() < 0.2:
        node.held = {rng.choice(RESERVATIONS): rng.choice([1, 2])}
    return node


def _random_task(rng: random.Random) -> Task:
    gpu = rng.choice([0, 0, 0, 1, 2, 4])
    return Task(
        id=uuid.UUID(int=rng.getrandbits(128)),
        kind=rng.choice([Task.Kind.BATCH, Task.Kind.BATCH, Task.Kind.BATCH, Task.Kind.SERVICE]),
        gpu=gpu,
        gpu_type=rng.choice(["", "A100", "H100"]) if gpu else "",
        cpu=rng.choice([0, 1, 4, 8]),
        memory_gb=rng.choice([0, 8, 32]),
        node_count=rng.choice([1, 1, 1, 2, 3]),
        reservation_id=rng.choice([None, None, None, *RESERVATIONS]),
    )


@pytest.mark.parametrize("seed", range(40))
def test_nodes_grouped_alike_pick_what_a_scan_of_every_node_picks(seed):
    rng = random.Random(seed)
    nodes = [_random_node(rng, index) for index in range(rng.randint(1, 60))]
    if rng.random() < 0.3:
        rng.choice(nodes).held_for = uuid.UUID(int=rng.getrandbits(128))  # for a starving task none of these is
    alike = NodesAlike(nodes)

    for _ in range(80):
        task = _random_task(rng)
        picked = alike.pick(task)
        expected = pick_nodes(nodes, task)
        assert [node.name for node in picked or []] == [node.name for node in expected or []]
        if picked:
            alike.take(task, picked)
