"""GET /v1/tasks/{taskId}/logs: stored log lines as JSON, or followed live as SSE.

A plain async view (not DRF): a followed stream can stay open for hours and
must not hold a worker thread. drf-spectacular does not see plain views, so a
hook in fetchml/schema.py adds this operation to the served schema; in short:

- query `tail` (1..10000): only the last N lines; `after_id` (0..2**63-1): only
  lines with a larger id (paging; `Last-Event-ID` does the same for a reconnecting
  SSE client, and wins over `tail`); `tail` and `after_id` together are a 400;
  `follow` (true|false). Numbers are plain ASCII digits; anything else is a 400.
- without follow: 200 `{"task_id", "status", "lines": [{"id", "stream", "line",
  "attempt", "node", "seq", "created_at"}], "has_more", "next_after_id"}`, at
  most 10000 lines, in the order stored (`seq`: the line's place in its node's
  output, which a batch the agent had to send again keeps).
- with follow: `text/event-stream`; `event: status` (data `{task_id, status,
  priority, timestamp}`) first and on every change, `event: log` (id = line id,
  data = one line as above) for stored then new lines, and `event: end` (data
  `{task_id, status}`) once the task is final and all its lines were sent.
- 400 bad parameters, 401 no/invalid key, 403 worker key, 404 not the caller's
  task (admins see all), 429 rate limited; all in the standard error format.
"""

import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from django.http import HttpRequest, HttpResponseBase, QueryDict
from django.utils import timezone

from fetchml import events
from fetchml.clock import api_time
from fetchml.decorators import safe_methods_only
from fetchml.errors import ApplicationError
from fetchml.jsonbody import CompactJsonResponse
from fetchml.query import refuse_unknown_or_repeated
from fetchml.sse import authenticate_stream, error_response_for, sse_frame, stream_response
from tasks.logs import CATCH_UP_CHUNK, MAX_TAIL, log_lines, serialize_line
from tasks.models import Task
from tasks.selectors import task_get_for_actor
from tasks.states import FINAL_STATES

_BOOLEANS = {"true": True, "1": True, "false": False, "0": False}
_DIGITS = re.compile(r"[0-9]+")
# Log line ids are 64-bit keys: a larger after_id names no line (and fits no database integer).
MAX_LINE_ID = 2**63 - 1


@dataclass(frozen=True)
class LogQuery:
    tail: int | None
    after_id: int | None
    follow: bool


LOG_QUERY_PARAMETERS = ("follow", "tail", "after_id")


def _bad(field: str, message: str, *, source: str = "query parameter") -> ApplicationError:
    return ApplicationError(f"Invalid {source}: {field}", details=[{"field": field, "message": message}])


def parse_whole_number(raw: str, *, name: str, low: int, high: int, source: str = "query parameter") -> int:
    """`raw` as an integer from `low` to `high`, or a 400 naming `name`: the one parser of this
    endpoint's integers (query parameters and Last-Event-ID alike).

    Only the ASCII digits 0-9: int() alone also takes "1_0", " 10", "+10" and other scripts'
    digits, and str.isdigit() passes "²", which int() then refuses.
    """
    if _DIGITS.fullmatch(raw) is None:
        raise _bad(name, "must be a whole number written with the digits 0-9", source=source)
    digits = raw.lstrip("0") or "0"
    # Too many digits is out of range without converting: int() of thousands of them is slow, then refused.
    value = int(digits) if len(digits) <= len(str(high)) else None
    if value is None or not low <= value <= high:
        raise _bad(name, f"must be between {low} and {high}", source=source)
    return value


def _int_param(params: QueryDict, name: str, *, low: int, high: int) -> int | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    return parse_whole_number(raw, name=name, low=low, high=high)


def parse_log_query(params: QueryDict, last_event_id: str | None) -> LogQuery:
    refuse_unknown_or_repeated(params, LOG_QUERY_PARAMETERS)
    raw_follow = params.get("follow", "false").lower()
    if raw_follow not in _BOOLEANS:
        raise _bad("follow", "must be true or false")
    tail = _int_param(params, "tail", low=1, high=MAX_TAIL)
    after_id = _int_param(params, "after_id", low=0, high=MAX_LINE_ID)
    if tail is not None and after_id is not None:
        raise _bad("tail", "give tail (the last lines) or after_id (the lines after one), not both")
    follow = _BOOLEANS[raw_follow]
    if follow and last_event_id:
        # An EventSource reconnecting: resume after the last line it received.
        after_id = parse_whole_number(last_event_id, name="Last-Event-ID", low=0, high=MAX_LINE_ID, source="header")
        tail = None
    return LogQuery(tail=tail, after_id=after_id, follow=follow)


def _log_page(task: Task, query: LogQuery) -> dict[str, Any]:
    lines = log_lines(task=task, tail=query.tail, after_id=query.after_id, limit=MAX_TAIL + 1)
    has_more = len(lines) > MAX_TAIL
    lines = lines[:MAX_TAIL]
    return {
        "task_id": str(task.id),
        "status": task.status,
        "lines": [serialize_line(line) for line in lines],
        "has_more": has_more,
        "next_after_id": lines[-1].id if lines else query.after_id,
    }


class TaskLogStream:
    """The follow stream of one task: an `EventSource` for `fetchml.sse.event_stream`.

    Lines are sent in id order and each once: `_last_id` is the highest id sent,
    and every catch-up reads the lines after it (one worker appends a task's
    lines in order, so nothing can appear below it later).
    """

    def __init__(self, *, task: Task, tail: int | None, after_id: int | None) -> None:
        self.task = task
        self.tail = tail
        self._last_id = after_id or 0
        self._status: tuple[str, int] | None = None
        self.finished = False

    async def start(self) -> AsyncIterator[bytes]:
        # The status is read before the lines: if it is final, every line is already stored.
        task = await database_sync_to_async(self._reload)()
        yield self._status_frame(task.status, task.priority)
        if self.tail is not None:
            lines = await database_sync_to_async(log_lines)(task=self.task, tail=self.tail, after_id=self._last_id)
            for frame in self._line_frames(lines):
                yield frame
        async for frame in self._catch_up():
            yield frame
        if task.status in FINAL_STATES:
            yield self._end_frame(task.status)

    async def on_message(self, message: dict[str, Any]) -> AsyncIterator[bytes]:
        kind = message.get("type")
        if kind == "task.log":
            if max(message.get("ids") or [0]) > self._last_id:
                async for frame in self._catch_up():
                    yield frame
            return
        for event in events.task_events_of(message, task_id=str(self.task.id)):
            if self.finished:
                break
            status, priority = event["status"], event.get("priority", self.task.priority)
            if (status, priority) != self._status:
                yield self._status_frame(status, priority)
            if status in FINAL_STATES:
                async for frame in self._catch_up():
                    yield frame
                yield self._end_frame(status)

    async def on_heartbeat(self) -> AsyncIterator[bytes]:
        async for frame in self._catch_up():
            yield frame
        task = await database_sync_to_async(self._reload)()
        if (task.status, task.priority) != self._status:
            yield self._status_frame(task.status, task.priority)
        if task.status in FINAL_STATES:
            # Lines may have landed between the catch-up above and the final state.
            async for frame in self._catch_up():
                yield frame
            yield self._end_frame(task.status)

    def _reload(self) -> Task:
        self.task.refresh_from_db(fields=["status", "priority"])
        return self.task

    async def _catch_up(self) -> AsyncIterator[bytes]:
        while True:
            lines = await database_sync_to_async(log_lines)(
                task=self.task, after_id=self._last_id, limit=CATCH_UP_CHUNK
            )
            for frame in self._line_frames(lines):
                yield frame
            if len(lines) < CATCH_UP_CHUNK:
                return

    def _line_frames(self, lines: list) -> list[bytes]:
        frames = []
        for line in lines:
            if line.id > self._last_id:
                frames.append(sse_frame(serialize_line(line), event="log", event_id=line.id))
                self._last_id = line.id
        return frames

    def _status_frame(self, status: str, priority: int) -> bytes:
        self._status = (status, priority)
        data = {
            "task_id": str(self.task.id),
            "status": status,
            "priority": priority,
            "timestamp": api_time(timezone.now()),
        }
        return sse_frame(data, event="status")

    def _end_frame(self, status: str) -> bytes:
        self.finished = True
        return sse_frame({"task_id": str(self.task.id), "status": status}, event="end")


@safe_methods_only
async def task_logs(request: HttpRequest, task_id: uuid.UUID) -> HttpResponseBase:
    try:
        actor = await authenticate_stream(request)
        query = parse_log_query(request.GET, request.headers.get("Last-Event-ID"))
        # Within the request Django manages the connection; the stream's own
        # reads (long after) use database_sync_to_async, which drops stale ones.
        task = await sync_to_async(task_get_for_actor)(actor=actor, task_id=task_id)
        if not query.follow:
            return CompactJsonResponse(await sync_to_async(_log_page)(task, query))
    except ApplicationError as exc:
        return error_response_for(exc)
    source = TaskLogStream(task=task, tail=query.tail, after_id=query.after_id)
    # The task's group carries its log lines, its owner's group its state changes.
    groups = [events.task_group(task.id), events.user_group(task.owner_id)]
    return stream_response(source, groups=groups, actor=actor)
