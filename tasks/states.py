"""The task state machine: the one place that says which transitions exist.

queued -> preparing -> running -> collecting -> completed
any of preparing/running/collecting -> failed (-> queued again when retried)
any non-final state -> cancelled
"""

from django.db import models


class TaskStatus(models.TextChoices):
    QUEUED = "queued"
    PREPARING = "preparing"
    RUNNING = "running"
    COLLECTING = "collecting"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL_STATES = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED})
ACTIVE_STATES = frozenset({TaskStatus.PREPARING, TaskStatus.RUNNING, TaskStatus.COLLECTING})
# An attempt's outcome fields, as they are before it has one: a retried task must not show the
# last attempt's exit code and error while it waits or runs again (the audit chain keeps why).
NO_OUTCOME = {"exit_code": None, "failure_reason": "", "error": "", "output": ""}

# target state -> the states it may be reached from
ALLOWED_FROM: dict[str, frozenset[str]] = {
    TaskStatus.QUEUED: frozenset({TaskStatus.PREPARING, TaskStatus.RUNNING, TaskStatus.COLLECTING, TaskStatus.FAILED}),
    TaskStatus.PREPARING: frozenset({TaskStatus.QUEUED}),
    TaskStatus.RUNNING: frozenset({TaskStatus.PREPARING}),
    TaskStatus.COLLECTING: frozenset({TaskStatus.RUNNING}),
    TaskStatus.COMPLETED: frozenset({TaskStatus.RUNNING, TaskStatus.COLLECTING}),
    TaskStatus.FAILED: frozenset({TaskStatus.QUEUED, *ACTIVE_STATES}),
    TaskStatus.CANCELLED: frozenset({TaskStatus.QUEUED, *ACTIVE_STATES}),
}


def sources_of(target: str) -> frozenset[str]:
    """States from which `target` may be entered (for conditional UPDATEs)."""
    return ALLOWED_FROM[target]


def can_transition(current: str, target: str) -> bool:
    return current in ALLOWED_FROM[target]
