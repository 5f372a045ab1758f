"""Writes of the scheduler: worker sessions, run reports, leases, retries, drain.

Lock order everywhere a run changes, as in a dispatch round: the run's
workers (`lock_runs_workers`, by id), then the task rows (by id), then the
assignment (a conditional UPDATE on `holds_capacity`), and the audit chain
head last. Dispatch never waits on a worker or task lock (SKIP LOCKED), so
these paths cannot deadlock with it or with each other.

Assignment end states: `finished` / `cancelled` when the worker reported a
final state for it; `lost` when the server took the run away (lease expiry,
reconcile, a failed sibling node, the timeout backstop). A worker quoting a
`lost` token is told to `stop`.
"""

import logging
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.contrib.auth import get_user_model
from django.db import DatabaseError, IntegrityError, connection, transaction
from django.db.models import Exists, F, OuterRef, Q, QuerySet, Value
from django.db.models.functions import Coalesce, Now
from django.utils import timezone

from artifacts.selectors import pinned_datasets_changed
from audit.services import appended_together, record
from fetchml import events
from fetchml.auth import Actor
from fetchml.clock import database_now
from fetchml.compiled import compiled_per_shape, compiled_update_per_shape
from fetchml.conf import app_settings
from fetchml.errors import Conflict, database_unavailable
from fetchml.instances import instance_builder
from fetchml.logformat import brief
from fetchml.models import ApiKey
from fetchml.planner import checked_not_searched, planned_without
from scheduler.counters import CAPACITY_OF, give_back, give_back_reading_status
from scheduler.models import NodeAssignment, Worker
from scheduler.protocol import CAPACITY_FIELDS
from tasks.attempts import with_attempt_ended
from tasks.logs import append_lines
from tasks.models import Task
from tasks.selectors import owner_username
from tasks.services import TasksChanged, TaskTransitions, task_transition
from tasks.states import ACTIVE_STATES, NO_OUTCOME, TaskStatus

logger = logging.getLogger("fetchml.scheduler")

LIVE_CONNECTION_HEARTBEATS = 3  # missed heartbeats after which a recorded connection is presumed gone
INFRASTRUCTURE_FAILURES = frozenset({Task.FailureReason.WORKER_LOST, Task.FailureReason.PREPARATION})
_ACTIVE = frozenset(ACTIVE_STATES)
_LIVE_WORKER_STATES = (Worker.Status.ACTIVE, Worker.Status.DRAINING)
_USED = {capacity: used for used, capacity in CAPACITY_OF.items()}


@dataclass
class Welcome:
    worker_id: uuid.UUID | None
    keep: list[str] = field(default_factory=list)
    kill: list[str] = field(default_factory=list)
    conflict: bool = False
    # The name is registered to a usable key of another account: refused, whatever its connection.
    owned_elsewhere: bool = False
    draining: bool = False
    superseded: str = ""  # the channel of the connection this one replaces


@dataclass
class StatusOutcome:
    accepted: bool
    stale: bool = False


STALE = StatusOutcome(accepted=False, stale=True)


def retry_backoff_seconds(retry_number: int) -> float:
    """Exponential back-off with up to 25 % jitter, capped: base x 2^(n-1)."""
    base, cap = app_settings.RETRY_BACKOFF_BASE_SECONDS, app_settings.RETRY_BACKOFF_MAX_SECONDS
    delay = min(cap, base * 2 ** max(retry_number - 1, 0))
    return min(cap, delay + random.uniform(0, delay / 4))


def _live_assignments(worker_id: Any):
    return NodeAssignment.objects.filter(worker_id=worker_id, holds_capacity=True)


# --- worker sessions ---------------------------------------------------------


def worker_hello(
    *,
    name: str,
    api_key_id: Any,
    agent_version: str,
    hostname: str,
    capabilities: dict[str, Any],
    channel_name: str,
    running: list[dict[str, str]],
    instance: str = "",
) -> Welcome:
    """Register (or re-register) a worker by name and reconcile the runs it still has.

    Reported runs the server still assigns to this worker are kept; all others
    are killed. Acknowledged runs the agent no longer has are lost (re-queued).
    A name held by another live connection is refused, unless that connection
    was the same agent's (`instance`): an agent has one connection at a time,
    so its old one is dead (a server that crashed under it) and is replaced.
    """
    now = timezone.now()
    heard_now = database_now()  # heartbeats are stamped on the database's clock (fetchml/clock.py)
    # A live connection heartbeats every interval; one silent for a few intervals
    # is the stale record of a server that crashed, not a twin agent. (Waiting for
    # the whole lease would let the lease expire the runs the agent comes back with.)
    silent_for = LIVE_CONNECTION_HEARTBEATS * app_settings.WORKER_HEARTBEAT_SECONDS
    live_window = timedelta(seconds=min(app_settings.WORKER_LEASE_SECONDS, silent_for))
    with transaction.atomic():
        worker, created = Worker.objects.select_for_update().get_or_create(name=name)
        previous_key_id = None if created else worker.api_key_id
        handed_over = previous_key_id is not None and previous_key_id != api_key_id
        # The two keys of a name changing hands, read once: whose they are, and their prefixes to audit.
        keys = ApiKey.objects.select_related("user").in_bulk([previous_key_id, api_key_id]) if handed_over else {}
        if handed_over and _owned_elsewhere(keys.get(previous_key_id), keys.get(api_key_id)):
            return Welcome(worker_id=None, owned_elsewhere=True)
        superseded = worker.channel_name if worker.channel_name != channel_name else ""
        if (
            superseded
            and not (instance and instance == worker.agent_instance)
            and worker.last_heartbeat is not None
            and worker.last_heartbeat > heard_now - live_window
        ):
            return Welcome(worker_id=None, conflict=True)
        changed = created or any(_declared(worker, key) != value for key, value in capabilities.items())
        for key, value in capabilities.items():
            if key in CAPACITY_FIELDS:
                # Never below what running work holds (the CHECK constraint forbids it): the
                # surplus shrinks back to the declared figure as those runs end (scheduler/counters.py).
                setattr(worker, f"declared_{key}", value)
                setattr(worker, key, max(value, getattr(worker, _USED[key])))
            else:
                setattr(worker, key, value)
        worker.status = Worker.Status.DRAINING if _drain_goes_on(worker, instance) else Worker.Status.ACTIVE
        if worker.status == Worker.Status.ACTIVE:
            worker.drained_instance, worker.drained_by_agent = "", False
        worker.version = agent_version
        worker.hostname = hostname
        worker.api_key_id = api_key_id
        worker.channel_name = channel_name
        worker.agent_instance = instance
        worker.connected_at = now
        worker.last_heartbeat = Now()
        worker.save()
        if handed_over:
            # Another key of the same account (a rotation), or a key taking over from an unusable one.
            prefixes = {key_id: key.prefix for key_id, key in keys.items()}
            record(
                event_type="worker_changed",
                user="",
                resource=f"worker:{worker.name}",
                action="key_changed",
                metadata={"from_key": prefixes.get(previous_key_id, ""), "to_key": prefixes.get(api_key_id, "")},
            )
        if changed:
            record(
                event_type="worker_changed",
                user="",
                resource=f"worker:{worker.name}",
                action="register" if created else "capacity",
                metadata={**capabilities, "version": agent_version},
            )
        events.status_changed("worker_connected", {"worker_id": str(worker.id)})
        events.wake_scheduler("worker_connected")
        live = {str(a.token): a for a in _live_assignments(worker.id)}
    reported = {run["token"]: run["task_id"] for run in running}
    keep = [token for token, task_id in reported.items() if token in live and str(live[token].task_id) == task_id]
    kill = [token for token in reported if token not in keep]
    for token, assignment in live.items():
        if token not in reported and assignment.status != NodeAssignment.Status.ASSIGNED:
            end_run(
                assignment_id=assignment.id, reason=Task.FailureReason.WORKER_LOST, error="run missing on reconnect"
            )
    kept = [run for run in running if run["token"] in keep]
    _catch_up_progress(worker.id, kept, _run_states(worker.id, kept))
    draining = worker.status == Worker.Status.DRAINING
    return Welcome(worker_id=worker.id, keep=keep, kill=kill, draining=draining, superseded=superseded)


def _drain_goes_on(worker: Worker, instance: str) -> bool:
    """Whether a worker saying hello as agent process `instance` is still draining. The process a
    drain was asked of goes on draining when it reconnects, also once taken offline with nothing
    left to run (an operator's drain while it was away). An operator's drain also holds for a new
    process until the worker has drained (an agent that crashed mid-drain and was started again);
    the agent's own, on its SIGTERM, does not: the new process takes work. An agent that does not
    name its process (no `instance`) goes on draining while the worker drains."""
    if worker.status == Worker.Status.DRAINING and not (instance and worker.drained_by_agent):
        return True
    return bool(instance) and worker.drained_instance == instance


def _owned_elsewhere(registered: ApiKey | None, key: ApiKey | None) -> bool:
    """Whether a worker name registered with the key `registered` is another account's: that key
    is still usable and belongs to another user than `key`. The runs sent to a worker (their env,
    their tokens) and the files its key may fetch are that account's, so a name is not taken over
    by a stranger's key; another key of the same account (a rotation) may, and so may anyone once
    the registered key is revoked or expired (or deleted)."""
    if registered is None or (key is not None and registered.user_id == key.user_id):
        return False
    return registered.is_usable


def _declared(worker: Worker, key: str) -> Any:
    """What the worker last declared for a capability (its capacity, if not declared since it was recorded)."""
    declared = getattr(worker, f"declared_{key}", None) if key in CAPACITY_FIELDS else None
    return getattr(worker, key) if declared is None else declared


def worker_disconnected(*, worker_id: Any, channel_name: str) -> None:
    """Forget the connection. Runs stay assigned: the agent keeps them and reconnects; the lease decides."""
    with transaction.atomic():
        if Worker.objects.filter(id=worker_id, channel_name=channel_name).update(channel_name=""):
            events.status_changed("worker_disconnected", {"worker_id": str(worker_id)})


def worker_key_refused(*, worker_id: Any, channel_name: str) -> int:
    """The connection's API key is no longer usable (revoked, expired, its user deactivated): the
    agent, closed with 4401, stops and kills its runs. So the worker goes offline at once (assigned
    nothing more) and its runs are lost and re-queued as a lapsed lease would have them, now rather
    than a lease later. Only while `channel_name` is the worker's connection: a newer one (another
    key, say) is left alone. Returns the runs ended."""
    with transaction.atomic():
        name = Worker.objects.filter(id=worker_id).values_list("name", flat=True).first()
        if not _take_offline(worker_id, name, where=Q(channel_name=channel_name), action="key_refused"):
            return 0
    logger.warning("worker %s: its API key is no longer usable; marked offline", name)
    live = NodeAssignment.objects.filter(worker_id=worker_id, holds_capacity=True)
    return _lose_runs(live, error="worker lost: its API key was refused")


def _take_offline(worker_id: Any, name: str, *, where: Q, action: str) -> bool:
    """In the caller's transaction: the worker, if still live and matching `where`, goes offline,
    audited as `action` and announced; whether it did."""
    live = Worker.objects.filter(where, id=worker_id, status__in=_LIVE_WORKER_STATES)
    if not live.update(status=Worker.Status.OFFLINE, channel_name=""):
        return False
    record(event_type="worker_changed", user="", resource=f"worker:{name}", action=action)
    events.status_changed("worker_offline", {"worker_id": str(worker_id)})
    return True


def _lose_runs(assignments: QuerySet[NodeAssignment], *, error: str) -> int:
    """End the live runs among `assignments` as lost with their worker, one transaction each. A run
    the worker never acknowledged never started: it goes back to the queue counting no retry (a
    task with max_retries 0 must not fail for a worker it never ran on)."""
    return sum(
        _lose_run(run, unstarted=status == NodeAssignment.Status.ASSIGNED, error=error)
        for run, status in assignments.values_list("id", "status")
    )


def _lose_run(assignment_id: Any, *, unstarted: bool, error: str) -> bool:
    # Lost with their worker: only while it is still offline. A hello that let it back in since the
    # runs were listed has told the agent to keep them.
    why = "worker lost before acknowledging the run"
    handed_back = unstarted and _hand_back(assignment_id=assignment_id, why=why, worker_offline=True)
    return bool(handed_back) or end_run(
        assignment_id=assignment_id, reason=Task.FailureReason.WORKER_LOST, error=error, worker_offline=True
    )


def worker_lease_extend(*, worker_id: Any) -> None:
    """The worker was heard from: its lease runs from now."""
    Worker.objects.filter(id=worker_id).update(last_heartbeat=Now())  # the database's clock (fetchml/clock.py)


def worker_heartbeat(*, worker_id: Any, running: list[dict[str, str]]) -> list[dict[str, str]]:
    """Extend the lease; returns the reported runs the agent must `stop` (stale tokens).

    Progress the agent reports for a run and the server has not recorded (its
    `running` status was lost) is applied, as its `status` would have been.
    """
    worker_lease_extend(worker_id=worker_id)
    known = _run_states(worker_id, running)
    _catch_up_progress(worker_id, running, known)
    return [run for run in running if run["token"] not in known]


# How far along a run is, for the states an agent reports while it runs.
_PROGRESS_ORDER = {TaskStatus.PREPARING: 0, TaskStatus.RUNNING: 1, TaskStatus.COLLECTING: 2}


def _run_states(worker_id: Any, runs: list[dict[str, str]]) -> dict[str, tuple[str, str, bool]]:
    """token -> (assignment status, task status, holds capacity) of the reported runs the server
    still knows on this worker (not lost)."""
    rows = (
        NodeAssignment.objects.filter(worker_id=worker_id, token__in=[run["token"] for run in runs])
        .exclude(status=NodeAssignment.Status.LOST)
        .values_list("token", "status", "task__status", "holds_capacity")
    )
    return {str(token): (status, task_status, live) for token, status, task_status, live in rows}


def _catch_up_progress(worker_id: Any, runs: list[dict[str, str]], known: dict[str, tuple[str, str, bool]]) -> None:
    """Apply what an agent's list of its live runs says and the server is behind on: that the agent
    has them, and how far along they are (`running`, `collecting`).

    A listed run is acknowledged, if the `ack` the agent sent was lost (with a server that crashed,
    in a batch that failed): left unacknowledged, a drain the agent announces would hand back a run
    it is running or has finished, to run a second time."""
    reports = []
    for run in runs:
        if run["token"] not in known:
            continue
        assignment_status, task_status, live = known[run["token"]]
        reported = run.get("status", "")
        if not live:
            continue
        if reported in (TaskStatus.RUNNING, TaskStatus.COLLECTING):
            behind = assignment_status != NodeAssignment.Status.RUNNING or (
                task_status in _PROGRESS_ORDER and _PROGRESS_ORDER[task_status] < _PROGRESS_ORDER[reported]
            )
            if behind:
                reports.append({"type": "status", **run, **NO_OUTCOME})
        elif assignment_status == NodeAssignment.Status.ASSIGNED:
            reports.append({"type": "ack", "task_id": run["task_id"], "token": run["token"]})
    if reports:
        logger.info(
            "worker %s: %d run(s) ahead of what was recorded (acknowledged, progress); catching up",
            worker_id,
            len(reports),
        )
        apply_run_reports(worker_id=worker_id, reports=reports)


def worker_drain(*, worker: Worker, actor: Actor) -> Worker:
    """Stop giving `worker` new work; it goes offline once its last run ends."""
    with transaction.atomic():
        won = Worker.objects.filter(id=worker.id, status=Worker.Status.ACTIVE).update(
            status=Worker.Status.DRAINING, drained_instance=F("agent_instance"), drained_by_agent=False
        )
        if not won:
            # Already draining: by the operators' wish now too, should the agent start again.
            Worker.objects.filter(id=worker.id, status=Worker.Status.DRAINING).update(drained_by_agent=False)
            worker.refresh_from_db()
            if worker.status == Worker.Status.DRAINING:
                return worker
            raise Conflict(f"worker {worker.name} is {worker.status}")
        record(
            event_type="scheduler_drain",
            user=actor.user,
            resource=f"worker:{worker.name}",
            action="drain",
            ip_address=actor.ip_address,
        )
        events.send_on_commit([events.worker_group(worker.id)], {"type": "worker.drain"})
        events.status_changed("worker_draining", {"worker_id": str(worker.id)})
        _offline_if_drained(worker.id)
    worker.refresh_from_db()
    return worker


def worker_announced_drain(*, worker_id: Any) -> int:
    """The agent itself is draining (its SIGTERM, or the server's `drain`): give it no new work,
    and take back at once the runs it was assigned but never acknowledged (it will not start
    them): to the queue without counting a retry, as `_hand_back` says. Returns how many."""
    with transaction.atomic():
        worker = Worker.objects.select_for_update().filter(id=worker_id).first()
        if worker is None:
            return 0
        if worker.status == Worker.Status.ACTIVE:
            Worker.objects.filter(id=worker.id).update(
                status=Worker.Status.DRAINING, drained_instance=F("agent_instance"), drained_by_agent=True
            )
            owner = worker.api_key.user if worker.api_key_id and worker.api_key else ""
            record(
                event_type="scheduler_drain",
                user=owner,
                resource=f"worker:{worker.name}",
                action="drain",
                metadata={"by": "agent"},
            )
            events.status_changed("worker_draining", {"worker_id": str(worker.id)})
    unacked = NodeAssignment.objects.filter(
        worker_id=worker_id, holds_capacity=True, status=NodeAssignment.Status.ASSIGNED
    ).values_list("id", flat=True)
    handed_back = sum(_hand_back(assignment_id=assignment_id, why="worker draining") for assignment_id in list(unacked))
    with transaction.atomic():
        _offline_if_drained(worker_id)
    return handed_back


def _hand_back(*, assignment_id: Any, why: str, worker_offline: bool = False) -> int:
    """Take a run its worker never acknowledged off that worker (1 if it did, 0 if it was
    acknowledged meanwhile or has ended). It goes back to the queue as if never dispatched,
    counting no retry; or, with a cancel pending, it ends `cancelled` (queued again, it would
    start elsewhere). A node of a run another node has started (the task is past `preparing`)
    cannot be placed again alone: the run ends as lost, its other nodes wound down.
    `worker_offline`: only while the run's worker is still offline."""
    with transaction.atomic():
        assignment = NodeAssignment.objects.filter(id=assignment_id).first()
        if assignment is None:
            return 0
        lock_run_workers(task_id=assignment.task_id, worker_id=assignment.worker_id)
        if worker_offline and not _offline(assignment.worker_id):
            return 0
        task = Task.objects.select_for_update().get(id=assignment.task_id)
        assignment = NodeAssignment.objects.select_for_update().get(id=assignment_id)
        if assignment.status != NodeAssignment.Status.ASSIGNED or not assignment.holds_capacity:
            return 0  # acknowledged meanwhile: it runs, and the drain waits for it
        if task.attempt != assignment.attempt or task.status not in _ACTIVE:
            return 0
        if task.status != TaskStatus.PREPARING:
            if task.node_count == 1:
                return 0  # moved on by a report, which acknowledges the run too: not ours to end
            return int(end_run(assignment_id=assignment.id, reason=Task.FailureReason.WORKER_LOST, error=why))
        if not _release(assignment, status=NodeAssignment.Status.LOST):
            return 0
        _stop_siblings(task, assignment.attempt, reason=f"a node's {why}")
        if task.cancel_requested_at is not None:
            fail_or_retry(task, reason=Task.FailureReason.CANCELLED, error=f"cancelled before it started ({why})")
            return 1
        moved = task_transition(
            task_id=task.id, to=TaskStatus.QUEUED, from_states={TaskStatus.PREPARING}, worker=None, started_at=None
        )
        if moved is None:
            return 0
        record(
            event_type="job_requeued",
            user=moved.owner,
            resource=f"task:{task.id}",
            action="handed_back",
            metadata={"attempt": assignment.attempt, "reason": why},
        )
    return 1


def _offline(worker_id: Any) -> bool:
    """Whether the worker is offline (read under its lock, so that a hello cannot change it meanwhile)."""
    return Worker.objects.filter(id=worker_id, status=Worker.Status.OFFLINE).exists()


def _offline_if_drained(worker_id: Any | None = None) -> int:
    """In the caller's transaction: draining workers (`worker_id`'s, or all) whose last run has
    ended go offline, each audited and announced (an agent still connected exits once its own
    runs have reported); how many did."""
    idle = ~Exists(NodeAssignment.objects.filter(worker=OuterRef("pk"), holds_capacity=True))
    drained = Worker.objects.filter(idle, status=Worker.Status.DRAINING)
    if worker_id is not None:
        drained = drained.filter(id=worker_id)
    gone = 0
    for drained_id, name in drained.values_list("id", "name"):
        if Worker.objects.filter(idle, id=drained_id, status=Worker.Status.DRAINING).update(
            status=Worker.Status.OFFLINE
        ):
            record(event_type="worker_changed", user="", resource=f"worker:{name}", action="drained")
            events.status_changed("worker_offline", {"worker_id": str(drained_id)})
            gone += 1
    return gone


# --- run reports ---------------------------------------------------------------


def _assignment(worker_id: Any, task_id: str, token: str) -> NodeAssignment | None:
    return NodeAssignment.objects.filter(worker_id=worker_id, task_id=task_id, token=token).first()


def assignment_ack(*, worker_id: Any, task_id: str, token: str) -> bool:
    """The agent has the assignment; False if the token is not live on this worker."""
    return apply_run_reports(worker_id=worker_id, reports=[{"type": "ack", "task_id": task_id, "token": token}])[0]


def assignment_is_live(*, worker_id: Any, task_id: str, token: str) -> bool:
    """The fencing check for reports that change no run state (plugin and service reports)."""
    assignment = _assignment(worker_id, task_id, token)
    return assignment is not None and assignment.holds_capacity


def assignment_log(
    *, worker_id: Any, task_id: str, token: str, lines: list[dict[str, str]], seq: int | None = None
) -> bool:
    """Store a batch of log lines of a run; False (stale) if the server took the run away."""
    report = {"type": "log", "task_id": task_id, "token": token, "lines": lines, "seq": seq}
    return apply_run_reports(worker_id=worker_id, reports=[report])[0]


def assignment_status(
    *,
    worker_id: Any,
    task_id: str,
    token: str,
    status: str,
    exit_code: int | None = None,
    failure_reason: str = "",
    error: str = "",
    output: str = "",
    workers_locked: bool = False,
) -> StatusOutcome:
    """Apply a worker's state report for one run, fenced by its token, writing at once.

    `workers_locked`: the caller's transaction already holds what
    `lock_runs_workers` takes for this task (`apply_run_reports` does).
    """
    # No savepoint: inside `apply_run_reports` a failure rolls the whole batch back,
    # and the batch is then applied report by report.
    with transaction.atomic(savepoint=False):
        if not workers_locked:
            lock_run_workers(task_id=task_id, worker_id=worker_id)
        task = Task.objects.select_for_update(of=("self",)).select_related("owner").filter(id=task_id).first()
        assignment = _assignment(worker_id, task_id, token)
        if task is None or assignment is None:
            return STALE
        report = {"status": status, "exit_code": exit_code, "failure_reason": failure_reason}
        return _apply_status(task, assignment, report | {"error": error, "output": output}, _AT_ONCE)


_STATUS_FIELDS = ("status", "exit_code", "failure_reason", "error", "output")
_FINAL_REPORTS = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED})
_ENDED_BY_FAILURE = frozenset({TaskStatus.FAILED, TaskStatus.CANCELLED})
_PROGRESS_REPORTS = frozenset({TaskStatus.PREPARING, TaskStatus.RUNNING, TaskStatus.COLLECTING})

RunReportOutcome = bool | StatusOutcome | None


def _apply_status(
    task: Task, assignment: NodeAssignment, report: dict[str, Any], writes: "_RunWrites"
) -> StatusOutcome:
    """The rules of a state report, on the task and its assignment as the caller read them (the one owner of them)."""
    status = report["status"]
    if not assignment.holds_capacity:
        # A re-sent final report we already applied is acknowledged again.
        ended_by_worker = assignment.status in (NodeAssignment.Status.FINISHED, NodeAssignment.Status.CANCELLED)
        return StatusOutcome(accepted=True) if ended_by_worker and status in _FINAL_REPORTS else STALE
    if assignment.attempt != task.attempt or task.status not in _ACTIVE:
        writes.release(assignment, status=NodeAssignment.Status.LOST)
        return STALE
    if status in _FINAL_REPORTS:
        return _final_report(task, assignment, report, writes)
    return _progress_report(task, assignment, status, writes)


def apply_run_reports(*, worker_id: Any, reports: list[dict[str, Any]]) -> list[RunReportOutcome]:
    """Apply a worker's run reports (`ack`, `status`, `log` messages) in order, in one transaction.

    One commit and one publish for the lot, instead of one per report:
    acknowledgements, progress and completions of single-node runs are
    applied in memory and written set-based at the end (`_Batched`); a
    failure, a cancellation or a multi-node run is applied at once, after
    writing what came before it (`_ReportBatch` says when rows are locked).
    A batch whose runs changed between its read and its write is applied
    again holding its locks from the start. The audit events are appended
    together at the end, holding the chain head only for that append. If the
    batch fails, each report is applied on its own, so a bad report costs
    only its own answer: None (the agent re-sends what matters).
    """
    try:
        try:
            return _apply_batch(worker_id, reports, lock_first=False)
        except (_RunsChanged, TasksChanged):
            return _apply_batch(worker_id, reports, lock_first=True)
    except Exception as exc:
        if len(reports) == 1:
            # The database out of reach fails every report alike: one line each, not a traceback.
            unreachable = database_unavailable(exc)
            said = f": {brief(exc)}" if unreachable else ""
            logger.error(
                "worker %s: a %s report failed%s", worker_id, reports[0]["type"], said, exc_info=not unreachable
            )
            return [None]
        logger.warning("worker %s: a batch of %d reports failed; applying them one by one", worker_id, len(reports))
        return [apply_run_reports(worker_id=worker_id, reports=[report])[0] for report in reports]


def _apply_batch(worker_id: Any, reports: list[dict[str, Any]], *, lock_first: bool) -> list[RunReportOutcome]:
    # Every statement of a batch finds its rows by key, on every plan: no scan of a whole table
    # that statistics (or a plan cached while it was small) take for a few rows.
    with transaction.atomic(), appended_together(), planned_without("seqscan"):
        outcomes = _ReportBatch(worker_id, reports, lock_first=lock_first).apply()
        if transaction.get_rollback():  # an error swallowed below left the transaction doomed
            raise DatabaseError("the batch was marked for rollback")
        return outcomes


# What a batch reads of an assignment's task: the rest of the row (its arguments,
# environment, plugin configurations) is large, and reports do not need it.
_REPORT_TASK_FIELDS = ("id", "status", "attempt", "node_count", "priority", "owner")


# What a batch reads of an assignment: not its GPU indices (JSON to decode) nor its times but
# the acknowledgement's (a report sets the end time, never reads it).
_REPORT_RUN_FIELDS = (
    "id",
    "task_id",
    "attempt",
    "node_id",
    "worker_id",
    "token",
    "status",
    "holds_capacity",
    "slot_kind",
    "cpu",
    "memory_gb",
    "gpus",
    "acked_at",
)


def _batch_runs_query(*, task_ids: list[uuid.UUID]) -> QuerySet[NodeAssignment]:
    # By task alone (every attempt and node of a task: a few rows), the worker picked out in
    # Python: with the worker in the WHERE, a planner whose statistics have not seen the
    # table grow reads the worker's whole history through its index.
    return NodeAssignment.objects.filter(task_id__in=task_ids).only(*_REPORT_RUN_FIELDS).order_by()


def _batch_tasks_query(*, ids: list[uuid.UUID]) -> QuerySet[Task]:
    tasks = Task.objects.filter(id__in=ids).only(*_REPORT_TASK_FIELDS)
    return tasks.annotate(owner_username=owner_username()).order_by()


# Every batch of reports runs both: compiled, and rows loaded without the ORM's per-query work.
_batch_runs = compiled_per_shape(_batch_runs_query)
_batch_tasks = compiled_per_shape(_batch_tasks_query)


def _with_owners(tasks: list[Task]) -> list[Task]:
    """`tasks` each holding its owner, loaded with the name only (what the audit events need),
    as `select_related("owner").only("owner__<name>")` would."""
    User = get_user_model()
    names = [User._meta.pk.attname, User.USERNAME_FIELD]
    build = instance_builder(User)
    for task in tasks:
        owner = build(User, connection.alias, names, [task.owner_id, task.owner_username])
        Task.owner.field.set_cached_value(task, owner)
    return tasks


class _RunsChanged(Exception):
    """An assignment read by a batch of reports changed before the batch wrote it."""


class _ReportBatch:
    """One worker's reports inside `apply_run_reports`' transaction.

    Most batches (acknowledgements, progress and completions of single-node
    runs) are read without locks, so that a dispatch round can claim the
    worker meanwhile, and written at the end in the global lock order: the
    reporting worker's row, the tasks, the assignments, the worker's
    counters, the audit head. Every write is conditional on the state that
    was read (the task's state, the assignment still live and in its state
    before); a run changed meanwhile (a lease expiry, a timeout) raises, and
    the batch is applied again with `lock_first`. A batch with a failure, a
    cancellation or a multi-node run, or one applied again, locks its workers
    and tasks first, and applies those reports at once.
    """

    def __init__(self, worker_id: Any, reports: list[dict[str, Any]], *, lock_first: bool) -> None:
        self.worker_id = uuid.UUID(str(worker_id))  # as the rows read carry it
        self.reports = reports
        self.lock_first = lock_first or any(report.get("status") in _ENDED_BY_FAILURE for report in reports)
        self.writes = _Batched(self.worker_id)
        # Tasks changed by a report applied at once: their rows in memory are stale,
        # so their later reports are applied at once too.
        self.at_once: set[str] = set()
        self.locked = False  # whether the rows were read holding the workers' and tasks' locks

    def apply(self) -> list[RunReportOutcome]:
        if not self.lock_first:
            self._read()
            if all(task.node_count == 1 for task in self.tasks.values()):
                return self._apply_all()
        task_ids = sorted({report["task_id"] for report in self.reports if report["type"] == "status"})
        lock_runs_workers(task_ids=task_ids, worker_id=self.worker_id)
        # The tasks of log lines too: the nodes of a multi-node task append from their own
        # connections, and under the task's lock their lines' ids follow their commits, so that
        # "lines after id N" (tasks.logs) passes none by.
        locked = {report["task_id"] for report in self.reports if report["type"] in ("status", "log")}
        list(
            Task.objects.select_for_update(of=("self",)).filter(id__in=sorted(locked)).order_by("id").values_list("id")
        )
        # The workers and tasks are locked: the rows read now stay as they are until we commit.
        self._read()
        self.locked = True
        return self._apply_all()

    def _read(self) -> None:
        """The batch's assignments on this worker, with their tasks (one copy of each task)."""
        mentioned = sorted(map(uuid.UUID, {report["task_id"] for report in self.reports}))
        runs = [run for run in _batch_runs(task_ids=mentioned) if run.worker_id == self.worker_id]
        tasks = _with_owners(list(_batch_tasks(ids=sorted({run.task_id for run in runs}))) if runs else [])
        self.tasks = {str(task.id): task for task in tasks}
        self.runs = {}
        for run in runs:
            run.task = self.tasks[str(run.task_id)]
            self.runs[(str(run.task_id), str(run.token))] = run

    def _apply_all(self) -> list[RunReportOutcome]:
        outcomes = [self._apply(report) for report in self.reports]
        self.writes.write()
        return outcomes

    def _apply(self, report: dict[str, Any]) -> RunReportOutcome:
        run = self.runs.get((report["task_id"], report["token"]))
        if report["type"] == "ack":
            return self._ack(run)
        if report["type"] == "log":
            return self._log(run, report["lines"], report.get("seq"))
        task = self.tasks.get(report["task_id"])
        if task is None or run is None:
            return STALE
        stale = report["task_id"] in self.at_once
        if stale or not self.writes.can_apply(task, report["status"]):
            self.writes.write()
            self.at_once.add(report["task_id"])
            if not stale and self.locked and report["status"] not in _ENDED_BY_FAILURE:
                # Read under the locks and brought up to date by the write: current, and holding
                # all that progress and completion use (a failure needs the whole row, to retry).
                return _apply_status(task, run, report, _AT_ONCE)
            fields = {name: report[name] for name in ("task_id", "token", *_STATUS_FIELDS)}
            return assignment_status(worker_id=self.worker_id, **fields, workers_locked=True)
        return _apply_status(task, run, report, self.writes)

    def _ack(self, run: NodeAssignment | None) -> bool:
        if run is None or not run.holds_capacity:
            return False
        self.writes.acknowledge(run)
        return True

    def _log(self, run: NodeAssignment | None, lines: list[dict[str, str]], seq: int | None) -> bool:
        # Lines of a run that ended on its own report are still its lines (sent again after a failure).
        if run is None or run.status == NodeAssignment.Status.LOST:
            return False
        append_lines(task_id=run.task_id, attempt=run.attempt, node_id=run.node_id, first_seq=seq, lines=lines)
        return True


class _RunWrites:
    """How the changes of a state report reach the database."""

    def acknowledge(self, assignment: NodeAssignment) -> None:
        raise NotImplementedError

    def mark_running(self, assignment: NodeAssignment) -> None:
        raise NotImplementedError

    def release(self, assignment: NodeAssignment, *, status: str) -> bool:
        raise NotImplementedError

    def move(self, task: Task, to: str, **fields: Any) -> bool:
        raise NotImplementedError


class _AtOnce(_RunWrites):
    """Each change written as it is made (a single report, failures, multi-node runs)."""

    def acknowledge(self, assignment: NodeAssignment) -> None:
        _runs_changed(
            fixed={"change": "acked"}, ids=[assignment.id], status=NodeAssignment.Status.ACKED, now=timezone.now()
        )

    def mark_running(self, assignment: NodeAssignment) -> None:
        _runs_changed(
            fixed={"change": "running"}, ids=[assignment.id], status=NodeAssignment.Status.RUNNING, now=timezone.now()
        )

    def release(self, assignment: NodeAssignment, *, status: str) -> bool:
        return _release(assignment, status=status)

    def move(self, task: Task, to: str, **fields: Any) -> bool:
        return task_transition(task_id=task.id, to=to, locked=task, **fields) is not None


_AT_ONCE = _AtOnce()


class _Batched(_RunWrites):
    """Changes applied to the rows in memory, written set-based by `write`.

    The writes go in the global lock order (the reporting worker, tasks,
    assignments, then the counters of the worker already locked; the audit
    head comes last, at the end of the transaction), each checking that every
    row it changes is still in the state it was read in, so the counters are
    given back only for assignments this batch really ended. An assignment's
    own order (assigned -> acked -> running -> ended) needs one UPDATE per
    kind of change at most; one that ends in the batch is written once.
    """

    def __init__(self, worker_id: uuid.UUID) -> None:
        self.worker_id = worker_id
        self.now = timezone.now()
        self.transitions = TaskTransitions(now=self.now)
        self._acked: dict[uuid.UUID, NodeAssignment] = {}
        self._running: dict[uuid.UUID, NodeAssignment] = {}
        self._ended: dict[str, list[NodeAssignment]] = {}
        self._freed: dict[uuid.UUID, dict[str, int]] = {}

    @staticmethod
    def can_apply(task: Task, status: str) -> bool:
        """Progress and completion of a single-node run; everything else is applied at once."""
        return task.node_count == 1 and (status in _PROGRESS_REPORTS or status == TaskStatus.COMPLETED)

    def acknowledge(self, assignment: NodeAssignment) -> None:
        if assignment.status == NodeAssignment.Status.ASSIGNED:
            assignment.status, assignment.acked_at = NodeAssignment.Status.ACKED, self.now
            self._acked[assignment.id] = assignment

    def mark_running(self, assignment: NodeAssignment) -> None:
        if assignment.status != NodeAssignment.Status.RUNNING:
            assignment.status, assignment.acked_at = NodeAssignment.Status.RUNNING, assignment.acked_at or self.now
            self._running[assignment.id] = assignment

    def release(self, assignment: NodeAssignment, *, status: str) -> bool:
        if not assignment.holds_capacity:
            return False
        assignment.holds_capacity, assignment.status, assignment.ended_at = False, status, self.now
        self._ended.setdefault(status, []).append(assignment)
        freed = self._freed.setdefault(assignment.worker_id, dict.fromkeys(_FREED, 0))
        for name, amount in _freed_by(assignment).items():
            freed[name] += amount
        return True

    def move(self, task: Task, to: str, **fields: Any) -> bool:
        return self.transitions.move(task, to, **fields)

    def write(self) -> None:
        freed_any, draining = bool(self._freed), False
        if freed_any:
            # The lock order: workers first (held already when the batch locked first). The
            # reporting worker's row is locked by giving back what its ended runs held; a write
            # below that finds a run changed rolls it back with the rest of the batch.
            reporting_freed = self._freed.pop(self.worker_id, dict.fromkeys(_FREED, 0))
            try:
                status = give_back_reading_status(self.worker_id, reporting_freed)
            except IntegrityError as exc:  # below zero: a run ended meanwhile gave its share back
                raise _RunsChanged("a run of the batch gave its capacity back before the batch did") from exc
            draining = status == Worker.Status.DRAINING
        self.transitions.write()
        ended = {run.id for runs in self._ended.values() for run in runs}
        acked = [run for run_id, run in self._acked.items() if run_id not in ended and run_id not in self._running]
        _updated_all("acked", acked, status=NodeAssignment.Status.ACKED, now=self.now)
        running = [run for run_id, run in self._running.items() if run_id not in ended]
        _updated_all("running", running, status=NodeAssignment.Status.RUNNING, now=self.now)
        for status, runs in self._ended.items():
            _updated_all("ended", runs, status=status, now=self.now)
        for worker_id, freed in sorted(self._freed.items()):
            give_back(worker_id, freed)
        if freed_any:
            if draining:
                _offline_if_drained(self.worker_id)
            events.wake_scheduler("capacity_freed")
        self._acked, self._running, self._ended, self._freed = {}, {}, {}, {}


def _updated_all(change: str, runs: list[NodeAssignment], *, status: str, now: datetime) -> None:
    """UPDATE these live assignments (`change`: acked, running or ended), all of them or fail (one
    changed since it was read)."""
    ids = [run.id for run in runs]
    if runs and _runs_changed(fixed={"change": change}, ids=ids, status=status, now=now) != len(runs):
        raise _RunsChanged("assignments read for a batch of reports changed before it wrote them")


def _runs_update(*, change: str, ids: list[uuid.UUID], status: str, now: datetime) -> tuple:
    """The one rule of an assignment's progress (acked, running, ended by the worker's report)."""
    live = NodeAssignment.objects.filter(checked_not_searched(Q(holds_capacity=True)), id__in=ids)
    # An acknowledgement not written yet is written by the later change of the same run.
    acked_at = Coalesce(F("acked_at"), Value(now))
    if change == "acked":
        return live.filter(status=NodeAssignment.Status.ASSIGNED), {"status": status, "acked_at": now}
    if change == "running":
        return live, {"status": status, "acked_at": acked_at}
    return live, {"holds_capacity": False, "status": status, "ended_at": now, "acked_at": acked_at}


_runs_changed = compiled_update_per_shape(_runs_update)


_FREED = ("used_cpu", "used_memory_gb", "used_gpus", "used_batch_slots", "used_service_slots")


def _freed_by(assignment: NodeAssignment) -> dict[str, int]:
    """What an ended assignment gives back to its worker's counters."""
    slot = "used_service_slots" if assignment.slot_kind == Task.Kind.SERVICE else "used_batch_slots"
    return {"used_cpu": assignment.cpu, "used_memory_gb": assignment.memory_gb, "used_gpus": assignment.gpus, slot: 1}


def lock_run_workers(*, task_id: Any, worker_id: Any = None) -> None:
    """`lock_runs_workers` for one task."""
    lock_runs_workers(task_ids=[task_id], worker_id=worker_id)


def lock_runs_workers(*, task_ids: list[Any], worker_id: Any = None) -> None:
    """Lock, in id order, every worker a change of these tasks' runs may touch, before the tasks.

    The lock order everywhere is workers, then tasks, then the audit head: a
    dispatch round claims its workers first (SKIP LOCKED, so it passes by the
    ones locked here) and appends to the audit last. The workers are the task's
    (rank 0) worker, the workers of its live nodes (a failing node stops its
    siblings, freeing their capacity) and `worker_id` (the reporting one).
    Without the task's own worker, a change that writes the task row twice
    (preparing -> running -> completed) would make PostgreSQL re-check that
    foreign key at commit, while holding the audit head a round waits for.
    """
    of_task = Task.objects.filter(id__in=task_ids).values("worker_id")
    of_nodes = NodeAssignment.objects.filter(task_id__in=task_ids, holds_capacity=True).values("worker_id")
    chosen = Q(id__in=of_task) | Q(id__in=of_nodes)
    if worker_id is not None:
        chosen |= Q(id=worker_id)
    workers = Worker.objects.select_for_update(no_key=True).filter(chosen)
    list(workers.order_by("id").values_list("id", flat=True))


def _progress_report(task: Task, assignment: NodeAssignment, status: str, writes: _RunWrites) -> StatusOutcome:
    if status == TaskStatus.PREPARING:
        writes.acknowledge(assignment)
        return StatusOutcome(accepted=True)
    writes.mark_running(assignment)
    if status == TaskStatus.COLLECTING and task.node_count > 1:
        # One node storing its files is not the task's stage: a gang runs until its last node ends.
        status = TaskStatus.RUNNING
    if task.status == status:  # another node of the same run got there first
        return StatusOutcome(accepted=True)
    if status == TaskStatus.COLLECTING and task.status == TaskStatus.PREPARING:
        writes.move(task, TaskStatus.RUNNING)
    moved = writes.move(task, status)
    if not moved:
        logger.warning("task %s: refused report %s while %s", task.id, status, task.status)
    return StatusOutcome(accepted=moved)


def _final_report(task: Task, assignment: NodeAssignment, report: dict[str, Any], writes: _RunWrites) -> StatusOutcome:
    status, exit_code, error, output = report["status"], report["exit_code"], report["error"], report["output"]
    if task.node_count > 1:
        return _gang_node_ended(task, assignment, report, writes)
    if status == TaskStatus.COMPLETED:
        writes.release(assignment, status=NodeAssignment.Status.FINISHED)
        if task.status == TaskStatus.PREPARING:  # a run too quick to report `running`
            writes.move(task, TaskStatus.RUNNING)
        moved = writes.move(
            task,
            TaskStatus.COMPLETED,
            exit_code=0 if exit_code is None else exit_code,
            failure_reason="",
            error=error,
            output=output,
        )
        return StatusOutcome(accepted=moved)
    # Failures and cancellations may retry: always written at once.
    ended = NodeAssignment.Status.CANCELLED if status == TaskStatus.CANCELLED else NodeAssignment.Status.FINISHED
    _release(assignment, status=ended)
    moved = fail_or_retry(task, reason=_failure_reason(task, report), exit_code=exit_code, error=error, output=output)
    return StatusOutcome(accepted=moved is not None)


def _failure_reason(task: Task, report: dict[str, Any]) -> str:
    """Why a run that did not complete ended, from its final report."""
    if report["status"] == TaskStatus.CANCELLED:
        # Cancelled without a cancel asked for: the agent gave the run up on its own (shutting down).
        return Task.FailureReason.CANCELLED if task.cancel_requested_at is not None else Task.FailureReason.WORKER_LOST
    return report["failure_reason"] or (
        Task.FailureReason.EXIT_CODE if report["exit_code"] is not None else Task.FailureReason.PREPARATION
    )


def _gang_node_ended(
    task: Task, assignment: NodeAssignment, report: dict[str, Any], writes: _RunWrites
) -> StatusOutcome:
    """One node of a multi-node run reported its end; the task ends with its last node."""
    status = report["status"]
    ended = NodeAssignment.Status.CANCELLED if status == TaskStatus.CANCELLED else NodeAssignment.Status.FINISHED
    writes.release(assignment, status=ended)
    if status != TaskStatus.COMPLETED:
        outcome = {"failure_reason": _failure_reason(task, report)} | {
            field: report[field] for field in ("exit_code", "error", "output")
        }
        _gang_node_failed(task, assignment, outcome, reason=f"node {assignment.node_id} {status}")
    return StatusOutcome(accepted=_end_gang_with_its_last_node(task, assignment.attempt, writes, last_report=report))


def _gang_node_failed(task: Task, assignment: NodeAssignment, outcome: dict[str, Any], *, reason: str) -> None:
    """A node of a multi-node run ended without completing (or was lost). The first such node
    decides the run's outcome, kept on the still active task (a `failure_reason` there says the
    run is ending), and the other nodes are stopped as a cancel stops a run, with their grace
    period and their files collected: rank 0, which stores the run's files, may be the last to
    end, and a checkpoint it writes on SIGTERM must be kept. A node that never ends is taken away
    by its lease or the time-out backstop."""
    # Which node ended the run (the task's worker is rank 0's): in the error its next attempt keeps.
    worker_name = Worker.objects.filter(id=assignment.worker_id).values_list("name", flat=True).first()
    said = f"node {assignment.node_id} (worker {worker_name})"
    outcome = {**outcome, "error": f"{said}: {outcome['error']}" if outcome["error"] else said}
    first = Task.objects.filter(id=task.id, failure_reason="").update(**outcome)
    if not first:
        return
    events.task_changed(task)  # its clients see the run ending, as GET does
    if task.cancel_requested_at is None:  # a cancel asked for reached every node already
        _wind_down_siblings(task, assignment, reason=reason)


def _end_gang_with_its_last_node(
    task: Task, attempt: int, writes: _RunWrites, *, last_report: dict[str, Any] | None = None
) -> bool:
    """Once no node of the run is live, end the task: with the first failure kept, or completed.
    Whether the report that got here is accepted."""
    if _live_assignments_of_attempt(task, attempt).exists():
        return True
    outcome = Task.objects.filter(id=task.id).values("failure_reason", "exit_code", "error", "output").get()
    if reason := outcome.pop("failure_reason"):
        return fail_or_retry(task, reason=reason, **outcome) is not None
    if last_report is None:
        return False
    if task.status == TaskStatus.PREPARING:  # a run too quick to report `running`
        writes.move(task, TaskStatus.RUNNING)
    exit_code = last_report["exit_code"]
    return writes.move(
        task,
        TaskStatus.COMPLETED,
        exit_code=0 if exit_code is None else exit_code,
        failure_reason="",
        error=last_report["error"],
        output=last_report["output"],
    )


def _wind_down_siblings(task: Task, ended: NodeAssignment, *, reason: str) -> None:
    """Ask the live nodes of `ended`'s run to stop as a cancel would (SIGTERM, grace, collect)."""
    for sibling in _live_assignments_of_attempt(task, ended.attempt):
        events.send_on_commit(
            [events.worker_group(sibling.worker_id)],
            {"type": "worker.cancel", "task_id": str(task.id), "token": str(sibling.token), "reason": reason},
        )


def _live_assignments_of_attempt(task: Task, attempt: int):
    return NodeAssignment.objects.filter(task_id=task.id, attempt=attempt, holds_capacity=True)


def _release(assignment: NodeAssignment, *, status: str) -> bool:
    """End an assignment and give its capacity back, once (a conditional UPDATE)."""
    won = NodeAssignment.objects.filter(id=assignment.id, holds_capacity=True).update(
        holds_capacity=False, status=status, ended_at=timezone.now()
    )
    if not won:
        return False
    give_back(assignment.worker_id, _freed_by(assignment))
    _offline_if_drained(assignment.worker_id)
    events.wake_scheduler("capacity_freed")
    return True


def _send_stop(assignment: NodeAssignment, reason: str) -> None:
    events.send_on_commit(
        [events.worker_group(assignment.worker_id)],
        {"type": "worker.stop", "task_id": str(assignment.task_id), "token": str(assignment.token), "reason": reason},
    )


def _stop_siblings(task: Task, attempt: int, *, reason: str) -> None:
    """The other nodes of a multi-node run cannot go on alone: take them away."""
    for sibling in _live_assignments_of_attempt(task, attempt):
        if _release(sibling, status=NodeAssignment.Status.LOST):
            _send_stop(sibling, reason)


def fail_or_retry(
    task: Task, *, reason: str, exit_code: int | None = None, error: str = "", output: str = ""
) -> Task | None:
    """End an active run that did not complete: back to queued (with back-off) if retryable, else failed.

    Only infrastructure failures are retried, plus non-zero exits of tasks
    with `retry_on_exit_code`. A run ending while a cancel is pending ends
    `cancelled`. Retries keep `queued_at`, so the task keeps its aging credit.
    """
    now = timezone.now()
    if task.cancel_requested_at is not None:
        return task_transition(
            task_id=task.id,
            to=TaskStatus.CANCELLED,
            from_states=_ACTIVE,
            failure_reason=Task.FailureReason.CANCELLED,
            exit_code=exit_code,
            error=error,
            output=output,
        )
    retryable = reason in INFRASTRUCTURE_FAILURES or (
        reason == Task.FailureReason.EXIT_CODE and task.retry_on_exit_code
    )
    # A retry reads the datasets pinned at submission again: one gone or holding other bytes
    # would fail every retry the same way.
    preparation_retry = retryable and reason == Task.FailureReason.PREPARATION and task.retry_count < task.max_retries
    if preparation_retry and (changed := pinned_datasets_changed(task=task)):
        retryable, error = False, _datasets_changed_error(changed, error)
    if retryable and task.retry_count < task.max_retries:
        retry = task.retry_count + 1
        runnable_after = now + timedelta(seconds=retry_backoff_seconds(retry))
        moved = task_transition(
            task_id=task.id,
            to=TaskStatus.QUEUED,
            from_states=_ACTIVE,
            retry_count=retry,
            runnable_after=runnable_after,
            worker=None,
            started_at=None,
            failure_reason=reason,
            exit_code=exit_code,
            error=error,
            output=output,
            earlier_attempts=with_attempt_ended(task, ended_at=now, reason=reason, exit_code=exit_code, error=error),
        )
        if moved is not None:
            record(
                event_type="job_requeued",
                user=moved.owner,
                resource=f"task:{task.id}",
                action="retry",
                metadata={"attempt": task.attempt, "retry": retry, "reason": reason},
            )
        return moved
    return task_transition(
        task_id=task.id,
        to=TaskStatus.FAILED,
        from_states=_ACTIVE,
        failure_reason=reason,
        exit_code=exit_code,
        error=error,
        output=output,
    )


def _datasets_changed_error(changed: dict[str, str | None], error: str) -> str:
    what = "; ".join(
        f"dataset {name} was deleted" if digest is None else f"dataset {name} was uploaded again (now sha256 {digest})"
        for name, digest in changed.items()
    )
    note = f"{what} after the task was submitted: not retried; resubmitting the task pins the current dataset"
    return f"{note}. {error}" if error else note


def end_run(*, assignment_id: Any, reason: str, error: str, worker_offline: bool = False) -> bool:
    """The server takes a live run away (lease, reconcile, backstop): stop it and fail or retry the
    task. `worker_offline`: only while the run's worker is still offline (the run lost with it)."""
    with transaction.atomic():
        assignment = NodeAssignment.objects.filter(id=assignment_id, holds_capacity=True).first()
        if assignment is None:
            return False
        lock_run_workers(task_id=assignment.task_id, worker_id=assignment.worker_id)
        if worker_offline and not _offline(assignment.worker_id):
            return False
        task = Task.objects.select_for_update().get(id=assignment.task_id)
        if not _release(assignment, status=NodeAssignment.Status.LOST):
            return False
        _send_stop(assignment, error)
        if task.attempt != assignment.attempt or task.status not in _ACTIVE:
            return True
        if task.node_count > 1:
            outcome = {"failure_reason": reason, "exit_code": None, "error": error, "output": ""}
            _gang_node_failed(task, assignment, outcome, reason=error)
            _end_gang_with_its_last_node(task, assignment.attempt, _AT_ONCE)
        else:
            fail_or_retry(task, reason=reason, error=error)
    return True


# --- the scheduler's periodic duties -----------------------------------------


class DatabaseStalled(Exception):
    """The caller's statements stalled (`stalled()`): the database may have stopped answering
    everyone for a while, heartbeats and reports included, so what it just decided from their
    absence is rolled back."""


def _unless_stalled(stalled: Callable[[], bool], what: str) -> None:
    if stalled():
        raise DatabaseStalled(f"the database stalled while {what}; rolled back, as after an outage")


def expire_leases(*, now: datetime | None = None, stalled: Callable[[], bool] = lambda: False) -> int:
    """Workers silent for longer than the lease go offline; their runs are lost and re-queued.

    Read on the database's clock, on which heartbeats are stamped (fetchml/clock.py). `stalled`:
    whether the caller's statements have been held up (a database that froze for most of a lease
    and then answered stored no heartbeat meanwhile, and must not expire the workers it did not
    hear); checked once each worker is taken offline, before that commits (DatabaseStalled)."""
    cutoff = (now or database_now()) - timedelta(seconds=app_settings.WORKER_LEASE_SECONDS)
    silent = Q(last_heartbeat__lt=cutoff) | Q(last_heartbeat__isnull=True)
    expired = 0
    for worker_id, name in Worker.objects.filter(silent, status__in=_LIVE_WORKER_STATES).values_list("id", "name"):
        with transaction.atomic():
            if not _take_offline(worker_id, name, where=silent, action="lease_expired"):
                continue
            _unless_stalled(stalled, "expiring leases")
            # If the agent is still connected (a one-way partition), make it reconnect and reconcile.
            events.send_on_commit([events.worker_group(worker_id)], {"type": "worker.disconnect"})
        logger.warning("worker %s missed its lease; marked offline", name)
        expired += 1
    # Live runs on offline workers, including any left by a crash between the two steps.
    orphaned = NodeAssignment.objects.filter(holds_capacity=True, worker__status=Worker.Status.OFFLINE)
    lost = _lose_runs(orphaned, error="worker lost")
    with transaction.atomic():
        return expired + lost + _offline_if_drained()


def enforce_timeouts(*, now: datetime | None = None, stalled: Callable[[], bool] = lambda: False) -> int:
    """Backstop for the agent's own timeout: fail runs past timeout_seconds plus a margin.
    `stalled` as for `expire_leases`: the run's own report of its end may have been held up too."""
    now = now or timezone.now()
    margin = app_settings.TIMEOUT_MARGIN_SECONDS
    running = Task.objects.filter(
        status__in=(TaskStatus.RUNNING, TaskStatus.COLLECTING), timeout_seconds__isnull=False, started_at__isnull=False
    ).values_list("id", "started_at", "timeout_seconds")
    overdue = [tid for tid, started, limit in running if started + timedelta(seconds=limit + margin) < now]
    for task_id in overdue:
        with transaction.atomic():
            lock_run_workers(task_id=task_id)
            task = Task.objects.select_for_update().get(id=task_id)
            if task.status not in _ACTIVE:
                continue
            _stop_siblings(task, task.attempt, reason="timeout")
            fail_or_retry(task, reason=Task.FailureReason.TIMEOUT, error="run exceeded timeout_seconds")
            _unless_stalled(stalled, "enforcing time-outs")
    return len(overdue)


def task_cancel_notify(*, task: Task) -> None:
    """After commit, ask every worker holding a live node of `task` to cancel it."""
    who = task.cancelled_by.get_username() if task.cancelled_by_id else "an operator"
    for assignment in NodeAssignment.objects.filter(task_id=task.id, attempt=task.attempt, holds_capacity=True):
        events.send_on_commit(
            [events.worker_group(assignment.worker_id)],
            {
                "type": "worker.cancel",
                "task_id": str(task.id),
                "token": str(assignment.token),
                "reason": f"cancelled by {who}",
            },
        )
