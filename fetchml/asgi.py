"""ASGI entry point: HTTP (Django), WebSockets for clients (/ws) and workers (/ws/worker)."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "fetchml.settings")
# Build the Django app before importing consumers, so the app registry is ready.
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from fetchml import daphne_fixes  # noqa: E402
from fetchml.routing import websocket_urlpatterns  # noqa: E402

daphne_fixes.install()

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": URLRouter(websocket_urlpatterns),
    }
)
