"""The `assign` message: what a worker is told to run (docs/worker-protocol.md).

Built in two places from the same rule (`assign_message`): by the dispatch
round, from the rows it has just written, so the worker's connection only
relays it; and from the database (`assign_messages`) when unacknowledged
assignments are sent again (re-sends, a reconnecting worker). An `assign`
carries the plugins' secrets: it is never logged, and it crosses the channel
layer sealed (`assign_notice`), already spelled as the worker's frame will
carry it.
"""

import uuid
from typing import Any

from artifacts.selectors import spec_dataset_name
from fetchml import events
from jupyter.selectors import service_spec_for_task
from plugins.selectors import (
    ActiveConfigs,
    plugin_configs,
    plugin_env_for_task,
    plugin_sidecars_for_task,
    task_plugin_configs,
)
from scheduler.agent.datasets import SERVER_PREFIX
from scheduler.agent.protocol import encode_all
from scheduler.models import NodeAssignment
from scheduler.protocol import outgoing
from tasks.models import Task

# The rendezvous port on the rank-0 node: from torch.distributed's default 29500 on, one per task
# (from its id, so every node and every re-sent `assign` agree), so that two multi-node tasks whose
# rank 0 share a worker do not both bind 29500; they meet on one port once in MASTER_PORT_SPAN.
MASTER_PORT_BASE = 29500
MASTER_PORT_SPAN = 1000


def master_port_for(task_id: uuid.UUID) -> int:
    return MASTER_PORT_BASE + task_id.int % MASTER_PORT_SPAN


# The task fields an `assign` is built from: the round claims them, re-sends load only them
# (the rest of the row, such as an earlier attempt's error and output, can be long).
ASSIGN_TASK_FIELDS = (
    "id",
    "kind",
    "node_count",
    "entrypoint",
    "args",
    "env",
    "timeout_seconds",
    "cancel_grace_seconds",
    "snapshot_id",
    "datasets",
    "dataset_specs",
    "dataset_digests",
    "plugin_configs",
)


def pinned_dataset_specs(task: Task) -> list[dict[str, Any]]:
    """The task's datasets as specs carrying the sha256 each server dataset had at submission (the
    agent refuses other bytes): the listed names become specs of the same default mount."""
    digests = task.dataset_digests or {}

    def pinned(spec: dict[str, Any]) -> dict[str, Any]:
        name = spec_dataset_name(spec)
        if spec.get("sha256") or name not in digests:
            return spec
        return {**spec, "sha256": digests[name]}

    listed = [{"name": entry.removeprefix(SERVER_PREFIX)} for entry in task.datasets or []]
    return [pinned(spec) for spec in [*listed, *(task.dataset_specs or [])]]


def assign_message(assignment: NodeAssignment, task: Task, *, master_addr: str, fleet: ActiveConfigs) -> dict:
    """The `assign` of one node of `task`; `master_addr` is the rank-0 worker's hostname."""
    plugins = task_plugin_configs(task, fleet=fleet)
    return outgoing(
        "assign",
        task_id=str(task.id),
        token=str(assignment.token),
        attempt=assignment.attempt,
        kind=task.kind,
        entrypoint=task.entrypoint,
        args=task.args,
        # Plugin variables may hold secrets (API keys): this message is never logged.
        env={**plugin_env_for_task(task, configs=plugins), **task.env},
        resources={
            "cpu": assignment.cpu,
            "memory_gb": assignment.memory_gb,
            "gpus": assignment.gpus,
            "gpu_indices": assignment.gpu_indices,
        },
        timeout_seconds=task.timeout_seconds,
        cancel_grace_seconds=task.cancel_grace_seconds,
        node={
            "rank": assignment.node_id,
            "count": task.node_count,
            "master_addr": master_addr,
            "master_port": master_port_for(task.id),
        },
        snapshot_id=task.snapshot_id,
        dataset_specs=pinned_dataset_specs(task),
        datasets=[],
        sidecars=plugin_sidecars_for_task(task, configs=plugins),
        service=service_spec_for_task(task),
    )


def assign_notice(worker_id: Any, messages: list[dict]) -> tuple[list[str], dict]:
    """(groups, message) handing a worker's connection these `assign`s to relay as they are."""
    return events.assign_notice(worker_id, encode_all(messages), len(messages))


def round_assign_messages(assignments: list[NodeAssignment], tasks: dict[Any, tuple[Task, str]]) -> list[dict]:
    """The `assign`s of assignments a dispatch round has just written, in their order.

    `tasks` maps each task id to the task (loaded with `ASSIGN_TASK_FIELDS` at
    least) and its rank-0 worker's hostname. One query however many: the
    plugin configurations.
    """
    if not assignments:
        return []
    fleet = plugin_configs()
    messages = []
    for assignment in assignments:
        task, master_addr = tasks[assignment.task_id]
        messages.append(assign_message(assignment, task, master_addr=master_addr, fleet=fleet))
    return messages


def assign_messages(*, assignment_ids: list[Any], worker_id: Any) -> list[dict[str, Any]]:
    """The `assign` messages of those assignments still live and unacknowledged on this worker.

    Two queries however many (the assignments with their tasks and worker, the
    plugin configurations), plus one per multi-node or service task.
    """
    assignments = list(
        NodeAssignment.objects.select_related("task", "worker")
        .only(*_ASSIGNMENT_FIELDS, "worker__hostname", *(f"task__{name}" for name in ASSIGN_TASK_FIELDS))
        .filter(id__in=assignment_ids, worker_id=worker_id, holds_capacity=True, status=NodeAssignment.Status.ASSIGNED)
        .order_by("created_at", "node_id")
    )
    fleet = plugin_configs() if assignments else []
    return [
        assign_message(assignment, assignment.task, master_addr=_master_addr(assignment), fleet=fleet)
        for assignment in assignments
    ]


_ASSIGNMENT_FIELDS = tuple(field.name for field in NodeAssignment._meta.concrete_fields)


def _master_addr(assignment: NodeAssignment) -> str:
    if assignment.node_id == 0:
        return assignment.worker.hostname
    rank0 = NodeAssignment.objects.filter(task_id=assignment.task_id, attempt=assignment.attempt, node_id=0)
    return rank0.values_list("worker__hostname", flat=True).first() or ""
