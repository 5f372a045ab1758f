"""Server-sent event streams fed by channel-layer groups, and the auth of streaming views.

A stream is an async iterator of bytes for a `StreamingHttpResponse`:
`event_stream(source, groups=[...])` gives a fresh channel, joins the groups
BEFORE the source reads anything from the database (so nothing published in
between is lost), then passes each group message to the source and writes a
`: heartbeat` comment every few seconds, letting the source re-check the
database at each beat (the channel layer may drop messages; the database is
the record). When the source is finished, or the client goes away (the ASGI
handler cancels the response task, which raises CancelledError into the
iterator), the pending layer read is cancelled and awaited and the group
memberships are discarded, so nothing outlives the stream. A stream given the
key it was opened with ends when that key is revoked (its group `api_key.<id>`
is told) or found unusable at a heartbeat (expired, its user deactivated).

Streaming views are plain async Django views (a DRF view is sync and would
hold a worker thread for the whole stream); `authenticate_stream` applies the
API's rules to them: X-API-Key only, worker keys refused, one request counted
against the key's rate limit, errors in the standard format. They are wrapped
in `fetchml.decorators.safe_methods_only`, whose answer to a HEAD drops the
stream before it starts.
"""

import asyncio
import json
import logging
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.core.serializers.json import DjangoJSONEncoder
from django.http import HttpRequest, HttpResponseBase, StreamingHttpResponse
from rest_framework import exceptions as drf_exceptions

from fetchml import events
from fetchml.aio import cancel_and_wait
from fetchml.auth import HEADER, Actor, authenticate_raw_key, client_ip, key_usable
from fetchml.conf import app_settings
from fetchml.errors import ApplicationError, Forbidden, RateLimited, error_body
from fetchml.jsonbody import CompactJsonResponse
from fetchml.live_layer import LIVE_LAYER
from fetchml.live_limits import LiveConnection, TooManyLiveConnections, live_connections
from fetchml.ratelimits import consume_request

logger = logging.getLogger("fetchml.sse")

HEARTBEAT = b": heartbeat\n\n"
# A zero interval would spin; the setting parser only guarantees >= 0.
MIN_HEARTBEAT_SECONDS = 0.05


class EventSource(Protocol):
    """What one stream says. Each hook is an async generator of frames (`sse_frame(...)`)."""

    @property
    def finished(self) -> bool:
        """True once the stream has said everything; checked after each hook."""
        ...

    def start(self) -> AsyncIterator[bytes]:
        """The initial frames, read after the groups were joined."""
        ...

    def on_message(self, message: dict[str, Any]) -> AsyncIterator[bytes]:
        """Frames for one channel-layer message of the joined groups."""
        ...

    def on_heartbeat(self) -> AsyncIterator[bytes]:
        """Frames after each heartbeat: catch up from the database on anything missed."""
        ...


def sse_frame(data: Any, *, event: str | None = None, event_id: str | int | None = None) -> bytes:
    """One SSE event: optional `id:` and `event:` lines, then the data as one JSON `data:` line."""
    lines = []
    if event_id is not None:
        lines.append(f"id: {event_id}")
    if event:
        lines.append(f"event: {event}")
    # Compact JSON never contains a raw newline, so one data line is enough.
    lines.append("data: " + json.dumps(data, cls=DjangoJSONEncoder, separators=(",", ":")))
    return ("\n".join(lines) + "\n\n").encode()


def stream_response(source: EventSource, *, groups: list[str], actor: Actor) -> HttpResponseBase:
    """The SSE response of `source` for `actor`, counted among its key's live connections (a 429
    past the limit, `fetchml.live_limits`) and ended when its key is revoked or found unusable."""
    try:
        counted = live_connections.open(actor.api_key_id)
    except TooManyLiveConnections as exc:
        return error_response_for(exc)
    stream = event_stream(source, groups=groups, api_key_id=actor.api_key_id, counted=counted)
    response = sse_response(stream, on_close=counted.release)
    # The stream gives its place back when it ends, a stream never started (a HEAD) when the
    # handler closes its response; and one the handler never closed (its client gone before
    # the first frame) when that response is dropped.
    weakref.finalize(response, counted.release)
    return response


async def event_stream(
    source: EventSource,
    *,
    groups: list[str],
    api_key_id: str | None = None,
    heartbeat_seconds: float | None = None,
    counted: LiveConnection | None = None,
) -> AsyncIterator[bytes]:
    """Frames of `source`, driven by the messages of `groups`, with heartbeats; cleans up always.

    With `api_key_id` (the key the stream was opened with) the stream ends when that key is
    revoked, or is found unusable (expired, its user deactivated) at a heartbeat. `counted`,
    its place among its key's live connections, is released when it ends."""
    layer = get_channel_layer(LIVE_LAYER)
    interval = max(heartbeat_seconds or app_settings.SSE_HEARTBEAT_SECONDS, MIN_HEARTBEAT_SECONDS)
    channel = await layer.new_channel()
    joined: list[str] = []
    receiving: asyncio.Task | None = None
    if api_key_id is not None:
        groups = [*groups, events.api_key_group(api_key_id)]
    try:
        for group in groups:
            await layer.group_add(group, channel)
            joined.append(group)
        async for frame in source.start():
            yield frame
        loop = asyncio.get_running_loop()
        next_beat = loop.time() + interval
        while not source.finished:
            # One receive outlives heartbeats: cancelling a layer read part-way
            # can lose its message (and on Redis surfaces as a read timeout).
            if receiving is None:
                receiving = asyncio.ensure_future(layer.receive(channel))
            done, _ = await asyncio.wait({receiving}, timeout=max(next_beat - loop.time(), 0))
            if not done:
                next_beat = loop.time() + interval
                if api_key_id is not None and not await key_usable(api_key_id):
                    return
                yield HEARTBEAT
                async for frame in source.on_heartbeat():
                    yield frame
                continue
            message, receiving = receiving.result(), None
            if message.get("type") == events.API_KEY_REVOKED:
                return
            async for frame in source.on_message(message):
                yield frame
    finally:
        if counted is not None:
            counted.release()
        await _stop_receiving(receiving)
        await _leave(layer, channel, joined)


async def _stop_receiving(receiving: asyncio.Task | None) -> None:
    """Cancel an outstanding layer read and wait for it, so no task outlives the stream."""
    if receiving is None:
        return
    done = await cancel_and_wait(receiving)
    if done and not receiving.cancelled() and receiving.exception() is not None:
        # Typically the Redis read noticing its own cancellation; nothing is lost by it.
        logger.debug("channel-layer read ended with %r as the stream closed", receiving.exception())


async def _leave(layer: Any, channel: str, groups: list[str]) -> None:
    for group in groups:
        try:
            await layer.group_discard(group, channel)
        except Exception:
            # Redis gone: its group entries expire on their own (group_expiry).
            logger.warning("could not leave group %s", group, exc_info=True)


class EventStreamResponse(StreamingHttpResponse):
    """A streaming response that runs `on_close` when the handler closes it, as it closes every
    response it answered with, streamed or not."""

    def __init__(self, stream: AsyncIterator[bytes], *, on_close: Callable[[], None] | None = None) -> None:
        super().__init__(stream, content_type="text/event-stream")
        self._on_close = on_close

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self._on_close is not None:
                self._on_close()


def sse_response(stream: AsyncIterator[bytes], *, on_close: Callable[[], None] | None = None) -> StreamingHttpResponse:
    response = EventStreamResponse(stream, on_close=on_close)
    response["Cache-Control"] = "no-cache"
    # Reverse proxies (nginx) must pass each frame on at once, not buffer them.
    response["X-Accel-Buffering"] = "no"
    return response


class Unauthenticated(ApplicationError):
    status_code = 401
    code = "UNAUTHORIZED"
    default_message = "Invalid or missing API key"


def error_response_for(exc: ApplicationError) -> CompactJsonResponse:
    """The standard error body for a plain (non-DRF) view."""
    response = CompactJsonResponse(error_body(exc.message, exc.code, exc.details), status=exc.status_code)
    if isinstance(exc, RateLimited) and exc.retry_after is not None:
        response["Retry-After"] = str(exc.retry_after)
    return response


def _authenticate(request: HttpRequest) -> Actor:
    raw = request.META.get(HEADER)
    if not raw:
        # As in the DRF API: a missing key is simply unauthenticated (no failure counted).
        raise Unauthenticated()
    ip = client_ip(request.META)
    try:
        key = authenticate_raw_key(raw, ip)
    except drf_exceptions.Throttled as exc:
        # The failed-authentication limit says what it is (fetchml.auth.TooManyFailedAuthentications).
        message = getattr(exc, "message", None)
        raise RateLimited(message, retry_after=int(exc.wait) + 1 if exc.wait is not None else None) from exc
    except drf_exceptions.AuthenticationFailed as exc:
        raise Unauthenticated() from exc
    actor = Actor(user=key.user, role=key.role, api_key_id=str(key.id), ip_address=ip)
    if actor.is_worker:
        raise Forbidden()
    usage = consume_request(f"key:{key.id}", request.method or "GET")
    # ApiErrorMiddleware puts X-RateLimit-* (and Retry-After when limited) on the
    # response from this, as for DRF views.
    request.fetchml_ratelimit = usage  # type: ignore[attr-defined]
    if usage is not None and usage.limited:
        raise RateLimited()
    return actor


async def authenticate_stream(request: HttpRequest) -> Actor:
    """The acting user of a streaming request, or Unauthenticated/Forbidden/RateLimited."""
    return await sync_to_async(_authenticate)(request)
