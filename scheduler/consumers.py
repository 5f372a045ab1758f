"""`/ws/worker`: the worker agents' WebSocket (protocol in docs/worker-protocol.md).

Thin: parse and validate a frame (one message, or a `batch` of them), call one
service in a database thread (for run reports, one call for all that piled up),
answer (several answers in one `batch` frame to an agent that accepts them).
Nothing a worker sends can crash the consumer: a bad message gets an `error`,
an unexpected failure is logged and answered with an `error` too.
"""

import asyncio
import json
import logging
import time
from collections import deque
from typing import Any
from urllib.parse import parse_qs

import django.db
from channels.db import database_sync_to_async
from django.utils.dateparse import parse_datetime
from rest_framework.exceptions import AuthenticationFailed, Throttled

from fetchml import events
from fetchml.aio import cancel_and_wait
from fetchml.auth import api_key_usable, authenticate_raw_key
from fetchml.channel_layer import join_group
from fetchml.conf import app_settings
from fetchml.consumers import SocketConsumer
from fetchml.dbpool import in_pool
from fetchml.errors import ApplicationError
from fetchml.models import ApiKey
from fetchml.sealing import Unsealable
from jupyter import services as jupyter_services
from plugins.services import WORKERS_GROUP, plugin_status_report
from scheduler import selectors, services
from scheduler.agent.protocol import (
    BATCH,
    CLOSE_BAD_HELLO,
    CLOSE_BAD_KEY,
    CLOSE_NAME_IN_USE,
    CLOSE_NAME_OWNED,
    CLOSE_NOT_WORKER,
    CLOSE_RECONNECT,
    FEATURES,
    LEASE_SHARE_TO_RECONNECT,
    LOG_ACK,
    frames,
    frames_of_encoded,
)
from scheduler.assigns import assign_messages
from scheduler.protocol import FINAL_RUN_STATES, BadMessage, error_message, outgoing, parse_frame

logger = logging.getLogger("fetchml.scheduler.ws")

RUN_REPORTS = frozenset({"ack", "status", "log"})
MAX_REPORTS_PER_BATCH = 500
# An agent sends a run's reports a moment apart (an `ack` and the `status` after it): a connection with
# nothing else to apply waits this long for the rest before applying a lone report, so they share one
# transaction instead of taking the worker's row and the audit head (which a dispatch round needs) once each.
REPORT_GATHER_SECONDS = 0.002
# Within daphne's application_close_timeout (10 s), past which it kills the consumer mid-disconnect:
# the connection would then never be forgotten, and a backlog left running would keep its lease.
DISCONNECT_DRAIN_SECONDS = 5.0
_KEY_PARAMS = {"api_key", "apikey", "key", "x-api-key", "token"}


class WorkerConsumer(SocketConsumer):
    """Messages after `hello` are handled in arrival order by one background task, so
    the socket keeps being read meanwhile; consecutive run reports (`ack`, `status`,
    `log`) that piled up are applied together in one transaction (a lone one waits
    `REPORT_GATHER_SECONDS` for those sent with it)."""

    worker_id: Any = None
    api_key: ApiKey | None = None
    sends_batches = False  # the agent listed "batch" in its hello
    acks_logs = False  # the agent listed "log_ack": it holds each counted `log` until acknowledged
    key_refused = False  # the key was found revoked or expired: the connection is closing

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._inbox: deque[dict[str, Any]] = deque()
        self._handling: asyncio.Task | None = None
        self._lease_extended_at = time.monotonic()  # by the hello, then by heartbeats and reports stored

    # --- connection ------------------------------------------------------------

    async def connect(self) -> None:
        query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
        if _KEY_PARAMS & {name.lower() for name in query}:
            await self.refuse(CLOSE_BAD_KEY, "API keys are accepted in the X-API-Key header only")
            return
        headers = dict(self.scope.get("headers", []))
        raw = headers.get(b"x-api-key", b"").decode("latin-1") or None
        client = self.scope.get("client") or [None]
        try:
            key = await database_sync_to_async(authenticate_raw_key)(raw, client[0])
        except (AuthenticationFailed, Throttled):
            await self.refuse(CLOSE_BAD_KEY, "invalid or missing API key")
            return
        except django.db.Error as exc:
            await self.refuse_unavailable(exc)
            return
        if key.role != ApiKey.Role.WORKER:
            await self.refuse(CLOSE_NOT_WORKER, "the API key does not have the worker role")
            return
        self.api_key = key
        # Told when the key is revoked; a revocation between the check above and this join is
        # caught by the key's re-check at the first heartbeat.
        await join_group(self.channel_layer, events.api_key_group(key.id), self.channel_name)
        await self.accept()

    async def disconnect(self, code: int) -> None:
        if self._handling is not None:
            # What the worker reported before it went is applied, not dropped, but its heartbeats are
            # not: they would extend the lease of a worker no longer there. Bounded, so neither a
            # stuck database nor a backlog holds the disconnect; what is left then is dropped (the
            # agent sends final reports and unacknowledged lines again to its next connection).
            queued = len(self._inbox)
            self._inbox = deque(message for message in self._inbox if message["type"] != "heartbeat")
            if len(self._inbox) < queued:
                logger.info(
                    "worker %s: %d heartbeat(s) not applied: it has gone", self.worker_id, queued - len(self._inbox)
                )
            try:
                await asyncio.wait_for(asyncio.shield(self._handling), timeout=DISCONNECT_DRAIN_SECONDS)
            except TimeoutError:
                logger.warning(
                    "worker %s: %d message(s) not applied by its disconnect; dropped", self.worker_id, len(self._inbox)
                )
                self._inbox.clear()
                await cancel_and_wait(self._handling)
        if self.api_key is not None:
            await self.channel_layer.group_discard(events.api_key_group(self.api_key.id), self.channel_name)
        if self.worker_id is not None:
            await self.channel_layer.group_discard(events.worker_group(self.worker_id), self.channel_name)
            await self.channel_layer.group_discard(WORKERS_GROUP, self.channel_name)
            try:
                await database_sync_to_async(services.worker_disconnected)(
                    worker_id=self.worker_id, channel_name=self.channel_name
                )
            except django.db.Error as exc:
                # Its next hello (here or on another copy) replaces the connection; else the lease decides.
                logger.warning("worker %s: its disconnect could not be recorded: %s", self.worker_id, exc)
            logger.info("worker %s disconnected (code %s)", self.worker_id, code)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.api_key is None or self.key_refused:
            return  # refused in connect(), or the key since; the close is under way
        try:
            messages = parse_frame(text_data)
        except Exception:  # a hole in the validation must not end the connection
            logger.exception("worker %s: reading a frame failed", self.worker_id or "(no hello yet)")
            await self._server_error("frame")
            return
        for message in messages:
            if isinstance(message, BadMessage):
                logger.info("worker %s sent a bad message: %s", self.worker_id or "(no hello yet)", message)
                await self.send_json(error_message(message))
                if self.worker_id is None:
                    await self.close(code=CLOSE_BAD_HELLO, reason="the first message must be a valid hello")
                    return
                continue
            kind = message["type"]
            if self.worker_id is None and kind != "hello":
                await self.send_json(error_message(BadMessage("the first message must be hello", ref_type=kind)))
                await self.close(code=CLOSE_BAD_HELLO, reason="the first message must be a valid hello")
                return
            if kind == "hello":
                await self._guarded(kind, self._hello(message))
            else:
                self._inbox.append(message)
        if self._inbox and (self._handling is None or self._handling.done()):
            self._handling = asyncio.ensure_future(self._handle_inbox())

    async def _handle_inbox(self) -> None:
        while self._inbox:
            if self._inbox[0]["type"] in RUN_REPORTS:
                if len(self._inbox) == 1:
                    await asyncio.sleep(REPORT_GATHER_SECONDS)
                batch = []
                while self._inbox and self._inbox[0]["type"] in RUN_REPORTS and len(batch) < MAX_REPORTS_PER_BATCH:
                    batch.append(self._inbox.popleft())
                await self._guarded(batch[0]["type"], self._on_run_reports(batch))
            else:
                message = self._inbox.popleft()
                await self._guarded(message["type"], getattr(self, f"_on_{message['type']}")(message))

    async def _guarded(self, kind: str, handling: Any) -> None:
        try:
            await handling
        except django.db.Error as exc:
            # The database out of reach: every message of every worker fails alike until it is back.
            logger.warning("worker %s: handling %s failed: database unavailable (%s)", self.worker_id, kind, exc)
            await self._server_error(kind)
        except Exception:
            logger.exception("worker %s: handling %s failed", self.worker_id, kind)
            await self._server_error(kind)

    async def _server_error(self, kind: str) -> None:
        await self.send_json(_server_error(kind))

    async def send_json(self, message: dict[str, Any]) -> None:
        await self._send_text(json.dumps(message), message.get("type"))

    async def send_messages(self, messages: list[dict[str, Any]]) -> None:
        """Several messages: in `batch` frames to an agent that accepts them, else one frame each."""
        first = 0
        for text, count in frames(messages, batches=self.sends_batches):
            await self._send_text(text, BATCH if count > 1 else messages[first]["type"])
            first += count

    async def _send_encoded(self, listed: str, count: int, kind: str) -> None:
        """`send_messages` for `count` messages of one `kind` given as the JSON text of their list."""
        for text, carried in frames_of_encoded(listed, count, batches=self.sends_batches):
            await self._send_text(text, BATCH if carried > 1 else kind)

    async def _send_text(self, text: str, kind: str | None) -> None:
        try:
            await self.send(text_data=text)
        except Exception as exc:
            # The socket closed under us (daphne raises on a send after close).
            # Nothing is lost: the database holds the run's state, and the agent
            # re-learns it on reconnect (hello, re-sent assigns, stale tokens).
            logger.info("worker %s: could not send %s: %s", self.worker_id, kind, exc)

    # --- worker -> server --------------------------------------------------------

    async def _hello(self, message: dict[str, Any]) -> None:
        if self.worker_id is not None:
            await self.send_json(error_message(BadMessage("hello was already received", ref_type="hello")))
            return
        welcome = await database_sync_to_async(services.worker_hello)(
            name=message["name"],
            api_key_id=self.api_key.id,
            agent_version=message["agent_version"],
            hostname=message["hostname"] or (self.scope.get("client") or [""])[0] or "",
            capabilities=message["capabilities"],
            channel_name=self.channel_name,
            running=message["running"],
            instance=message["instance"],
        )
        if welcome.owned_elsewhere:
            logger.warning(
                "worker name %r refused to key %s: registered to another account", message["name"], self.api_key.prefix
            )
            await self.close(code=CLOSE_NAME_OWNED, reason="this worker name is registered to another account's key")
            return
        if welcome.conflict:
            await self.close(code=CLOSE_NAME_IN_USE, reason="another live connection uses this worker name")
            return
        self.worker_id = welcome.worker_id
        self._lease_extended_at = time.monotonic()
        if welcome.superseded:
            await self._retire(welcome.superseded)
        self.sends_batches = BATCH in message["features"]
        self.acks_logs = LOG_ACK in message["features"]
        # With Redis away the worker still gets its welcome and keeps its lease; it is sent work once Redis is back.
        await join_group(self.channel_layer, events.worker_group(self.worker_id), self.channel_name)
        await join_group(self.channel_layer, WORKERS_GROUP, self.channel_name)  # plugin configuration changes
        await self.send_json(
            outgoing(
                "welcome",
                worker_id=str(self.worker_id),
                heartbeat_seconds=app_settings.WORKER_HEARTBEAT_SECONDS,
                lease_seconds=app_settings.WORKER_LEASE_SECONDS,
                reconcile={"keep": welcome.keep, "kill": welcome.kill},
                features=list(FEATURES),
            )
        )
        logger.info("worker %s (%s) connected", message["name"], self.worker_id)
        # Work that waited for this connection: unacknowledged assignments (a draining agent's go
        # back to the queue once it says `draining`: none of them is started), pending cancels.
        if welcome.draining:
            await self.send_json(outgoing("drain"))
        else:
            unacked = await database_sync_to_async(selectors.unacked_assignment_ids)(worker_id=self.worker_id)
            if unacked:
                await self._send_assigns(unacked)
        await self._send_pending_cancels()

    async def _retire(self, old_channel: str) -> None:
        """The replaced connection gets nothing more for this worker, and is closed if it still lives."""
        await self.channel_layer.group_discard(events.worker_group(self.worker_id), old_channel)
        await self.channel_layer.group_discard(WORKERS_GROUP, old_channel)
        await self.channel_layer.send(old_channel, {"type": "worker.superseded"})

    async def _on_run_reports(self, reports: list[dict[str, Any]]) -> None:
        outcomes = await in_pool(services.apply_run_reports)(worker_id=self.worker_id, reports=reports)
        if time.monotonic() - self._lease_extended_at >= app_settings.WORKER_HEARTBEAT_SECONDS:
            # Reports are proof of life too: a heartbeat queued behind a flood of them (a run
            # printing fast, an agent without flow control) must not cost the worker its lease.
            try:
                await in_pool(services.worker_lease_extend)(worker_id=self.worker_id)
                self._lease_extended_at = time.monotonic()
            except django.db.Error as exc:  # the heartbeats' to keep then; the answers still go
                logger.warning("worker %s: its lease could not be extended: %s", self.worker_id, exc)
        answers = []
        for report, outcome in zip(reports, outcomes, strict=True):
            if outcome is None:
                answers.append(_server_error(report["type"]))
            elif outcome is False or getattr(outcome, "stale", False):
                answers.append(_stop(report, "stale token"))
            elif report["type"] == "status" and report["status"] in FINAL_RUN_STATES:
                answers.append(
                    outgoing("status_ack", task_id=report["task_id"], token=report["token"], accepted=outcome.accepted)
                )
            elif report["type"] == "log" and report["seq"] is not None and self.acks_logs:
                answers.append(outgoing("log_ack", task_id=report["task_id"], token=report["token"], seq=report["seq"]))
        await self.send_messages(answers)

    async def _on_draining(self, message: dict[str, Any]) -> None:
        handed_back = await database_sync_to_async(services.worker_announced_drain)(worker_id=self.worker_id)
        # The agent repeats `draining` with its heartbeats: only news is worth a line.
        log = logger.info if handed_back else logger.debug
        log("worker %s is draining; %d unacknowledged run(s) taken back", self.worker_id, handed_back)

    async def _on_heartbeat(self, message: dict[str, Any]) -> None:
        try:
            # The key's re-check, once a heartbeat: expiry and a deactivated user send no message,
            # and the channel layer may lose a revocation's.
            if not await in_pool(api_key_usable)(self.api_key.id):
                await self._refuse_key("API key revoked or expired")
                return
            stale = await database_sync_to_async(services.worker_heartbeat)(
                worker_id=self.worker_id, running=message["running"]
            )
        except django.db.Error:
            unstored = time.monotonic() - self._lease_extended_at
            if unstored < app_settings.WORKER_LEASE_SECONDS * LEASE_SHARE_TO_RECONNECT:
                raise
            # This process cannot keep the worker's lease (its database out of reach): the agent
            # reconnects, through the load balancer to a copy that can, before the lease runs out.
            logger.warning("worker %s: no heartbeat stored for %.1f s; told to reconnect", self.worker_id, unstored)
            await self.close(code=CLOSE_RECONNECT, reason="this server cannot store heartbeats; reconnect")
            return
        self._lease_extended_at = time.monotonic()
        await self.send_messages([_stop(run, "stale token") for run in stale])
        await self._send_pending_cancels()

    async def _on_plugin_status(self, message: dict[str, Any]) -> None:
        if not await self._is_live(message):
            return
        report = {name: message[name] for name in ("task_id", "name", "status", "url", "error")}
        await self._apply(message["type"], plugin_status_report, **report)

    async def _on_service_ready(self, message: dict[str, Any]) -> None:
        if not await self._is_live(message):
            return
        await self._apply(
            message["type"],
            jupyter_services.jupyter_ready,
            task_id=message["task_id"],
            url=message["url"],
            service_token=message["service_token"],
        )

    async def _on_service_activity(self, message: dict[str, Any]) -> None:
        if not await self._is_live(message):
            return
        try:
            when = parse_datetime(message["last_activity"])
        except ValueError:  # well-formed but impossible, e.g. month 13
            when = None
        if when is None or when.tzinfo is None:
            bad = BadMessage("field 'last_activity': an ISO 8601 time with a time zone", ref_type=message["type"])
            await self.send_json(error_message(bad))
            return
        await self._apply(
            message["type"], jupyter_services.jupyter_activity, task_id=message["task_id"], last_activity=when
        )

    async def _is_live(self, message: dict[str, Any]) -> bool:
        """Fencing for reports about a run: a token the server took away gets `stop`."""
        live = await database_sync_to_async(services.assignment_is_live)(
            worker_id=self.worker_id, task_id=message["task_id"], token=message["token"]
        )
        if not live:
            await self._stop(message, "stale token")
        return live

    async def _apply(self, kind: str, service: Any, **fields: Any) -> None:
        """Call a service that may refuse the report (422/404/409): the refusal goes back as an `error`."""
        try:
            await database_sync_to_async(service)(**fields)
        except ApplicationError as exc:
            logger.info("worker %s: %s refused: %s", self.worker_id, kind, exc)
            await self.send_json(error_message(BadMessage(str(exc), ref_type=kind)))

    async def _stop(self, run: dict[str, Any], reason: str) -> None:
        await self.send_json(_stop(run, reason))

    async def _send_assigns(self, assignment_ids: list[Any]) -> None:
        try:
            messages = await in_pool(assign_messages)(assignment_ids=assignment_ids, worker_id=self.worker_id)
        except Exception:
            # Logged, not raised: the loop re-sends unacknowledged assignments.
            logger.exception("worker %s: could not build assigns %s", self.worker_id, assignment_ids)
            return
        await self.send_messages(messages)

    async def _send_pending_cancels(self) -> None:
        await self.send_messages(await database_sync_to_async(selectors.cancel_messages)(worker_id=self.worker_id))

    # --- channel layer -> worker ---------------------------------------------------

    async def worker_assign(self, event: dict[str, Any]) -> None:
        # Built by the scheduler (a dispatch round, a re-send): relayed as they are.
        try:
            listed, count = events.encoded_assigns_of(event)
        except Unsealable:
            # Sealed under another SECRET_KEY: re-sends would fail alike; on reconnect the
            # worker gets its unacknowledged assignments from the database (`hello`).
            logger.error(
                "worker %s: an assign notice could not be unsealed (is SECRET_KEY the same everywhere?)", self.worker_id
            )
            return
        await self._send_encoded(listed, count, "assign")

    async def worker_cancel(self, event: dict[str, Any]) -> None:
        await self.send_json(outgoing("cancel", task_id=event["task_id"], token=event["token"], reason=event["reason"]))

    async def worker_stop(self, event: dict[str, Any]) -> None:
        await self._stop(event, event.get("reason", "stopped by the server"))

    async def worker_drain(self, event: dict[str, Any]) -> None:
        await self.send_json(outgoing("drain"))

    async def worker_plugins(self, event: dict[str, Any]) -> None:
        # Names, modes and images only: settings (secrets) travel in each task's assign.
        await self.send_json(
            outgoing("config", plugins=event["plugins"], restart_required=event.get("restart_required", False))
        )

    async def worker_disconnect(self, event: dict[str, Any]) -> None:
        # The lease expired while connected: reconnecting makes the agent reconcile.
        await self.close(code=CLOSE_RECONNECT, reason="lease expired; reconnect")

    async def worker_superseded(self, event: dict[str, Any]) -> None:
        # The same agent said hello on a newer connection (or another agent of this name did, this
        # one's heartbeats having stopped): this one is a leftover.
        await self.close(code=CLOSE_RECONNECT, reason="replaced by a newer connection for this worker name")

    async def api_key_revoked(self, event: dict[str, Any]) -> None:
        await self._refuse_key("API key revoked")

    async def _refuse_key(self, reason: str) -> None:
        """The key is no longer usable: the worker goes offline (its runs re-queued) and the agent,
        closed with 4401, stops."""
        if self.key_refused:
            return
        self.key_refused = True
        if self.worker_id is not None:
            try:
                lost = await database_sync_to_async(services.worker_key_refused)(
                    worker_id=self.worker_id, channel_name=self.channel_name
                )
            except django.db.Error as exc:
                # Closed all the same: the worker is heard no more, so its lease decides.
                logger.warning("worker %s: could not be marked offline: %s", self.worker_id, exc)
            else:
                logger.info("worker %s: API key refused; %d run(s) back in the queue", self.worker_id, lost)
        await self.close(code=CLOSE_BAD_KEY, reason=reason)


def _server_error(kind: str) -> dict[str, Any]:
    return outgoing("error", code="SERVER_ERROR", message="the server could not apply this message", ref_type=kind)


def _stop(run: dict[str, Any], reason: str) -> dict[str, Any]:
    return outgoing("stop", task_id=run["task_id"], token=run["token"], reason=reason)
