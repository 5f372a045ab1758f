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

The channel layer may lose a message (Redis away, a full in-memory queue),
and a client may subscribe after its task changed; the database is the
record. So `subscribed` is followed by the task's current state, and every
FETCHML_WS_RECHECK_SECONDS the connection re-reads the tasks it told about
that had not ended (and its subscriptions, with their lines after the last
one sent) and tells what changed unseen. A change older than the state
already told is not told after it: a client never sees a task go back.

A connection ends (close code 4401) when its key is revoked (told through the
key's group, `api_key.<id>`) or found unusable at a re-check (expired, its
user deactivated, a revocation's message lost).
"""

import asyncio
import json
import logging
import uuid
from collections import OrderedDict
from typing import Any, NamedTuple
from urllib.parse import parse_qsl

import django.db
from channels.consumer import get_handler_name
from channels.db import database_sync_to_async
from django.utils import timezone
from rest_framework import exceptions as drf_exceptions

from fetchml import events
from fetchml.aio import cancel_and_wait
from fetchml.auth import Actor, authenticate_raw_key, key_usable
from fetchml.clock import api_time
from fetchml.conf import app_settings
from fetchml.consumers import SocketConsumer
from fetchml.errors import NotFound
from fetchml.jsonbody import DuplicateKey, JSONTooDeep, loads
from fetchml.live_layer import LIVE_LAYER
from fetchml.live_limits import LiveConnection, TooManyLiveConnections, live_connections
from fetchml.shared_reads import SharedRead
from tasks.logs import CATCH_UP_CHUNK, log_lines, serialize_line
from tasks.models import Task, TaskLogLine
from tasks.selectors import task_get_for_actor
from tasks.states import FINAL_STATES

logger = logging.getLogger("fetchml.ws")

# Close codes of a refused connection (the 4xxx range mirrors HTTP statuses).
CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_RATE_LIMITED = 4429

MAX_SUBSCRIPTIONS = 100
# Tasks whose last told state a connection remembers (the oldest forgotten first): an admin's
# connection hears of every task, and only those told about are re-checked.
MAX_REMEMBERED = 10_000
# A zero interval would spin; the setting parser only guarantees >= 0.
MIN_RECHECK_SECONDS = 0.05
# Task ids per query: within the parameter limit of every SQLite (999 before 3.32).
IDS_PER_QUERY = 500
_QUERY_KEY_NAMES = frozenset({"api_key", "apikey", "key", "x-api-key", "x_api_key", "token"})
_TASK_EVENTS = frozenset({"task_update", "task_complete"})


class Told(NamedTuple):
    """What a connection last told of a task."""

    status: str
    fingerprint: int  # of the whole snapshot told: an event bringing nothing new is not told again


def _fingerprint(snapshot: dict[str, Any]) -> int:
    return hash(tuple(snapshot.values()))


def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin1")
    return None


def task_snapshot(task_id: str) -> dict[str, Any] | None:
    """The small fields of a task a client shows; None if it no longer exists."""
    return task_snapshots([task_id]).get(str(task_id))


def task_snapshots(task_ids: list[str]) -> dict[str, dict[str, Any]]:
    """`task_snapshot` of several tasks, by task id (missing ones left out): a query per `IDS_PER_QUERY`."""
    snapshots = {}
    for ids in _in_chunks(task_ids):
        snapshots |= {str(task.id): _snapshot(task) for task in Task.objects.select_related("owner").filter(id__in=ids)}
    return snapshots


def _in_chunks(task_ids: list[str]) -> list[list[str]]:
    unique = list(dict.fromkeys(task_ids))
    return [unique[start : start + IDS_PER_QUERY] for start in range(0, len(unique), IDS_PER_QUERY)]


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
        "created_at": api_time(task.created_at),
        "started_at": api_time(task.started_at) if task.started_at else None,
        "ended_at": api_time(task.ended_at) if task.ended_at else None,
        "exit_code": task.exit_code,
        "failure_reason": task.failure_reason,
        "cancel_requested": task.cancel_requested_at is not None,
    }


def _owner_of_visible(actor: Actor, task_id: uuid.UUID) -> Any | None:
    """The owner's pk of a task the actor may see; None if it may not (or it does not exist)."""
    try:
        return task_get_for_actor(actor=actor, task_id=task_id).owner_id
    except NotFound:
        return None


def _lines_after(task_id: str, after_id: int) -> list[dict[str, Any]]:
    """A chunk of the task's lines after `after_id`, read as the log follow reads them."""
    lines = log_lines(task=Task(id=uuid.UUID(task_id)), after_id=after_id, limit=CATCH_UP_CHUNK)
    return [serialize_line(line) for line in lines]


def _last_line_id(task_id: uuid.UUID) -> int:
    return TaskLogLine.objects.filter(task_id=task_id).order_by("-id").values_list("id", flat=True).first() or 0


def _statuses(task_ids: list[str]) -> dict[str, str]:
    statuses = {}
    for ids in _in_chunks(task_ids):
        rows = Task.objects.filter(id__in=ids).values_list("id", "status")
        statuses |= {str(task_id): status for task_id, status in rows}
    return statuses


# Every connection told of a change reads it: the connections of a moment share their reads.
shared_snapshots = SharedRead(task_snapshots)
shared_statuses = SharedRead(_statuses)


class ClientConsumer(SocketConsumer):
    channel_layer_alias = LIVE_LAYER  # one membership per group and process, fanned out here
    actor: Actor | None = None  # set once the key is accepted
    counted: LiveConnection | None = None  # this connection's place among its key's live connections
    rechecks: asyncio.Task | None = None
    key_refused = False  # the key was found revoked or expired: the connection is closing
    home_group: str
    subscriptions: dict[str, Any]  # task id -> its owner's pk

    async def connect(self) -> None:
        self.subscriptions = {}
        self.joined: set[str] = set()
        self.told: OrderedDict[str, Told] = OrderedDict()  # task id -> what was told last, newest last
        self.lines_told: dict[str, int] = {}  # subscribed task id -> the id of its last line told
        # Event handlers, subscriptions and re-checks read and tell one at a time, so that what
        # `told` says is what the client was sent.
        self.telling = asyncio.Lock()
        self.rechecks: asyncio.Task | None = None
        query = dict(parse_qsl(self.scope.get("query_string", b"").decode("latin1")))
        if _QUERY_KEY_NAMES & {name.lower() for name in query}:
            logger.info("refused /ws: API key in the query string")
            await self.refuse(CLOSE_UNAUTHENTICATED, "API keys are accepted in the X-API-Key header only")
            return
        raw = _header(self.scope, b"x-api-key")
        if not raw:
            await self.refuse(CLOSE_UNAUTHENTICATED, "an X-API-Key header is required")
            return
        ip = (self.scope.get("client") or [None])[0]
        try:
            key = await database_sync_to_async(authenticate_raw_key)(raw, ip)
        except drf_exceptions.Throttled:
            await self.refuse(CLOSE_RATE_LIMITED, "too many failed authentication attempts; try again later")
            return
        except drf_exceptions.AuthenticationFailed:
            await self.refuse(CLOSE_UNAUTHENTICATED, "invalid API key")
            return
        except django.db.Error as exc:
            await self.refuse_unavailable(exc)
            return
        actor = Actor(user=key.user, role=key.role, api_key_id=str(key.id), ip_address=ip)
        if actor.is_worker:
            # Worker agents have their own endpoint and must not see users' tasks.
            await self.refuse(CLOSE_FORBIDDEN, "worker keys connect to /ws/worker")
            return
        try:
            self.counted = live_connections.open(actor.api_key_id)
        except TooManyLiveConnections as exc:
            await self.refuse(CLOSE_RATE_LIMITED, exc.message)
            return
        self.actor = actor
        self.home_group = events.ADMINS_GROUP if self.actor.is_admin else events.user_group(self.actor.user.pk)
        await self._join_groups()
        await self.accept()
        self.rechecks = asyncio.create_task(self._recheck_forever())

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Here, not in disconnect(): a consumer that failed or was cancelled gives its place back too,
            # and stops re-checking (its groups are left by the layer, fetchml/live_layer.py).
            if self.counted is not None:
                self.counted.release()
            if self.rechecks is not None:
                self.rechecks.cancel()

    async def disconnect(self, code: int) -> None:
        if getattr(self, "rechecks", None) is not None:
            await cancel_and_wait(self.rechecks)
        for group in self.joined if hasattr(self, "joined") else ():
            await self.channel_layer.group_discard(group, self.channel_name)

    def _groups(self) -> set[str]:
        if self.subscriptions:
            wanted = {events.task_group(task_id) for task_id in self.subscriptions}
            wanted |= {events.user_group(owner) for owner in self.subscriptions.values()}
        else:
            wanted = {self.home_group}
        return wanted | {events.api_key_group(self.actor.api_key_id)}  # told when the key is revoked

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
        try:
            await super().dispatch(message)
        except django.db.Error:  # any failure of the database, closed connections included
            # The next re-check tells what this message would have; the connection stays.
            logger.warning("could not read what a %s message is about", message.get("type"), exc_info=True)

    # --- from the client -------------------------------------------------
    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.actor is None or self.key_refused:
            return  # refused in connect(), or the key since; the close is under way
        if text_data is None:
            await self._error("Binary frames are not supported; send JSON text")
            return
        try:
            message = loads(text_data, unique_keys=True)
        except (JSONTooDeep, DuplicateKey) as exc:
            await self._error(str(exc))
            return
        except ValueError:
            await self._error("Malformed JSON")
            return
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            await self._error('Messages are JSON objects with a "type"')
            return
        kind = message["type"]
        try:
            if kind == "ping":
                await self._send({"type": "pong", "timestamp": api_time(timezone.now())})
            elif kind == "subscribe":
                await self._subscribe(message.get("task_id"))
            elif kind == "unsubscribe":
                await self._unsubscribe(message.get("task_id"))
            else:
                await self._error(f"Unknown message type {kind[:64]!r}")
        except django.db.Error:  # any failure of the database, closed connections included
            logger.warning("could not answer a /ws %s message", kind[:64], exc_info=True)
            about = {"task_id": message["task_id"]} if isinstance(message.get("task_id"), str) else {}
            await self._error("The database is unavailable; try again", code="SERVICE_UNAVAILABLE", **about)

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
        async with self.telling:
            if key not in self.subscriptions:
                if len(self.subscriptions) >= MAX_SUBSCRIPTIONS:
                    await self._error(f"At most {MAX_SUBSCRIPTIONS} subscriptions per connection", code="CONFLICT")
                    return
                self.subscriptions[key] = owner
                await self._join_groups()  # before the reads below: nothing published after them is missed
                try:
                    self.lines_told[key] = await database_sync_to_async(_last_line_id)(task_id)
                except django.db.Error:  # any failure of the database, closed connections included
                    del self.subscriptions[key]
                    await self._join_groups()
                    raise
            await self._send({"type": "subscribed", "task_id": key})
            # Should this read fail, the subscription stands and the next re-check tells the state.
            snapshot = (await shared_snapshots([key])).get(key)
            if snapshot is not None:
                await self._tell(snapshot)

    async def _unsubscribe(self, raw_id: Any) -> None:
        task_id = _task_id(raw_id)
        if task_id is None:
            await self._error("task_id must be a task id", code="VALIDATION_ERROR")
            return
        key = str(task_id)
        if key not in self.subscriptions:
            await self._error("Not subscribed to that task", code="NOT_FOUND", task_id=key)
            return
        async with self.telling:
            del self.subscriptions[key]
            self.lines_told.pop(key, None)
            await self._join_groups()
        await self._send({"type": "unsubscribed", "task_id": key})

    # --- from the channel layer --------------------------------------------
    async def task_event(self, message: dict) -> None:
        await self._tell_events(message)

    async def task_events(self, message: dict) -> None:
        await self._tell_events(message)

    async def _tell_events(self, message: dict) -> None:
        """Tell the changes a `task.event` or `task.events` message is about that this connection wants."""
        told_of = events.task_events_of(message)
        wanted = [event for event in told_of if self._wants(event)]
        if not wanted:
            return
        async with self.telling:
            # Every listener of this process told of the message shares one read of all it is about.
            about = [event["task_id"] for event in told_of if isinstance(event.get("task_id"), str)]
            snapshots = await shared_snapshots.about(message, about)
            for event in wanted:
                snapshot = snapshots.get(event["task_id"])
                if snapshot is None:
                    continue
                # The event's own status and priority: a client sees each transition,
                # even when the row has moved on by the time it is reloaded...
                status = event.get("status", snapshot["status"])
                told = self.told.get(snapshot["id"])
                if told is not None and told.status == snapshot["status"] != status:
                    continue  # ...but not one older than the current state it was already told
                telling = {**snapshot, "status": status, "priority": event.get("priority", snapshot["priority"])}
                if told is not None and told.fingerprint == _fingerprint(telling):
                    continue  # already told, e.g. by the state sent on subscribing just before this event
                await self._tell(telling, kind=event.get("event"))

    async def task_log(self, message: dict) -> None:
        task_id = message.get("task_id")
        if task_id not in self.subscriptions:
            return
        async with self.telling:
            # Every line after the last one told, not only this message's: an earlier message may be lost.
            await self._tell_lines(task_id)

    async def api_key_revoked(self, message: dict) -> None:
        await self._close_revoked("API key revoked")

    # --- re-checks ------------------------------------------------------------
    async def _recheck_forever(self) -> None:
        while True:
            await asyncio.sleep(max(app_settings.WS_RECHECK_SECONDS, MIN_RECHECK_SECONDS))
            try:
                # The key first: expiry and a deactivated user send no message, and the channel
                # layer may lose a revocation's.
                if not await key_usable(self.actor.api_key_id):
                    await self._close_revoked("API key revoked or expired")
                    return
                await self._recheck()
            except Exception:  # the loop outlives any failure: the next re-check catches up
                logger.warning("re-check of a /ws connection failed; trying again later", exc_info=True)

    async def _recheck(self) -> None:
        """Tell what changed unseen: the state of each task told about that had not ended, and of
        each subscription, and the subscriptions' lines after the last one told."""
        async with self.telling:
            unended = [task_id for task_id, told in self.told.items() if told.status not in FINAL_STATES]
            watched = list(dict.fromkeys([*unended, *self.subscriptions]))
            if watched:
                current = await shared_statuses(watched)
                for task_id in watched:
                    if task_id not in current and task_id not in self.subscriptions:
                        self.told.pop(task_id, None)  # deleted: nothing more to tell
                changed = [
                    task_id
                    for task_id, status in current.items()
                    if task_id not in self.told or self.told[task_id].status != status
                ]
                if changed:
                    snapshots = await shared_snapshots(changed)
                    for task_id in changed:
                        if task_id in snapshots:
                            await self._tell(snapshots[task_id])
            for task_id in list(self.subscriptions):
                await self._tell_lines(task_id)

    # --- to the client ------------------------------------------------------
    async def _tell(self, snapshot: dict[str, Any], *, kind: str | None = None) -> None:
        if kind not in _TASK_EVENTS:
            kind = "task_complete" if snapshot["status"] in FINAL_STATES else "task_update"
        self.told[snapshot["id"]] = Told(snapshot["status"], _fingerprint(snapshot))
        self.told.move_to_end(snapshot["id"])
        while len(self.told) > MAX_REMEMBERED:
            self.told.popitem(last=False)
        await self._send({"type": kind, "task": snapshot, "timestamp": api_time(timezone.now())})

    async def _tell_lines(self, task_id: str) -> None:
        while task_id in self.lines_told:
            lines = await database_sync_to_async(_lines_after)(task_id, self.lines_told[task_id])
            if lines:
                self.lines_told[task_id] = lines[-1]["id"]
                await self._send({"type": "task_log", "task_id": task_id, "lines": lines})
            if len(lines) < CATCH_UP_CHUNK:
                return

    def _wants(self, event: dict) -> bool:
        if not isinstance(event.get("task_id"), str):
            return False
        if self.subscriptions:
            return event["task_id"] in self.subscriptions
        # Defence in depth: the groups already keep other users' tasks away.
        return self.actor.is_admin or event.get("owner_id") == self.actor.user.pk

    async def _send(self, payload: dict) -> None:
        if self.key_refused:
            return  # closed for its key: told nothing more
        await self.send(text_data=json.dumps(payload))

    async def _close_revoked(self, reason: str) -> None:
        """The key is no longer usable: nothing more is told, and the client learns why (4401)."""
        if self.key_refused:
            return
        self.key_refused = True
        await self.close(code=CLOSE_UNAUTHENTICATED, reason=reason)

    async def _error(self, message: str, *, code: str = "BAD_REQUEST", **extra: Any) -> None:
        await self._send({"type": "error", "error": message, "code": code, **extra})


def _task_id(raw: Any) -> uuid.UUID | None:
    if not isinstance(raw, str):
        return None
    try:
        return uuid.UUID(raw)
    except ValueError:
        return None
