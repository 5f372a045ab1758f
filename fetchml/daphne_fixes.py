"""Gaps in what daphne 4 puts on the wire, filled when the ASGI application loads (and, in
`fetchml.daphne_bodies`, request bodies held to their ceiling and key before Twisted spools them).

- Status lines: ASGI carries only a status code and daphne takes the reason
  phrase from Twisted's table, which lacks some codes FetchML answers with (422,
  429): they went out as "HTTP/1.1 429 Unknown Status". The standard library's
  table fills the gaps.
- Close reasons: Channels' `close(code=..., reason=...)` puts the reason in the
  ASGI `websocket.close` message, but daphne sends only the code
  (django/daphne#374), so an agent refused with 4409 could not say why. Its
  WebSocket protocol is made to send the reason with the code, as autobahn (on
  which daphne is built) allows; every other reply keeps daphne's own handling.
- Over-long lines: a request line or a header line longer than Twisted's limit
  (16 KiB) had the connection dropped with no answer at all, which a client
  reports as a network error. It is answered 414 (the request line) or 431 (a
  header) in the one error format, then closed.
- Requests refused before the application sees them (a malformed
  Content-Length or request line, a raw non-ASCII byte in the path or query,
  an invalid header) and daphne's own 500 and 503 were answered with a bare
  status line or an HTML page: they get the one error format, with a trace id.

Installed from `fetchml.asgi`, so only serving processes import Twisted.
"""

import json
import logging
from http import HTTPStatus
from typing import Any

from fetchml.errors import code_for_status, error_body
from fetchml.tracing import new_trace_id, reset_trace_id, set_trace_id

logger = logging.getLogger("fetchml.http")


def install() -> None:
    from fetchml import daphne_bodies

    _complete_reason_phrases()
    _send_close_reasons()
    _answer_overlong_lines()
    _answer_refusals_in_the_error_format()
    daphne_bodies.install()


def _complete_reason_phrases() -> None:
    from twisted.web import http as twisted_http

    for status in HTTPStatus:
        twisted_http.RESPONSES.setdefault(status.value, status.phrase.encode("ascii"))


def _send_close_reasons() -> None:
    from daphne.ws_protocol import WebSocketProtocol

    original = WebSocketProtocol.handle_reply
    if getattr(original, "sends_close_reasons", False):
        return

    def handle_reply(self: Any, message: dict[str, Any]) -> None:
        if message.get("type") == "websocket.close" and message.get("reason") and self.state != self.STATE_CONNECTING:
            self.sendClose(code=message.get("code") or 1000, reason=str(message["reason"]))
            return
        original(self, message)

    handle_reply.sends_close_reasons = True  # type: ignore[attr-defined]
    WebSocketProtocol.handle_reply = handle_reply


def overlong_line_answer(*, request_line: bool) -> bytes:
    """The whole HTTP response to a line over Twisted's limit, in the one error format."""
    status = HTTPStatus.REQUEST_URI_TOO_LONG if request_line else HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE
    what = "The request line" if request_line else "A header line"
    return refusal_answer(status, f"{what} is longer than 16384 bytes")


def _error_content(status: HTTPStatus, message: str) -> tuple[str, bytes]:
    """A fresh trace id and the error body naming it, logged as answered."""
    trace_id = new_trace_id()
    token = set_trace_id(trace_id)
    try:
        body = error_body(message, code_for_status(status))
        logger.warning("answered %d: %s", status, message[:1].lower() + message[1:])
    finally:
        reset_trace_id(token)
    return trace_id, json.dumps(body, separators=(",", ":")).encode()


def refusal_answer(status: HTTPStatus, message: str, *, headers: dict[str, str] | None = None) -> bytes:
    """The whole HTTP response to a request refused before it reached the application, in the
    one error format (with `headers` besides); the connection is closed after it."""
    trace_id, content = _error_content(status, message)
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    head = (
        f"HTTP/1.1 {status.value} {status.phrase}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(content)}\r\nX-Request-ID: {trace_id}\r\n{extra}Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + content


def _answer_overlong_lines() -> None:
    from twisted.web.http import HTTPChannel

    if getattr(HTTPChannel.lineLengthExceeded, "answers", False):
        return

    def lineLengthExceeded(self: Any, line: bytes) -> None:
        # Twisted's own flag: set while the next line to come is a request line.
        request_line = bool(getattr(self, "_HTTPChannel__first_line", 0))
        self.transport.write(overlong_line_answer(request_line=request_line))
        self.transport.loseConnection()

    lineLengthExceeded.answers = True  # type: ignore[attr-defined]
    HTTPChannel.lineLengthExceeded = lineLengthExceeded


def _answer_refusals_in_the_error_format() -> None:
    from daphne.http_protocol import WebRequest
    from twisted.web.http import HTTPChannel

    if getattr(WebRequest.basic_error, "answers", False):
        return

    def _respondToBadRequestAndDisconnect(self: Any) -> None:
        # Twisted could not read the request (its line, a header, a Content-Length).
        self.transport.write(refusal_answer(HTTPStatus.BAD_REQUEST, "The request is malformed"))
        self.loseConnection()

    def basic_error(self: Any, status: int, status_text: bytes, body: str) -> None:
        # daphne's own refusals (a path, query or header it cannot pass on) and its 500 and 503.
        trace_id, content = _error_content(HTTPStatus(status), f"{body.rstrip('.')}")
        headers = [
            (b"Content-Type", b"application/json"),
            (b"Content-Length", str(len(content)).encode("ascii")),
            (b"X-Request-ID", trace_id.encode("ascii")),
        ]
        self.handle_reply({"type": "http.response.start", "status": status, "headers": headers})
        self.handle_reply({"type": "http.response.body", "body": content})

    basic_error.answers = True  # type: ignore[attr-defined]
    HTTPChannel._respondToBadRequestAndDisconnect = _respondToBadRequestAndDisconnect
    WebRequest.basic_error = basic_error
