"""ASGI entry point: HTTP (Django), WebSockets for clients (/ws) and workers (/ws/worker)."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "fetchml.settings")
# Build the Django app before importing consumers, so the app registry is ready.
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.db import connection  # noqa: E402

from fetchml import daphne_fixes, dbwatch  # noqa: E402
from fetchml.conf import app_settings  # noqa: E402
from fetchml.routing import websocket_urlpatterns  # noqa: E402

daphne_fixes.install()
if connection.vendor == "postgresql":
    dbwatch.watch(app_settings.DB_ANSWER_TIMEOUT_SECONDS)

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": URLRouter(websocket_urlpatterns),
    }
)
