"""How an attempt that ended without completing is kept in `Task.earlier_attempts` when the task
runs again (a retry, an operator's re-queue): its own outcome fields are cleared for the next."""

from datetime import datetime

from fetchml.clock import api_time
from tasks.models import Task

# The end of an earlier attempt's error kept (its last lines say most).
EARLIER_ATTEMPT_ERROR_CHARS = 2_000


def with_attempt_ended(task: Task, *, ended_at: datetime, reason: str, exit_code: int | None, error: str) -> list[dict]:
    """`task.earlier_attempts` and how its current attempt ended (the row is locked by the caller)."""
    ended = {
        "attempt": task.attempt,
        "worker_id": str(task.worker_id) if task.worker_id else None,
        "ended_at": api_time(ended_at),
        "failure_reason": reason,
        "exit_code": exit_code,
        "error": error[-EARLIER_ATTEMPT_ERROR_CHARS:],
    }
    return [*(task.earlier_attempts or []), ended]
