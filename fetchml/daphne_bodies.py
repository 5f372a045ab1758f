"""Request bodies held to their ceiling, and to a usable API key, while they arrive.

Twisted reads a request's whole body before daphne hands the request to the application: up to
100 kB into memory, beyond that into a temporary file. The application's size limits and key check
came only after the bytes were on disk, so any client, without a key, could fill the server's disk.
Here, on daphne's request class:

- A body over its ceiling (`fetchml.middleware.body_ceiling`: the route's own limit for an upload
  route's streamed upload, DATA_UPLOAD_MAX_MEMORY_SIZE for every other body) is answered 413 as soon
  as its Content-Length says so, before a byte of it is read, or once a chunked body passes it.
- A body of the API (`/v1/`) Twisted would write to a file (100 kB or more, or of unknown
  length) is held in memory until the request's API key is found usable by the check every request gets
  (`fetchml.auth.authenticate_raw_key`, run off the event loop). Past HOLD_BYTES its reading is
  paused meanwhile, and an `Expect: 100-continue` is answered only once the key is accepted, so a
  refused client never sends its body. A missing or refused key is answered 401 (429 once the
  address has failed too often), and nothing reaches the disk. Outside the API (the admin and
  its login, which take sessions, not keys) a body is held to DATA_UPLOAD_MAX_MEMORY_SIZE only.

A refused request gets the one error format; the connection then stops sending, discards what
the client still sends for LINGER_SECONDS (closing at once could reset the connection before the
client read the answer), and closes.
"""

import asyncio
import io
import logging
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

from channels.db import database_sync_to_async
from rest_framework import exceptions as drf_exceptions

logger = logging.getLogger("fetchml.http")

# Twisted's own threshold (twisted.web.http._getContentFile): bodies this long or longer, and
# bodies of unknown length, are written to a temporary file.
SPOOL_THRESHOLD = 100_000
HOLD_BYTES = 1024 * 1024
API_PREFIX = b"/v1/"
LINGER_SECONDS = 2.0
_UNAUTHORIZED_HEADERS = {"WWW-Authenticate": 'ApiKey header="X-API-Key"'}


def _key_refusal(raw: str | None, ip: str | None) -> tuple[HTTPStatus, str, dict[str, str]] | None:
    """Why a request with this key may not send a large body; None when it may."""
    from fetchml.auth import authenticate_raw_key

    if not raw:
        return HTTPStatus.UNAUTHORIZED, "Invalid or missing API key", _UNAUTHORIZED_HEADERS
    try:
        authenticate_raw_key(raw, ip)
    except drf_exceptions.Throttled as exc:
        retry = {"Retry-After": str(int(exc.wait) + 1)} if exc.wait is not None else {}
        return HTTPStatus.TOO_MANY_REQUESTS, "Too many failed authentication attempts", retry
    except drf_exceptions.AuthenticationFailed:
        return HTTPStatus.UNAUTHORIZED, "Invalid or missing API key", _UNAUTHORIZED_HEADERS
    return None


_checked_key_refusal = database_sync_to_async(_key_refusal, thread_sensitive=False)


def install() -> None:
    from daphne.http_protocol import WebRequest
    from twisted.web import http as twisted_http

    if getattr(WebRequest, "holds_bodies", False):
        return
    spool_file = twisted_http._getContentFile
    process_request = WebRequest.requestReceived

    def gotLength(self: Any, length: int | None) -> None:
        from fetchml.middleware import body_ceiling

        self._body_received = 0
        self._body_refused = False
        self._key_pending = False
        self._reading_paused = False
        self._request_line: tuple | None = None
        self._continue_wanted = False
        content_type = (self.requestHeaders.getRawHeaders(b"content-type") or [b""])[0]
        # The request line, as Twisted's channel holds it until the body is read.
        method = getattr(self.channel, "_command", b"").decode("latin-1")
        target = getattr(self.channel, "_path", b"")
        api = target.startswith(API_PREFIX)
        self._body_ceiling = body_ceiling(content_type.decode("latin-1"), method=method, path=_path_of(target))
        self.content = io.BytesIO()
        if length is not None and length > self._body_ceiling:
            _refuse(self, HTTPStatus.REQUEST_ENTITY_TOO_LARGE, _too_large(self._body_ceiling))
        elif api and (length is None or length >= SPOOL_THRESHOLD):
            _hold_for_the_key(self)
        else:
            self.content = spool_file(length)

    def handleContentChunk(self: Any, data: bytes) -> None:
        if self._body_refused:
            return
        self._body_received += len(data)
        if self._body_received > self._body_ceiling:
            _refuse(self, HTTPStatus.REQUEST_ENTITY_TOO_LARGE, _too_large(self._body_ceiling))
            return
        self.content.write(data)
        if self._key_pending and not self._reading_paused and self.content.tell() > HOLD_BYTES:
            self._reading_paused = True
            self.channel.transport.pauseProducing()

    def requestReceived(self: Any, command: bytes, path: bytes, version: bytes) -> None:
        if self._body_refused:
            if self.channel is not None:
                self.channel.loseConnection()  # the whole body arrived: no need to linger
            return
        if self._key_pending:
            self._request_line = (command, path, version)
            return
        process_request(self, command, path, version)

    def _hold_for_the_key(self: Any) -> None:
        self._key_pending = True
        # Answered once the key is accepted: a client that waits for it sends nothing before.
        expect = self.requestHeaders.getRawHeaders(b"expect") or []
        self._continue_wanted = bool(expect) and expect[0].lower() == b"100-continue"
        self.requestHeaders.removeHeader(b"expect")
        raw = (self.requestHeaders.getRawHeaders(b"x-api-key") or [b""])[0].decode("latin-1")
        peer = self.channel.transport.getPeer()
        check = asyncio.ensure_future(_checked_key_refusal(raw or None, getattr(peer, "host", None)))
        check.add_done_callback(lambda done: _key_checked(self, done))

    def _key_checked(self: Any, done: asyncio.Future) -> None:
        self._key_pending = False
        if self._body_refused or self.channel is None:
            return
        if done.cancelled() or done.exception() is not None:
            error = None if done.cancelled() else done.exception()
            logger.error("could not check the API key of a large request body: %r", error)
            _refuse(self, HTTPStatus.SERVICE_UNAVAILABLE, "The API key could not be checked; try again")
            return
        if (refusal := done.result()) is not None:
            _refuse(self, *refusal)
            return
        held = self.content.getvalue()
        self.content = spool_file(None)
        self.content.write(held)
        if self._continue_wanted:
            self.channel.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if self._reading_paused:
            self._reading_paused = False
            self.channel.transport.resumeProducing()
        if self._request_line is not None:
            process_request(self, *self._request_line)

    WebRequest.gotLength = gotLength
    WebRequest.handleContentChunk = handleContentChunk
    WebRequest.requestReceived = requestReceived
    WebRequest.holds_bodies = True  # type: ignore[attr-defined]


def _path_of(target: bytes) -> str:
    """The path the application will be given for a request target, as daphne makes it: without
    the query string, percent-decoded; "" (no route's) for a target daphne itself refuses."""
    try:
        return unquote(target.split(b"?", 1)[0].decode("ascii"))
    except UnicodeDecodeError:
        return ""


def _too_large(ceiling: int) -> str:
    return f"Request body too large (limit {ceiling} bytes)"


def _refuse(request: Any, status: HTTPStatus, message: str, headers: dict[str, str] | None = None) -> None:
    """Answer `status` in the error format, stop sending, and close after LINGER_SECONDS."""
    from twisted.internet import reactor

    from fetchml.daphne_fixes import refusal_answer

    request._body_refused = True
    request.content = io.BytesIO()  # what was held is dropped
    request.requestHeaders.removeHeader(b"expect")  # no 100 Continue after the answer
    channel = request.channel
    if channel is None:
        return
    transport = channel.transport
    transport.write(refusal_answer(status, message, headers=headers))
    if request._reading_paused:
        request._reading_paused = False
        transport.resumeProducing()  # to discard, not to keep, what still comes
    transport.loseWriteConnection()
    reactor.callLater(LINGER_SECONDS, channel.loseConnection)
