"""Scheduling policies: what can never run, reservation holds, the starving head of line, fair share.

The rules are described with examples in docs/scheduling.md. Everything here
is pure or reads a bounded set of rows (the fleet, the active reservations, one
user's queued tasks at submission); nothing depends on the depth of the queue.
"""

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import reduce
from operator import add, or_
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import Case, Expression, Q, QuerySet, Value, When

from fetchml.compiled import compiled_count_per_shape, compiled_once
from fetchml.conf import app_settings
from scheduler.models import Reservation, Worker
from tasks.models import Task
from tasks.states import TaskStatus


@dataclass(frozen=True)
class Shape:
    """What one node of a task (or a reservation) needs."""

    gpu: int = 0
    gpu_type: str = ""
    cpu: int = 0
    memory_gb: int = 0
    node_count: int = 1
    kind: str = Task.Kind.BATCH


@dataclass(frozen=True)
class FleetNode:
    """A worker's total capacity (what it could hold when empty)."""

    worker_id: uuid.UUID
    name: str
    gpu_count: int
    gpu_type: str
    cpu_cores: int
    memory_gb: int
    batch_slots: int
    service_slots: int

    @classmethod
    def of(cls, worker: Worker) -> "FleetNode":
        return cls(
            worker_id=worker.id,
            name=worker.name,
            gpu_count=worker.gpu_count,
            gpu_type=worker.gpu_type,
            cpu_cores=worker.cpu_cores,
            memory_gb=worker.memory_gb,
            batch_slots=worker.batch_slots,
            service_slots=worker.service_slots,
        )


def node_could_ever_hold(node: FleetNode, shape: Shape) -> bool:
    """Whether an empty `node` could run one node of `shape`."""
    if shape.gpu and shape.gpu_type and node.gpu_type != shape.gpu_type:
        return False
    slots = node.service_slots if shape.kind == Task.Kind.SERVICE else node.batch_slots
    return (
        node.gpu_count >= shape.gpu and node.cpu_cores >= shape.cpu and node.memory_gb >= shape.memory_gb and slots > 0
    )


def _workers_that_could_ever_hold(
    *, kind: str, gpu: int, cpu: int, memory_gb: int, gpu_type: str | None = None
) -> QuerySet[Worker]:
    """`node_could_ever_hold` as a filter on workers (a `gpu_type` only when GPUs of a type are
    asked for), for counting them in the database; tests check that the two agree."""
    slots = "service_slots" if kind == Task.Kind.SERVICE else "batch_slots"
    fits = Q(gpu_count__gte=gpu, cpu_cores__gte=cpu, memory_gb__gte=memory_gb, **{f"{slots}__gt": 0})
    if gpu_type is not None:
        fits &= Q(gpu_type=gpu_type)
    return Worker.objects.filter(fits)


_count_workers_that_could_ever_hold = compiled_count_per_shape(_workers_that_could_ever_hold)


def workers_that_could_ever_hold(shape: Shape) -> int:
    """How many registered workers could, when empty, run one node of `shape`."""
    typed = {"gpu_type": shape.gpu_type} if shape.gpu and shape.gpu_type else {}
    return _count_workers_that_could_ever_hold(
        fixed={"kind": shape.kind}, gpu=shape.gpu, cpu=shape.cpu, memory_gb=shape.memory_gb, **typed
    )


def _task_fits(node: FleetNode) -> Q:
    """`node_could_ever_hold(node, task)` as a condition on tasks."""
    slots = ((Task.Kind.BATCH, node.batch_slots), (Task.Kind.SERVICE, node.service_slots))
    kinds = [kind for kind, count in slots if count > 0]
    fits = Q(kind__in=kinds, gpu__lte=node.gpu_count, cpu__lte=node.cpu_cores, memory_gb__lte=node.memory_gb)
    if node.gpu_count:
        fits &= Q(gpu=0) | Q(gpu_type="") | Q(gpu_type=node.gpu_type)
    return fits


def tasks_fleet_could_ever_run(fleet: list[FleetNode]) -> Q:
    """`node_could_ever_hold` as a filter on tasks: those with `node_count` nodes of `fleet` that
    could each hold one node of theirs (tests check that the two agree).

    One condition per group of nodes alike in capacity, not per node, so its size follows the
    kinds of workers in the fleet, not their number.
    """
    alike: dict[tuple, tuple[FleetNode, int]] = {}
    for node in fleet:
        if node.batch_slots or node.service_slots:
            key = (
                node.gpu_count,
                node.gpu_type,
                node.cpu_cores,
                node.memory_gb,
                node.batch_slots > 0,
                node.service_slots > 0,
            )
            first, count = alike.get(key, (node, 0))
            alike[key] = (first, count + 1)
    if not alike:
        return Q(pk__in=[])
    groups = [(_task_fits(node), count) for node, count in alike.values()]
    one_node = Q(node_count=1) & reduce(or_, (fits for fits, _ in groups))
    if sum(count for _, count in groups) < 2:
        return one_node
    nodes_that_fit: Expression = reduce(
        add, (Case(When(fits, then=Value(count)), default=Value(0)) for fits, count in groups)
    )
    return one_node | Q(node_count__gt=1, node_count__lte=nodes_that_fit)


def nodes_that_could_hold(shape: Shape, fleet: list[FleetNode]) -> int:
    """How many nodes of `fleet` could, when empty, run one node of `shape`."""
    return sum(1 for node in fleet if node_could_ever_hold(node, shape))


def fleet_lacks(shape: Shape, fleet: list[FleetNode]) -> list[str]:
    """The needs of one node of `shape` that no node of `fleet` meets on its own, in this order:
    "gpu_type", "gpu" (that many GPUs of its type), "cpu", "memory_gb", "slot" (of its kind). Empty
    when each need is met somewhere, if not all on one node.

    The one reading of why a fleet falls short: a refused submission, a refused reservation and a
    task's pending reason each phrase it their own way.
    """
    typed = bool(shape.gpu and shape.gpu_type)
    lacking = []
    if typed and not any(node.gpu_type == shape.gpu_type for node in fleet):
        lacking.append("gpu_type")
    elif shape.gpu > largest_gpu_count(shape, fleet):
        lacking.append("gpu")
    if shape.cpu > max((node.cpu_cores for node in fleet), default=0):
        lacking.append("cpu")
    if shape.memory_gb > max((node.memory_gb for node in fleet), default=0):
        lacking.append("memory_gb")
    if not any(node_could_ever_hold(node, Shape(kind=shape.kind)) for node in fleet):
        lacking.append("slot")
    return lacking


def largest_gpu_count(shape: Shape, fleet: list[FleetNode]) -> int:
    """The most GPUs a node of `fleet` has of the type `shape` asks for (of any type when it names none)."""
    typed = bool(shape.gpu and shape.gpu_type)
    return max((node.gpu_count for node in fleet if not typed or node.gpu_type == shape.gpu_type), default=0)


def plural(count: int, unit: str) -> str:
    return f"{count} {unit}" if count == 1 else f"{count} {unit}s"


def beyond_the_fleet(shape: Shape, fleet: list[FleetNode]) -> str:
    """What no node of `fleet` has of one node of `shape`: each need that none meets alone, or else
    all of them together."""
    gpus = plural(shape.gpu, "GPU") + (f" of type {shape.gpu_type}" if shape.gpu and shape.gpu_type else "")
    words = {
        "gpu_type": f"GPUs of type {shape.gpu_type}",
        "gpu": gpus,
        "cpu": plural(shape.cpu, "CPU core"),
        "memory_gb": f"{shape.memory_gb} GB of memory",
        "slot": f"a {shape.kind} slot",
    }
    if lacking := fleet_lacks(shape, fleet):
        return " or ".join(words[need] for need in lacking)
    wanted = [words[need] for need in ("gpu", "cpu", "memory_gb") if getattr(shape, need)]
    return ", ".join(wanted) + f" and {words['slot']} at once"


def fleet_shortfall(shape: Shape, fleet: list[FleetNode]) -> str | None:
    """Why no set of `fleet` nodes could ever run `shape`, or None if one could."""
    fitting = nodes_that_could_hold(shape, fleet)
    if fitting >= shape.node_count:
        return None
    lacking = fleet_lacks(shape, fleet)
    if "gpu_type" in lacking:
        return f"no registered worker has GPUs of type {shape.gpu_type}"
    for need, what, have in (
        ("gpu", "GPUs", lambda: largest_gpu_count(shape, fleet)),
        ("cpu", "CPU cores", lambda: max(node.cpu_cores for node in fleet)),
        ("memory_gb", "GB of memory", lambda: max(node.memory_gb for node in fleet)),
    ):
        if need in lacking:
            return f"{getattr(shape, need)} {what} per node requested; the largest registered worker has {have()}"
    if shape.kind == Task.Kind.SERVICE and "slot" in lacking:
        return "no registered worker has service slots"
    if not fitting:  # each need is met somewhere, never all on one worker
        return f"no registered worker has {beyond_the_fleet(shape, fleet)}"
    return f"{shape.node_count} nodes requested; only {fitting} registered worker(s) could hold one node each"


def registered_fleet() -> list[FleetNode]:
    """Every registered worker, offline ones included: they are expected back."""
    return [FleetNode.of(worker) for worker in _registered_workers()]


def active_fleet() -> list[FleetNode]:
    """The workers taking work now: what a task can run on until others connect."""
    return [FleetNode.of(worker) for worker in Worker.objects.filter(status=Worker.Status.ACTIVE).only(*FLEET_FIELDS)]


# What `FleetNode.of` reads of a worker: every read it is made from loads at least these.
FLEET_FIELDS = ("id", "name", "gpu_count", "gpu_type", "cpu_cores", "memory_gb", "batch_slots", "service_slots")
# Read to bind reservations and to explain a refused submission: compiled once.
_registered_workers = compiled_once(lambda: Worker.objects.only(*FLEET_FIELDS).order_by())


def unschedulable_reason(shape: Shape) -> tuple[str | None, str] | None:
    """Why no registered worker could ever run `shape`, as (the field of the request it cannot meet,
    None when only several together cannot be, the reason); None if one could, or if no worker is
    registered yet.

    Asked at every submission: answered by counting in the database, so its cost does not
    grow with the fleet; only a refusal reads the fleet, to say what is missing.
    """
    if workers_that_could_ever_hold(shape) >= shape.node_count:
        return None
    fleet = registered_fleet()
    if not fleet:
        return None  # a fresh installation: accept work before the first worker says hello
    reason = fleet_shortfall(shape, fleet)
    if reason is None:
        return None
    lacking = fleet_lacks(shape, fleet)
    named = [field for field in ("gpu_type", "gpu", "cpu", "memory_gb") if field in lacking]
    if named:
        return named[0], reason
    if shape.kind == Task.Kind.SERVICE and "slot" in lacking:
        return "kind", reason
    return ("node_count" if nodes_that_could_hold(shape, fleet) else None), reason


# --- reservations ----------------------------------------------------------


def task_shape(task: Task) -> Shape:
    return Shape(
        gpu=task.gpu,
        gpu_type=task.gpu_type,
        cpu=task.cpu,
        memory_gb=task.memory_gb,
        node_count=task.node_count,
        kind=task.kind,
    )


def reservation_shape(reservation: Reservation) -> Shape:
    return Shape(gpu=reservation.gpu_count, gpu_type=reservation.gpu_type, node_count=reservation.node_count)


def place_reservations(
    reservations: Iterable[Reservation], fleet: list[FleetNode]
) -> tuple[dict[uuid.UUID, list[uuid.UUID]], list[Reservation]]:
    """Bind each reservation to specific workers: ({reservation id: worker ids}, the ones that do not fit).

    Greedy in creation order (oldest first); a worker can hold several
    reservations while its GPUs last, one batch slot each. Best fit on the
    workers' totals, then name, so the binding is stable from round to round
    whatever the load.
    """
    gpus_left = {node.worker_id: node.gpu_count for node in fleet}
    slots_left = {node.worker_id: node.batch_slots for node in fleet}
    placed: dict[uuid.UUID, list[uuid.UUID]] = {}
    refused: list[Reservation] = []
    for reservation in sorted(reservations, key=lambda r: (r.created_at, str(r.id))):
        shape = reservation_shape(reservation)
        fitting = [
            node
            for node in fleet
            if node_could_ever_hold(node, shape)
            and gpus_left[node.worker_id] >= shape.gpu
            and slots_left[node.worker_id] > 0
        ]
        if len(fitting) < shape.node_count:
            refused.append(reservation)
            continue
        fitting.sort(key=lambda node: (gpus_left[node.worker_id] - shape.gpu, node.name))
        chosen = fitting[: shape.node_count]
        for node in chosen:
            gpus_left[node.worker_id] -= shape.gpu
            slots_left[node.worker_id] -= 1
        placed[reservation.id] = [node.worker_id for node in chosen]
    return placed, refused


def overlapping_reservations(*, starts_at: datetime, expires_at: datetime) -> list[Reservation]:
    """Live (pending or active) reservations whose window meets [starts_at, expires_at)."""
    live = (Reservation.Status.PENDING, Reservation.Status.ACTIVE)
    return list(Reservation.objects.filter(status__in=live, starts_at__lt=expires_at, expires_at__gt=starts_at))


@dataclass
class Holds:
    """The capacity active reservations hold this round, per worker: {reservation id: GPUs}."""

    by_worker: dict[uuid.UUID, dict[uuid.UUID, int]] = field(default_factory=dict)
    active: set[uuid.UUID] = field(default_factory=set)
    waiting: set[uuid.UUID] = field(default_factory=set)  # booked for a later window


# Every dispatch round reads them: one query, compiled once. The ones past their end
# (until the maintenance pass expires them) are left out below.
_pending_or_active_reservations = compiled_once(
    lambda: Reservation.objects.filter(status__in=(Reservation.Status.PENDING, Reservation.Status.ACTIVE))
)


def current_holds(now: datetime) -> Holds:
    """Bind the active reservations to active workers (bounded: the fleet and the live reservations)."""
    live = [reservation for reservation in _pending_or_active_reservations() if reservation.expires_at > now]
    active, waiting = [], set()
    for reservation in live:
        if reservation.status == Reservation.Status.ACTIVE and reservation.starts_at <= now:
            active.append(reservation)
        else:
            waiting.add(reservation.id)
    holds = Holds(active={r.id for r in active}, waiting=waiting)
    if not active:
        return holds
    # A worker with fewer GPUs than the smallest reservation holds none (`node_could_ever_hold`):
    # not read, so a round's cost does not grow with the CPU-only part of the fleet.
    smallest = min(reservation.gpu_count for reservation in active)
    workers = Worker.objects.filter(status=Worker.Status.ACTIVE, gpu_count__gte=smallest).only(*FLEET_FIELDS)
    placed, _ = place_reservations(active, [FleetNode.of(worker) for worker in workers])
    gpus = {r.id: r.gpu_count for r in active}
    for reservation_id, worker_ids in placed.items():
        for worker_id in worker_ids:
            holds.by_worker.setdefault(worker_id, {})[reservation_id] = gpus[reservation_id]
    return holds


# --- anti-starvation -------------------------------------------------------------


def starving_since(now: datetime) -> datetime:
    """Tasks queued at or before this moment have waited past the starvation threshold."""
    return now - timedelta(seconds=app_settings.STARVATION_SECONDS)


def is_starving(task: Task, now: datetime) -> bool:
    """The head of the line has waited past the threshold: capacity is held for it."""
    return task.queued_at <= starving_since(now)


# --- fairness between users ----------------------------------------------------------


def fair_share_offset(*, owner: AbstractBaseUser, priority: int) -> float:
    """How far below its plain dispatch key a new task of `owner` starts.

    FAIR_SHARE_STEP per task the owner already has queued at this priority or
    above: a burst of one user interleaves with other users' work at equal
    priority instead of locking it out, while the owner's own higher-priority
    work is not pushed behind their lower-priority backlog.
    """
    step = app_settings.FAIR_SHARE_STEP
    if not step:
        return 0.0
    return step * _queued_at_or_above(owner_id=owner.pk, priority=priority)


# Counted at every submission: compiled.
def _queued_at_or_above_query(*, owner_id: Any, priority: int) -> QuerySet[Task]:
    return Task.objects.filter(owner_id=owner_id, status=TaskStatus.QUEUED, priority__gte=priority)


_queued_at_or_above = compiled_count_per_shape(_queued_at_or_above_query)
