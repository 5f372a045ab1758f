"""The Scheduler's SSE streams: plain async views on `fetchml.sse` (fetchml.schema adds them to /v1/schema).

GET /v1/scheduler/status/stream
    `event: status`, data = the SchedulerStatus body plus `event` (what caused
    it: `connected`, `task_update`, `worker_connected`, `worker_disconnected`,
    `worker_draining`, `worker_offline`, `reservation_*`, ...), first on
    connect, then on every message of the `scheduler.status` group (queue
    depth changes come with every task transition) and after a heartbeat when
    the counts changed unseen. Never ends on its own.
GET /v1/scheduler/jobs/{jobId}/stream
    `event: status` (data `{task_id, status, priority, timestamp}`) first and
    on each state change (picked from its owner's group), `event: priority` (same data plus
    `priority_from`) on each priority change, and `event: end` (data
    `{task_id, status}`) once the job is final; then the stream closes.
    Owner or admin; anyone else 404.

Both: `: heartbeat` comments every FETCHML_SSE_HEARTBEAT_SECONDS (each also
re-reads the database, as channel-layer messages may be lost); 401 without a
valid key, 403 for worker keys, 429 when rate limited, standard error bodies.
"""

import uuid
from collections.abc import AsyncIterator
from typing import Any

from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from django.http import HttpRequest, HttpResponseBase
from django.utils import timezone

from fetchml import events
from fetchml.clock import api_time
from fetchml.decorators import safe_methods_only
from fetchml.errors import ApplicationError
from fetchml.query import refuse_unknown_or_repeated
from fetchml.sse import authenticate_stream, error_response_for, sse_frame, stream_response
from scheduler.api.reads import scheduler_status
from tasks.models import Task
from tasks.selectors import task_get_for_actor
from tasks.states import FINAL_STATES


class SchedulerStatusStream:
    """An `EventSource` of fleet and queue counts."""

    finished = False

    def __init__(self) -> None:
        self._last: dict[str, Any] | None = None

    async def _frame(self, cause: str, *, only_if_changed: bool = False) -> AsyncIterator[bytes]:
        current = await database_sync_to_async(scheduler_status)()
        counts = {key: value for key, value in current.items() if key != "timestamp"}
        if only_if_changed and counts == self._last:
            return
        self._last = counts
        yield sse_frame({**current, "event": cause}, event="status")

    async def start(self) -> AsyncIterator[bytes]:
        async for frame in self._frame("connected"):
            yield frame

    async def on_message(self, message: dict[str, Any]) -> AsyncIterator[bytes]:
        changes = events.task_events_of(message)
        # A batch of task changes is one re-read, named after its last change.
        cause = (changes[-1] if changes else message).get("event") or message.get("type") or "changed"
        async for frame in self._frame(str(cause)):
            yield frame

    async def on_heartbeat(self) -> AsyncIterator[bytes]:
        async for frame in self._frame("heartbeat", only_if_changed=True):
            yield frame


class JobStream:
    """An `EventSource` of one job's state and priority, ending with the job."""

    def __init__(self, *, task: Task) -> None:
        self.task = task
        self._seen: tuple[str, int] | None = None
        self.finished = False

    def _reload(self) -> Task:
        self.task.refresh_from_db(fields=["status", "priority"])
        return self.task

    def _frames(self, status: str, priority: int, priority_from: int | None = None) -> list[bytes]:
        frames = []
        data = {
            "task_id": str(self.task.id),
            "status": status,
            "priority": priority,
            "timestamp": api_time(timezone.now()),
        }
        if self._seen is None or self._seen[0] != status:
            frames.append(sse_frame(data, event="status"))
        if self._seen is not None and self._seen[1] != priority:
            previous = self._seen[1] if priority_from is None else priority_from
            frames.append(sse_frame({**data, "priority_from": previous}, event="priority"))
        self._seen = (status, priority)
        if status in FINAL_STATES:
            self.finished = True
            frames.append(sse_frame({"task_id": str(self.task.id), "status": status}, event="end"))
        return frames

    async def start(self) -> AsyncIterator[bytes]:
        task = await database_sync_to_async(self._reload)()
        for frame in self._frames(task.status, task.priority):
            yield frame

    async def on_message(self, message: dict[str, Any]) -> AsyncIterator[bytes]:
        for event in events.task_events_of(message, task_id=str(self.task.id)):
            if self.finished:
                break
            priority = event.get("priority", self._seen[1] if self._seen else self.task.priority)
            for frame in self._frames(event["status"], priority, event.get("priority_from")):
                yield frame

    async def on_heartbeat(self) -> AsyncIterator[bytes]:
        task = await database_sync_to_async(self._reload)()
        for frame in self._frames(task.status, task.priority):
            yield frame


@safe_methods_only
async def status_stream(request: HttpRequest) -> HttpResponseBase:
    try:
        actor = await authenticate_stream(request)
        refuse_unknown_or_repeated(request.GET)
    except ApplicationError as exc:
        return error_response_for(exc)
    return stream_response(SchedulerStatusStream(), groups=[events.STATUS_GROUP], actor=actor)


@safe_methods_only
async def job_stream(request: HttpRequest, jobId: uuid.UUID) -> HttpResponseBase:
    try:
        actor = await authenticate_stream(request)
        refuse_unknown_or_repeated(request.GET)
        task = await sync_to_async(task_get_for_actor)(actor=actor, task_id=jobId)
    except ApplicationError as exc:
        return error_response_for(exc)
    # The owner's group carries the job's state changes (among the owner's other tasks').
    groups = [events.user_group(task.owner_id)]
    return stream_response(JobStream(task=task), groups=groups, actor=actor)
