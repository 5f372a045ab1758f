"""Task log lines: appended in batches by the worker consumer, read by the logs API.

Lines live in TaskLogLine (one row per line), never on the Task row, so a long
run does not rewrite a growing text column. Ids are the order: a single-node
task's lines arrive over one worker connection at a time and are appended in
order, and the nodes of a multi-node task append holding the task's row lock
(scheduler.services), so ids follow commits and "lines with id > N" is a
correct resume point for readers. A batch the agent
had to send again (the server failed to store it, or its answer was lost) is
stored when it arrives, after lines sent later, and only once; each line's
`seq` is its place in its node's output.
"""

from collections.abc import Iterable
from typing import Any

from django.db import transaction

from fetchml import events
from fetchml.clock import api_time
from fetchml.errors import Invalid
from tasks.models import Task, TaskLogLine

# A runaway process printing one endless line must not fill the database.
MAX_LINE_CHARS = 16_384
MAX_TAIL = 10_000
# Lines read per query while a follower catches up, so a long log never sits in memory at once.
CATCH_UP_CHUNK = 1000
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


def append_lines(
    *, task_id: Any, attempt: int, lines: list[dict[str, Any]], node_id: int = 0, first_seq: int | None = None
) -> int:
    """Store a batch of lines of one attempt; publish their ids to the task's group after commit.

    With `first_seq` (the place of the first line in the node's output, as
    the agent counts), lines already stored at their place are skipped: a
    batch sent again because its answer was lost is stored once. Returns
    how many lines were stored. The caller (the worker consumer) has
    already checked that the sender holds the task's current assignment.
    """
    rows = _validated(lines)
    places: list[int | None] = [None] * len(rows)
    if rows and first_seq is not None:
        places = list(range(first_seq, first_seq + len(rows)))
        stored = set(
            TaskLogLine.objects.filter(
                task_id=task_id, attempt=attempt, node_id=node_id, seq__gte=places[0], seq__lte=places[-1]
            ).values_list("seq", flat=True)
        )
        kept = [(place, row) for place, row in zip(places, rows, strict=True) if place not in stored]
        places, rows = [place for place, _ in kept], [row for _, row in kept]
    if not rows:
        return 0
    with transaction.atomic():
        created = TaskLogLine.objects.bulk_create(
            [
                TaskLogLine(task_id=task_id, attempt=attempt, node_id=node_id, seq=place, stream=stream, line=text)
                for place, (stream, text) in zip(places, rows, strict=True)
            ]
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
        "node": line.node_id,
        "seq": line.seq,
        "created_at": api_time(line.created_at),
    }
