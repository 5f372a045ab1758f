"""What the project's WebSocket consumers share."""

import logging
from typing import Any

import django.db
from channels.consumer import get_handler_name
from channels.generic.websocket import AsyncWebsocketConsumer

# The agent knows these codes too (a wrong --server, an outage): its protocol module, which imports no
# Django, owns them.
from scheduler.agent.protocol import CLOSE_NOT_FOUND, CLOSE_UNAVAILABLE

logger = logging.getLogger("fetchml.ws")


class SocketConsumer(AsyncWebsocketConsumer):
    """A WebSocket consumer whose database work all runs through `database_sync_to_async`
    or `fetchml.dbpool.in_pool`.

    Channels closes stale database connections before every message it
    dispatches, a hand-off to the one thread-sensitive thread of the process
    that every frame and channel message of every connection waits for. Here
    the threads that run the queries do that housekeeping themselves, so
    messages go straight to their handler.
    """

    async def dispatch(self, message: dict[str, Any]) -> None:
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    async def refuse(self, code: int, reason: str) -> None:
        """Turn the connection away with `code` and `reason`.

        A close before the accept reaches the client as a bare HTTP 403 (daphne
        answers the handshake so), without the code: the connection is accepted
        first, then closed.
        """
        await self.accept()
        await self.close(code=code, reason=reason)

    async def refuse_unavailable(self, error: django.db.Error) -> None:
        """The database is out of reach while the connection is being opened: turned away with
        4503 (try again later) and one line in the log, not a server error with a traceback for
        every attempt of every client retrying through the outage."""
        said = str(error).strip().splitlines()
        logger.warning(
            "refused a WebSocket to %s: the database is out of reach (%s)",
            self.scope.get("path", "")[:200],
            said[0][:300] if said else type(error).__name__,
        )
        await self.refuse(CLOSE_UNAVAILABLE, "the server cannot reach its database; try again shortly")


class UnknownPathConsumer(SocketConsumer):
    """Every WebSocket path no route names: refused with 4404, where the router would raise."""

    async def connect(self) -> None:
        logger.info("refused a WebSocket to %r: no endpoint there", self.scope.get("path", "")[:200])
        await self.refuse(CLOSE_NOT_FOUND, "no WebSocket endpoint at this path")
