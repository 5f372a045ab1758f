"""What the project's WebSocket consumers share."""

from typing import Any

from channels.consumer import get_handler_name
from channels.generic.websocket import AsyncWebsocketConsumer


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
