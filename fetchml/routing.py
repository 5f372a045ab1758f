"""WebSocket routes. Consumers authenticate with the X-API-Key handshake header."""

from django.urls import path, re_path

from fetchml.consumers import UnknownPathConsumer
from scheduler.consumers import WorkerConsumer
from tasks.consumers import ClientConsumer

websocket_urlpatterns: list = [
    path("ws/worker", WorkerConsumer.as_asgi()),
    path("ws", ClientConsumer.as_asgi()),
    re_path(r"", UnknownPathConsumer.as_asgi()),  # last: any other path
]
