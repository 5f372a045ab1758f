"""Two gaps in what daphne 4 puts on the wire, filled when the ASGI application loads.

- Status lines: ASGI carries only a status code and daphne takes the reason
  phrase from Twisted's table, which lacks some codes FetchML answers with (422,
  429): they went out as "HTTP/1.1 429 Unknown Status". The standard library's
  table fills the gaps.
- Close reasons: Channels' `close(code=..., reason=...)` puts the reason in the
  ASGI `websocket.close` message, but daphne sends only the code
  (django/daphne#374), so an agent refused with 4409 could not say why. Its
  WebSocket protocol is made to send the reason with the code, as autobahn (on
  which daphne is built) allows; every other reply keeps daphne's own handling.

Installed from `fetchml.asgi`, so only serving processes import Twisted.
"""

from http import HTTPStatus
from typing import Any


def install() -> None:
    _complete_reason_phrases()
    _send_close_reasons()


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
