"""Task log lines: appended in batches by the worker consumer, read by the logs API.

Lines live in TaskLogLine (one row per line), never on the Task row, so a long
run does not rewrite a growing text column. Ids are the order: one task's lines
arrive over one worker connection at a time and are appended in order, so
"lines with id > N" is a correct resume point for readers.
"""

from collections.abc import Iterable
from typing import Any

from django.db import transaction

from fetchml import events
from fetchml.errors import Invalid
from tasks.models import Task, TaskLogLine

# A runaway process printing one endless line must not fill the database.
MAX_LINE_CHARS = 16_384
MAX_TAIL = 10_000
_STREAMS = frozenset(TaskLogLine.Stream.values)


def _validated(lines: Iterable[dict[str, Any]]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for index, item in enumerate(lines):
        stream = item.get("stream") if isinstance(item, dict) else None
        text = item.get("line") if isinstance(item, dict) else None
        if stream not in _STREAMS or not isinstance(text, str):
            raise Invalid(
                "log lines need a stream (stdout|stderr) and a string line",
                details=[{"field": f"lines[{index}]", "message": "expected {stream: stdout|stderr, line: string}"}],
            )
        rows.append((stream, text[:MAX_LINE_CHARS]))
    return rows


def append_lines(*, task_id: Any, attempt: int, lines: list[dict[str, Any]]) -> int:
    """Store a batch of lines of one attempt; publish their ids to the task's group after commit.

    Returns how many lines were stored. The caller (the worker consumer) has
    already checked that the sender holds the task's current assignment.
    """
    rows = _validated(lines)
    if not rows:
        return 0
    with transaction.atomic():
        created = TaskLogLine.objects.bulk_create(
            [TaskLogLine(task_id=task_id, attempt=attempt, stream=stream, line=text) for stream, text in rows]
        )
        # PostgreSQL and SQLite >= 3.35 return the new ids from the bulk INSERT.
        ids = [line.id for line in created]
        events.send_on_commit(
            [events.task_group(task_id)],
            {"type": "task.log", "task_id": str(task_id), "attempt": attempt, "ids": ids},
        )
    return len(rows)


def log_lines(
    *, task: Task, tail: int | None = None, after_id: int | None = None, limit: int | None = None
) -> list[TaskLogLine]:
    """A task's lines in order: the last `tail` of them, and/or those after `after_id`, at most `limit`."""
    if tail is not None and not 1 <= tail <= MAX_TAIL:
        raise Invalid(f"tail must be between 1 and {MAX_TAIL}", details=[{"field": "tail", "message": "out of range"}])
    queryset = TaskLogLine.objects.filter(task=task)
    if after_id is not None:
        queryset = queryset.filter(id__gt=after_id)
    if tail is not None:
        lines = list(queryset.order_by("-id")[:tail])
        lines.reverse()
        return lines[:limit] if limit is not None else lines
    queryset = queryset.order_by("id")
    return list(queryset[:limit] if limit is not None else queryset)


def serialize_line(line: TaskLogLine) -> dict[str, Any]:
    return {
        "id": line.id,
        "stream": line.stream,
        "line": line.line,
        "attempt": line.attempt,
        "created_at": line.created_at.isoformat(),
    }
