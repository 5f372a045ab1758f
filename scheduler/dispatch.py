"""Dispatch: match runnable tasks to free worker capacity, in one transaction.

Every row-locking query of the scheduler lives in this module. A round:

1. claims active workers with a free slot (`FOR UPDATE SKIP LOCKED`, so two
   schedulers never hold the same worker's counters); no worker, no round;
2. claims up to `SCHEDULER_BATCH_SIZE` runnable tasks in dispatch order
   (`FOR UPDATE SKIP LOCKED`), pre-filtered to what some claimed worker could
   hold, so unplaceable tasks do not occupy the whole batch. The query is
   served by the partial index `task_runnable_by_priority`, whatever the
   planner's statistics say (`_queue_read_in_index_order`); its cost depends
   on the batch size, not on the depth of the queue;
3. matches greedily in that order, best fit first (a multi-node task takes all
   its nodes on distinct workers or none), trying each task against one
   worker of each group of workers alike (`NodesAlike`), not against every one;
4. writes the assignments, the workers' used_* counters (the CHECK constraint
   refuses any overcommit), the task transitions, the reservations claimed and
   one audit append, builds the `assign` messages (scheduler/assigns.py) and,
   after commit, hands them to each worker's channel group, sealed.

Policies applied while matching (scheduler/policies.py, docs/scheduling.md):
active reservations hold GPUs and a batch slot on specific workers against
every task that does not name them, and a task naming an active reservation
runs only on the workers it holds; when the head of the line has waited past
STARVATION_SECONDS and still does not fit, the nodes it could use are held for
it and smaller tasks are backfilled only on the others.

Rounds run in the scheduler loop and, with `FETCHML_DISPATCH_ON_SUBMIT`,
inside the transaction of a submission (`dispatch_at_submission`), so a task
submitted while a worker is free leaves assigned.

Workers are claimed before tasks (the reverse of the order in the architecture
page) so that a round without free capacity locks no task at all. On SQLite
`select_for_update` is a no-op; the round is serialised by the database write
lock taken at BEGIN (`transaction_mode=IMMEDIATE`).

Audit at dispatch: one `job_started` event per placed task with action
`assign` (workers, attempt, GPU indices), appended with a single
`record_many` per round. The worker's `running` report adds the second
`job_started` event (action `running`) through `task_transition`.
"""

import logging
import uuid
from bisect import insort
from collections import defaultdict
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from django.db import transaction
from django.db.models import F, Q, QuerySet
from django.utils import timezone

from audit.services import Entry, record_many, unrecorded_if_rolled_back
from fetchml import events
from fetchml.bulk import insert_rows
from fetchml.compiled import compiled_once, compiled_per_shape, compiled_update_per_shape
from fetchml.conf import app_settings
from fetchml.instances import unsaved
from fetchml.planner import planned_without
from scheduler.assigns import ASSIGN_TASK_FIELDS, assign_notice, round_assign_messages
from scheduler.counters import change_used
from scheduler.models import NodeAssignment, Reservation, Worker
from scheduler.policies import (
    FLEET_FIELDS,
    FleetNode,
    Holds,
    active_fleet,
    current_holds,
    is_starving,
    node_could_ever_hold,
    nodes_that_could_hold,
    starving_since,
    task_shape,
    tasks_fleet_could_ever_run,
)
from tasks.models import Task
from tasks.selectors import owner_username
from tasks.states import NO_OUTCOME, TaskStatus

logger = logging.getLogger("fetchml.scheduler.dispatch")


@dataclass
class NodeCapacity:
    """What one worker has free right now (a snapshot the matcher consumes)."""

    worker_id: uuid.UUID
    name: str
    hostname: str
    gpu_type: str
    cpu: int
    memory_gb: int
    gpu_indices: list[int]
    batch_slots: int
    service_slots: int
    taken: list[tuple[str, int]] = field(default_factory=list)
    worker: Worker | None = field(default=None, repr=False, compare=False)
    # reservation id -> GPUs it holds here (each also holds one batch slot)
    held: dict[uuid.UUID, int] = field(default_factory=dict)
    held_for: uuid.UUID | None = None  # a starving head-of-line task

    @classmethod
    def of(cls, worker: Worker, busy_gpus: set[int]) -> "NodeCapacity":
        free_count = max(worker.gpu_count - worker.used_gpus, 0)
        free = [index for index in range(worker.gpu_count) if index not in busy_gpus][:free_count]
        return cls(
            worker_id=worker.id,
            name=worker.name,
            hostname=worker.hostname,
            gpu_type=worker.gpu_type,
            cpu=worker.cpu_cores - worker.used_cpu,
            memory_gb=worker.memory_gb - worker.used_memory_gb,
            gpu_indices=free,
            batch_slots=worker.batch_slots - worker.used_batch_slots,
            service_slots=worker.service_slots - worker.used_service_slots,
            worker=worker,
        )

    @property
    def total(self) -> FleetNode | None:
        """What the worker could hold when empty; asked only for a starving head of the line, so
        not made for every free worker of every round."""
        return FleetNode.of(self.worker) if self.worker is not None else None

    def slots(self, kind: str) -> int:
        return self.service_slots if kind == Task.Kind.SERVICE else self.batch_slots

    def take(self, task: Task) -> list[int]:
        """Consume one node of `task`; returns the GPU indices it gets."""
        gpus, self.gpu_indices = self.gpu_indices[: task.gpu], self.gpu_indices[task.gpu :]
        self.cpu -= task.cpu
        self.memory_gb -= task.memory_gb
        if task.kind == Task.Kind.SERVICE:
            self.service_slots -= 1
        else:
            self.batch_slots -= 1
        return gpus


def held_from(node: NodeCapacity, reservation_id: uuid.UUID | None) -> tuple[int, int]:
    """(GPUs, batch slots) on `node` held by reservations other than `reservation_id` (all of them
    for a task naming none): what the matcher keeps from a task, and the worker list shows as reserved."""
    return held_by_others(node.held, reservation_id)


def held_by_others(held: dict[uuid.UUID, int], reservation_id: uuid.UUID | None) -> tuple[int, int]:
    """(GPUs, batch slots) that reservations other than `reservation_id` hold, of `held` (one
    worker's: {reservation id: GPUs}, each also holding a batch slot)."""
    others = [gpus for held_id, gpus in held.items() if held_id != reservation_id]
    return sum(others), len(others)


def shortfall(node: NodeCapacity, task: Task) -> str | None:
    """The first resource `node` lacks for one node of `task`, or None if it fits.

    The one matching rule, shared by dispatch and by "why is my job queued?".
    """
    # A starving head's hold does not cover what a reservation holds here: that is its owner's.
    if node.held_for is not None and node.held_for != task.id and task.reservation_id not in node.held:
        return "held"
    held_gpus, held_slots = held_from(node, task.reservation_id)
    if task.gpu and task.gpu_type and node.gpu_type != task.gpu_type:
        return "gpu_type"
    if len(node.gpu_indices) - held_gpus < task.gpu:
        return "reserved" if held_gpus and len(node.gpu_indices) >= task.gpu else "gpus"
    if node.cpu < task.cpu:
        return "cpu"
    if node.memory_gb < task.memory_gb:
        return "memory"
    free_slots = node.slots(task.kind) - (held_slots if task.kind == Task.Kind.BATCH else 0)
    if free_slots < 1:
        return "reserved" if node.slots(task.kind) >= 1 else "slot"
    return None


def _fit_key(node: NodeCapacity, task: Task) -> tuple:
    # Best fit: leave the fewest GPUs, then cores, stranded next to this task.
    return (len(node.gpu_indices) - task.gpu, node.cpu - task.cpu, node.memory_gb - task.memory_gb, node.name)


def eligible_nodes(nodes: list[NodeCapacity], task: Task, holds: Holds | None = None) -> list[NodeCapacity]:
    """The nodes `task` may use at all: those holding its reservation while that is active; none while it waits.

    `nodes` itself (the same list) when its reservation narrows nothing."""
    if holds is None or task.reservation_id is None:
        return nodes
    if task.reservation_id in holds.waiting:
        return []
    if task.reservation_id in holds.active:
        return [node for node in nodes if task.reservation_id in node.held]
    return nodes  # expired, cancelled or already claimed: an ordinary task


def pick_nodes(nodes: list[NodeCapacity], task: Task, holds: Holds | None = None) -> list[NodeCapacity] | None:
    """`task.node_count` distinct nodes that can each hold one node of it, or None."""
    fitting = [node for node in eligible_nodes(nodes, task, holds) if shortfall(node, task) is None]
    if len(fitting) < task.node_count:
        return None
    return sorted(fitting, key=lambda node: _fit_key(node, task))[: task.node_count]


def _alike_key(node: NodeCapacity) -> tuple:
    # All that `shortfall` and `_fit_key` read of a node but its name: nodes with the same key
    # answer every task alike, and of those the first by name fits best.
    held = tuple(sorted(node.held.items())) if node.held else ()
    return (
        node.gpu_type,
        len(node.gpu_indices),
        node.cpu,
        node.memory_gb,
        node.batch_slots,
        node.service_slots,
        node.held_for,
        held,
    )


def _by_name(node: NodeCapacity) -> str:
    return node.name


class NodesAlike:
    """A round's nodes grouped by free capacity (`_alike_key`), each group in name order.

    `pick` asks `shortfall` once per group, not once per node, and chooses
    what `pick_nodes` would (tests compare the two): a round of 32 tasks over
    1,000 idle workers alike asks 32 x 1 questions instead of 32 x 1,000.
    """

    def __init__(self, nodes: list[NodeCapacity]) -> None:
        self.groups: dict[tuple, list[NodeCapacity]] = defaultdict(list)
        for node in sorted(nodes, key=_by_name):
            self.groups[_alike_key(node)].append(node)

    def pick(self, task: Task) -> list[NodeCapacity] | None:
        """`task.node_count` distinct nodes that can each hold one node of it, the best fitting; or None."""
        fitting = [group for group in self.groups.values() if shortfall(group[0], task) is None]
        if sum(len(group) for group in fitting) < task.node_count:
            return None
        # A group's best are its first by name; the best of all are among the groups' best.
        candidates = [node for group in fitting for node in group[: task.node_count]]
        return sorted(candidates, key=lambda node: _fit_key(node, task))[: task.node_count]

    def take(self, task: Task, picked: list[NodeCapacity]) -> list[tuple[NodeCapacity, list[int]]]:
        """Each picked node takes one node of `task` (`NodeCapacity.take`) and joins its new group."""
        taken = []
        for node in picked:
            key = _alike_key(node)
            group = self.groups[key]
            del group[next(index for index, member in enumerate(group) if member is node)]
            if not group:
                del self.groups[key]
            taken.append((node, node.take(task)))
            insort(self.groups[_alike_key(node)], node, key=_by_name)
        return taken


def capacities(workers: list[Worker], holds: Holds | None = None) -> list[NodeCapacity]:
    """Free capacity of `workers`, with the GPU indices their live assignments do not hold.

    With `holds`, each node also carries what active reservations hold on it.
    """
    busy: dict[uuid.UUID, set[int]] = defaultdict(set)
    gpu_workers = [worker.id for worker in workers if worker.gpu_count]
    if gpu_workers:
        live = NodeAssignment.objects.filter(worker_id__in=gpu_workers, holds_capacity=True, gpus__gt=0)
        for worker_id, indices in live.values_list("worker_id", "gpu_indices"):
            busy[worker_id].update(indices or [])
    nodes = [NodeCapacity.of(worker, busy[worker.id]) for worker in workers]
    if holds is not None:
        for node in nodes:
            node.held = dict(holds.by_worker.get(node.worker_id, {}))
    return nodes


# What a round reads of a task: matching, holds, the assignment, the audit, the
# publication, and the `assign` messages it builds. A claim is bounded by the
# free slots (each placed task takes one), and the rest of the row is large.
_ROUND_FIELDS = (
    "id",
    "owner_id",
    "status",
    "priority",
    "attempt",
    "worker_id",
    "kind",
    "cpu",
    "memory_gb",
    "gpu",
    "gpu_type",
    "node_count",
    "reservation_id",
    "queued_at",
)
DISPATCH_FIELDS = tuple(dict.fromkeys(_ROUND_FIELDS + ASSIGN_TASK_FIELDS))


def runnable_tasks(now: datetime) -> QuerySet[Task]:
    """Queued tasks past their back-off, in dispatch order (the partial index's order)."""
    return (
        Task.objects.filter(status=TaskStatus.QUEUED)
        .filter(Q(runnable_after__isnull=True) | Q(runnable_after__lte=now))
        .order_by("-dispatch_key", "created_at")
    )


# What matching reads of a worker (`NodeCapacity.of`): its totals and what is in use. A round reads
# every free worker, so the rest of the row (its times above all, parsed one by one) would be paid
# per worker and round.
CAPACITY_FIELDS = (
    *FLEET_FIELDS,
    "hostname",
    "channel_name",
    "used_gpus",
    "used_cpu",
    "used_memory_gb",
    "used_batch_slots",
    "used_service_slots",
)


def _claimable_workers() -> QuerySet[Worker]:
    free_slot = Q(used_batch_slots__lt=F("batch_slots")) | Q(used_service_slots__lt=F("service_slots"))
    claimed = Worker.objects.select_for_update(skip_locked=True).filter(free_slot, Worker.taking_work())
    return claimed.only(*CAPACITY_FIELDS).order_by("name")


_claim_workers_query = compiled_once(_claimable_workers)


def claim_workers() -> list[Worker]:
    return list(_claim_workers_query())


def claim_bound(nodes: list[NodeCapacity]) -> int:
    """At most how many tasks to claim for `nodes`: every placed task takes a slot, so their free
    slots, rounded up to a power of two (the claim's SQL is compiled once per LIMIT)."""
    free = sum(max(node.batch_slots, 0) + max(node.service_slots, 0) for node in nodes)
    return 1 << max(free - 1, 0).bit_length()


def claim_tasks_query(nodes: list[NodeCapacity], *, limit: int, now: datetime) -> QuerySet[Task]:
    """The task claim: runnable, could fit some claimed node, best first, locked."""
    return _claim_tasks_queryset(limit=limit, now=now, **_claim_filter(nodes))


def claim_tasks(nodes: list[NodeCapacity], *, limit: int, now: datetime) -> list[Task]:
    """`claim_tasks_query`'s rows, its SQL compiled once per shape (every round runs it)."""
    return list(_compiled_claim(fixed={"limit": limit}, now=now, **_claim_filter(nodes)))


def _claim_filter(nodes: list[NodeCapacity]) -> dict[str, Any]:
    return {
        "kinds": [kind for kind in Task.Kind.values if any(node.slots(kind) > 0 for node in nodes)],
        "cpu": max(node.cpu for node in nodes),
        "memory_gb": max(node.memory_gb for node in nodes),
        "gpu": max(len(node.gpu_indices) for node in nodes),
        "node_count": len(nodes),
        "gpu_types": sorted({node.gpu_type for node in nodes if node.gpu_indices}),
    }


def _claim_tasks_queryset(
    *, limit: int, now: datetime, kinds: list[str], cpu: int, memory_gb: int, gpu: int, node_count: int, gpu_types: list
) -> QuerySet[Task]:
    return (
        runnable_tasks(now)
        .only(*DISPATCH_FIELDS)
        # The owner's name for the audit, without a query of its own.
        .annotate(owner_username=owner_username())
        .select_for_update(skip_locked=True, of=("self",))
        .filter(kind__in=kinds, cpu__lte=cpu, memory_gb__lte=memory_gb, gpu__lte=gpu, node_count__lte=node_count)
        .filter(Q(gpu=0) | Q(gpu_type="") | Q(gpu_type__in=gpu_types))[:limit]
    )


_compiled_claim = compiled_per_shape(_claim_tasks_queryset)


@dataclass
class Placement:
    task: Task
    nodes: list[tuple[NodeCapacity, list[int]]]


def match(tasks: list[Task], nodes: list[NodeCapacity], holds: Holds | None = None) -> list[Placement]:
    """Greedy in dispatch order: each task takes the best-fitting nodes left, all or none.

    A task placed on its reservation claims it: the hold ends for the rest of
    the round (the task's own assignments now hold that capacity).
    """
    placements = []
    alike = NodesAlike(nodes)
    for task in tasks:
        eligible = eligible_nodes(nodes, task, holds)
        # A task on its reservation may use only the few nodes that hold it: those are scanned.
        picked = alike.pick(task) if eligible is nodes else pick_nodes(eligible, task)
        if picked is None:
            continue
        placements.append(Placement(task=task, nodes=alike.take(task, picked)))
        if holds is not None and task.reservation_id in holds.active:
            holds.active.discard(task.reservation_id)
            for node in nodes:
                node.held.pop(task.reservation_id, None)
            alike = NodesAlike(nodes)  # the nodes that held it are alike with others now
    return placements


def _queue_read_in_index_order() -> AbstractContextManager[None]:
    """Plan the enclosed reads of the queue as walks of the partial index whose order they ask for
    (`task_runnable_by_priority`, `task_queued_since`), whatever the statistics say.

    Right after a burst of submissions (and in a new database) the planner's
    statistics can put the queue at a handful of rows; the claim is then
    planned as a read and a sort of the whole queue for its LIMIT (60 to 75 ms
    a round at 30,000 queued tasks, growing with the depth) instead of a walk
    of the index's first rows (under 1 ms). With sorting off for these reads
    the walk is the only plan left.
    """
    return planned_without("sort")


_line_head = compiled_per_shape(lambda *, now: runnable_tasks(now).only(*DISPATCH_FIELDS)[:1])


def any_task_may_starve(now: datetime) -> bool:
    """Whether some runnable task has waited past the starvation threshold.

    One probe of the longest-waiting queued tasks (`task_queued_since`), read
    in that index's order whatever the statistics say: looked for among the
    queue in dispatch order, a queue without a starving task was read whole
    (about 100 ms at a million queued tasks, every maintenance pass).
    """
    with transaction.atomic(), _queue_read_in_index_order():
        oldest = _longest_waiting(now=now)
    return bool(oldest) and oldest[0].queued_at <= starving_since(now)


_longest_waiting = compiled_per_shape(
    lambda *, now: runnable_tasks(now).order_by("queued_at").only("id", "queued_at")[:1]
)


def _starving_head(nodes: list[NodeCapacity], holds: Holds, now: datetime) -> Task | None:
    """The head of the line to hold capacity for: starving, not placed by this round, and one the
    active workers could run when empty.

    A head they never could (queued with `allow_unschedulable`, or a gang wider than the workers
    that could each hold a node of it, other users' reservations on them set aside while those
    last) is passed over for the first task behind it they could run:
    capacity held for it would stay idle until more workers connect, and the tasks behind it would
    starve instead. The workers are read only once the head is found starving.
    """

    def waits_in_vain(task: Task | None) -> bool:
        return task is not None and is_starving(task, now) and pick_nodes(nodes, task, holds) is None

    head = next(iter(_line_head(now=now)), None)
    if not waits_in_vain(head):
        return None
    # Other users' reservations set aside: while they last, the workers they hold may be no use to it.
    fleet = [_less_held(node, holds.by_worker.get(node.worker_id, {}), head) for node in active_fleet()]
    if nodes_that_could_hold(task_shape(head), fleet) >= head.node_count:
        return head
    behind = runnable_tasks(now).filter(tasks_fleet_could_ever_run(fleet)).only(*DISPATCH_FIELDS).first()
    return behind if waits_in_vain(behind) else None


def hold_for_starving_head(nodes: list[NodeCapacity], holds: Holds, now: datetime) -> Task | None:
    """Anti-starvation: hold nodes for the head of the line if it has waited too long and does not fit.

    The head is the first runnable task in dispatch order that the active
    workers could run (`_starving_head`, read without a lock). Of the claimed
    nodes it could use when empty, the `node_count` with the most free GPUs,
    then cores, are held for it; the rest of the round backfills other tasks on the remaining nodes only. Aging
    brings every long-waiting task to the head eventually.
    """
    head = _starving_head(nodes, holds, now)
    if head is None:
        return None
    shape = task_shape(head)
    usable = [
        node
        for node in eligible_nodes(nodes, head, holds)
        if (total := node.total) is not None and node_could_ever_hold(_less_held(total, node.held, head), shape)
    ]
    usable.sort(key=lambda node: (-len(node.gpu_indices), -node.cpu, -node.memory_gb, node.name))
    for node in usable[: head.node_count]:
        node.held_for = head.id
    return head


def _less_held(total: FleetNode, held: dict[uuid.UUID, int], task: Task) -> FleetNode:
    """What a worker could give `task` when empty, less what reservations other than its own hold
    there (`held`: the worker's reservations): a worker those keep from it would be held for it in vain."""
    held_gpus, held_slots = held_by_others(held, task.reservation_id)
    if not held_gpus and not held_slots:
        return total
    return replace(total, gpu_count=total.gpu_count - held_gpus, batch_slots=total.batch_slots - held_slots)


def dispatch_round(
    *, batch_size: int | None = None, now: datetime | None = None, starvation_possible: bool = True
) -> int:
    """One dispatch round; returns how many tasks were placed.

    `starvation_possible=False` (the caller knows from `any_task_may_starve`
    that no runnable task had waited past the threshold a moment ago) skips
    looking for a starving head of the line.
    """
    return len(_placed_by_a_round(batch_size=batch_size, now=now, starvation_possible=starvation_possible))


def _placed_by_a_round(*, batch_size: int | None, now: datetime | None, starvation_possible: bool) -> list[Placement]:
    limit = batch_size or app_settings.SCHEDULER_BATCH_SIZE
    now = now or timezone.now()
    with transaction.atomic():
        workers = claim_workers()
        if not workers:
            return []
        holds = current_holds(now)
        nodes = capacities(workers, holds)
        with _queue_read_in_index_order():
            tasks = claim_tasks(nodes, limit=min(limit, claim_bound(nodes)), now=now)
            head = hold_for_starving_head(nodes, holds, now) if starvation_possible else None
        if head is not None:
            logger.info("holding capacity for starving task %s", head.id)
        placements = match(tasks, nodes, holds)
        _write(placements, now)
    if placements:
        placed_on = {node.worker_id for placement in placements for node, _ in placement.nodes}
        logger.info("dispatched %d task(s) to %d worker(s)", len(placements), len(placed_on))
    return placements


def dispatch_at_submission(*, task: Task) -> bool:
    """A dispatch round inside the transaction that queues `task` (`FETCHML_DISPATCH_ON_SUBMIT`).

    A task submitted while a worker is free starts without a trip through the
    scheduler: its assignment commits with the submission and the `assign`
    leaves on that commit. It is the scheduler's own round, so the dispatch
    order holds (a free worker goes to the best runnable task, which need not
    be this one) and it is as safe beside running schedulers as they are
    beside each other. A round that fails is rolled back to its savepoint,
    messages and audit events included, and logged: the submission stands,
    and the scheduler places the task. Returns whether `task` was placed (its
    row in memory is brought up to date); False at once with the setting off.
    """
    if not app_settings.DISPATCH_ON_SUBMIT:
        return False
    try:
        with events.unsent_if_rolled_back(), unrecorded_if_rolled_back():
            placements = _placed_by_a_round(batch_size=None, now=None, starvation_possible=True)
    except Exception:
        logger.exception("dispatch at the submission of task %s failed; the scheduler will place it", task.id)
        return False
    placed = next((placement.task for placement in placements if placement.task.id == task.id), None)
    if placed is None:
        return False
    # The round's copy of the row is what the database now holds, for the fields it loaded.
    for name in {column.attname for column in Task._meta.concrete_fields} - placed.get_deferred_fields():
        setattr(task, name, getattr(placed, name))
    return True


def _mark_preparing(placements: list[Placement], now: datetime) -> None:
    """queued -> preparing for the whole round: one UPDATE by primary key per rank-0 worker.

    The claim locked these rows as queued (the write lock on SQLite) until
    the round commits, so no state is checked again: a check of `status`
    would let the planner, on statistics a burst has outdated, read every
    queued task instead of the claimed ones. A row missing aborts the round.
    """
    by_worker: dict[uuid.UUID, list[uuid.UUID]] = defaultdict(list)
    for placement in placements:
        by_worker[placement.nodes[0][0].worker_id].append(placement.task.id)
    for worker_id, task_ids in by_worker.items():
        if _preparing(ids=task_ids, worker_id=worker_id, now=now) != len(task_ids):
            raise RuntimeError("claimed tasks disappeared while locked by the dispatch round")
    notices = []
    for placement in placements:
        task = placement.task
        task.status, task.attempt, task.worker_id, task.updated_at = (
            TaskStatus.PREPARING,
            task.attempt + 1,
            placement.nodes[0][0].worker_id,
            now,
        )
        for name, value in NO_OUTCOME.items():
            setattr(task, name, value)
        notices.append(events.task_event(task, event="task_update"))
    events.send_all_on_commit(notices)


def _preparing_update(*, ids: list[uuid.UUID], worker_id: uuid.UUID, now: datetime) -> tuple:
    changes = {
        "status": TaskStatus.PREPARING,
        "worker_id": worker_id,
        "attempt": F("attempt") + 1,
        "updated_at": now,
        **NO_OUTCOME,
    }
    return Task.objects.filter(id__in=ids), changes


_preparing = compiled_update_per_shape(_preparing_update)


def _write(placements: list[Placement], now: datetime) -> int:
    if not placements:
        return 0
    _mark_preparing(placements, now)
    assignments: list[NodeAssignment] = []
    used: dict[uuid.UUID, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    audit: list[Entry] = []
    for placement in placements:
        task = placement.task
        attempt = task.attempt
        for rank, (node, gpu_indices) in enumerate(placement.nodes):
            assignments.append(
                unsaved(
                    NodeAssignment,
                    task_id=task.id,
                    attempt=attempt,
                    node_id=rank,
                    worker_id=node.worker_id,
                    slot_kind=task.kind,
                    cpu=task.cpu,
                    memory_gb=task.memory_gb,
                    gpus=task.gpu,
                    gpu_indices=gpu_indices,
                    created_at=now,
                )
            )
            counters = used[node.worker_id]
            counters["used_cpu"] += task.cpu
            counters["used_memory_gb"] += task.memory_gb
            counters["used_gpus"] += task.gpu
            counters["used_service_slots" if task.kind == Task.Kind.SERVICE else "used_batch_slots"] += 1
        audit.append(
            Entry(
                event_type="job_started",
                user=task.owner_username,
                resource=f"task:{task.id}",
                action="assign",
                metadata={
                    "attempt": attempt,
                    "workers": [node.name for node, _ in placement.nodes],
                    "gpu_indices": [indices for _, indices in placement.nodes],
                },
            )
        )
    audit.extend(_claim_reservations(placements))
    insert_rows(assignments)
    for worker_id, counters in used.items():
        change_used(worker_id, counters)
    record_many(audit)
    # Built here, from the rows just written: the worker's connection only relays them.
    rank0 = {placement.task.id: (placement.task, placement.nodes[0][0].hostname) for placement in placements}
    by_worker: dict[uuid.UUID, list[dict]] = defaultdict(list)
    for assignment, message in zip(assignments, round_assign_messages(assignments, rank0), strict=True):
        by_worker[assignment.worker_id].append(message)
    for worker_id, messages in by_worker.items():
        events.send_on_commit(*assign_notice(worker_id, messages))  # one per worker and round
    return len(placements)


def _claim_reservations(placements: list[Placement]) -> list[Entry]:
    """active -> claimed for the reservations the placed tasks named (conditional UPDATE, one per reservation)."""
    entries = []
    for placement in placements:
        task = placement.task
        if task.reservation_id is None:
            continue
        claimed = Reservation.objects.filter(id=task.reservation_id, status=Reservation.Status.ACTIVE).update(
            status=Reservation.Status.CLAIMED
        )
        if claimed:
            entries.append(
                Entry(
                    event_type="reservation_changed",
                    user=task.owner_username,
                    resource=f"reservation:{task.reservation_id}",
                    action="claim",
                    metadata={"task_id": str(task.id)},
                )
            )
            events.status_changed("reservation_claimed", {"reservation_id": str(task.reservation_id)})
    return entries
