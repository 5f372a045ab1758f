"""The client WebSocket (/ws): live task updates for dashboards and CLIs.

Authenticated by the X-API-Key handshake header (never the query string: URLs
end up in logs). A connection joins its owner's group (`tasks.user.<pk>`), or
`tasks.admins` for admin keys, and is told `task_update` / `task_complete` for
every change. `{"type": "subscribe", "task_id": ...}` narrows it to chosen
tasks (the caller's own; any for admins): it then gets those tasks' changes
only (picked from their owners' groups), and also their new log lines
(`task_log`, from each task's group); unsubscribing from the last one widens
it again. Only ids travel over the channel layer; what is sent is reloaded
from the database, one query for each batch of changes.
"""

import json
import logging
import uuid
from typing import Any
from urllib.parse import parse_qsl

from channels.consumer import get_handler_name
from channels.db import database_sync_to_async
from django.utils import timezone
from rest_framework import exceptions as drf_exceptions

from fetchml import events
from fetchml.auth import Actor, authenticate_raw_key
from fetchml.consumers import SocketConsumer
from fetchml.errors import NotFound
from tasks.logs import serialize_line
from tasks.models import Task, TaskLogLine
from tasks.selectors import task_get_for_actor
from tasks.states import FINAL_STATES

logger = logging.getLogger("fetchml.ws")

# Close codes sent instead of accepting (the 4xxx range mirrors HTTP statuses).
CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_RATE_LIMITED = 4429

MAX_SUBSCRIPTIONS = 100
_QUERY_KEY_NAMES = frozenset({"api_key", "apikey", "key", "x-api-key", "x_api_key", "token"})
_TASK_EVENTS = frozenset({"task_update", "task_complete"})


def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin1")
    return None


def task_snapshot(task_id: str) -> dict[str, Any] | None:
    """The small fields of a task a client shows; None if it no longer exists."""
    return task_snapshots([task_id]).get(str(task_id))


def task_snapshots(task_ids: list[str]) -> dict[str, dict[str, Any]]:
    """`task_snapshot` of several tasks in one query, by task id (missing ones left out)."""
    tasks = Task.objects.select_related("owner").filter(id__in=set(task_ids))
    return {str(task.id): _snapshot(task) for task in tasks}


def _snapshot(task: Task) -> dict[str, Any]:
    return {
        "id": str(task.id),
        "job_name": task.job_name,
        "user_id": task.owner.get_username(),
        "kind": task.kind,
        "status": task.status,
        "priority": task.priority,
        "attempt": task.attempt,
        "retry_count": task.retry_count,
        "created_at": task.created_at.isoformat(),
        "started_at": task.started_at.isoformat() if task.started_at else None,
        "ended_at": task.ended_at.isoformat() if task.ended_at else None,
        "exit_code": task.exit_code,
        "failure_reason": task.failure_reason or None,
        "cancel_requested": task.cancel_requested_at is not None,
    }


def _owner_of_visible(actor: Actor, task_id: uuid.UUID) -> Any | None:
    """The owner's pk of a task the actor may see; None if it may not (or it does not exist)."""
    try:
        return task_get_for_actor(actor=actor, task_id=task_id).owner_id
    except NotFound:
        return None


def _lines(task_id: str, ids: list[int]) -> list[dict[str, Any]]:
    rows = TaskLogLine.objects.filter(task_id=task_id, id__in=ids).order_by("id")
    return [serialize_line(line) for line in rows]


class ClientConsumer(SocketConsumer):
    actor: Actor
    home_group: str
    subscriptions: dict[str, Any]  # task id -> its owner's pk

    async def connect(self) -> None:
        self.subscriptions = {}
        self.joined: set[str] = set()
        query = dict(parse_qsl(self.scope.get("query_string", b"").decode("latin1")))
        if _QUERY_KEY_NAMES & {name.lower() for name in query}:
            logger.info("refused /ws: API key in the query string")
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        raw = _header(self.scope, b"x-api-key")
        if not raw:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        ip = (self.scope.get("client") or [None])[0]
        try:
            key = await database_sync_to_async(authenticate_raw_key)(raw, ip)
        except drf_exceptions.Throttled:
            await self.close(code=CLOSE_RATE_LIMITED)
            return
        except drf_exceptions.AuthenticationFailed:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        self.actor = Actor(user=key.user, role=key.role, api_key_id=str(key.id), ip_address=ip)
        if self.actor.is_worker:
            # Worker agents have their own endpoint and must not see users' tasks.
            await self.close(code=CLOSE_FORBIDDEN)
            return
        self.home_group = events.ADMINS_GROUP if self.actor.is_admin else events.user_group(self.actor.user.pk)
        await self._join_groups()
        await self.accept()

    async def disconnect(self, code: int) -> None:
        for group in self.joined if hasattr(self, "joined") else ():
            await self.channel_layer.group_discard(group, self.channel_name)

    def _groups(self) -> set[str]:
        if not self.subscriptions:
            return {self.home_group}
        return {events.task_group(task_id) for task_id in self.subscriptions} | {
            events.user_group(owner) for owner in self.subscriptions.values()
        }

    async def _join_groups(self) -> None:
        """Join the groups the subscriptions need, then leave the others: a duplicate update is
        harmless, a lost one is not."""
        wanted = self._groups()
        for group in sorted(wanted - self.joined):
            await self.channel_layer.group_add(group, self.channel_name)
        for group in sorted(self.joined - wanted):
            await self.channel_layer.group_discard(group, self.channel_name)
        self.joined = wanted

    async def dispatch(self, message: dict) -> None:
        # Groups are shared with other listeners; a message type meant for them
        # is not an error here (channels would raise on a missing handler).
        try:
            handler_name = get_handler_name(message)
        except ValueError:
            handler_name = None
        if handler_name is None or not hasattr(self, handler_name):
            logger.debug("ignoring channel message %s", message.get("type"))
            return
        await super().dispatch(message)

    # --- from the client -------------------------------------------------
    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if text_data is None:
            await self._error("Binary frames are not supported; send JSON text")
            return
        try:
            message = json.loads(text_data)
        except ValueError:
            await self._error("Malformed JSON")
            return
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            await self._error('Messages are JSON objects with a "type"')
            return
        kind = message["type"]
        if kind == "ping":
            await self._send({"type": "pong", "timestamp": timezone.now().isoformat()})
        elif kind == "subscribe":
            await self._subscribe(message.get("task_id"))
        elif kind == "unsubscribe":
            await self._unsubscribe(message.get("task_id"))
        else:
            await self._error(f"Unknown message type {kind[:64]!r}")

    async def _subscribe(self, raw_id: Any) -> None:
        task_id = _task_id(raw_id)
        if task_id is None:
            await self._error("task_id must be a task id", code="VALIDATION_ERROR")
            return
        owner = await database_sync_to_async(_owner_of_visible)(self.actor, task_id)
        if owner is None:
            await self._error("Task not found", code="NOT_FOUND", task_id=str(task_id))
            return
        key = str(task_id)
        if key not in self.subscriptions:
            if len(self.subscriptions) >= MAX_SUBSCRIPTIONS:
                await self._error(f"At most {MAX_SUBSCRIPTIONS} subscriptions per connection", code="CONFLICT")
                return
            self.subscriptions[key] = owner
            await self._join_groups()
        await self._send({"type": "subscribed", "task_id": key})

    async def _unsubscribe(self, raw_id: Any) -> None:
        task_id = _task_id(raw_id)
        key = str(task_id) if task_id else None
        if key is None or key not in self.subscriptions:
            await self._error("Not subscribed to that task", code="NOT_FOUND")
            return
        del self.subscriptions[key]
        await self._join_groups()
        await self._send({"type": "unsubscribed", "task_id": key})

    # --- from the channel layer --------------------------------------------
    async def task_event(self, message: dict) -> None:
        await self.task_events({"type": "task.events", "events": [message]})

    async def task_events(self, message: dict) -> None:
        wanted = [event for event in events.task_events_of(message) if self._wants(event)]
        if not wanted:
            return
        snapshots = await database_sync_to_async(task_snapshots)([event["task_id"] for event in wanted])
        for event in wanted:
            snapshot = snapshots.get(event["task_id"])
            if snapshot is None:
                continue
            # The event's own status and priority: a client sees each transition,
            # even when the row has moved on by the time it is reloaded.
            snapshot = {**snapshot, "status": event.get("status", snapshot["status"])}
            snapshot["priority"] = event.get("priority", snapshot["priority"])
            kind = event.get("event")
            if kind not in _TASK_EVENTS:
                kind = "task_complete" if snapshot["status"] in FINAL_STATES else "task_update"
            await self._send({"type": kind, "task": snapshot, "timestamp": timezone.now().isoformat()})

    async def task_log(self, message: dict) -> None:
        task_id = message.get("task_id")
        if task_id not in self.subscriptions:
            return
        lines = await database_sync_to_async(_lines)(task_id, list(message.get("ids") or []))
        if lines:
            await self._send({"type": "task_log", "task_id": task_id, "lines": lines})

    def _wants(self, event: dict) -> bool:
        if not isinstance(event.get("task_id"), str):
            return False
        if self.subscriptions:
            return event["task_id"] in self.subscriptions
        # Defence in depth: the groups already keep other users' tasks away.
        return self.actor.is_admin or event.get("owner_id") == self.actor.user.pk

    async def _send(self, payload: dict) -> None:
        await self.send(text_data=json.dumps(payload))

    async def _error(self, message: str, *, code: str = "BAD_REQUEST", **extra: Any) -> None:
        await self._send({"type": "error", "error": message, "code": code, **extra})


def _task_id(raw: Any) -> uuid.UUID | None:
    if not isinstance(raw, str):
        return None
    try:
        return uuid.UUID(raw)
    except ValueError:
        return None
