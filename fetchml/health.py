"""GET /health: no authentication; `degraded` when a dependency does not answer."""

import asyncio
import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import connection
from django.utils import timezone

import fetchml
from fetchml.clock import api_time
from fetchml.decorators import safe_methods_only
from fetchml.jsonbody import CompactJsonResponse

logger = logging.getLogger("fetchml.health")


def database_ok() -> bool:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
        return True
    except Exception:
        logger.warning("health: database unreachable", exc_info=True)
        return False


async def _channel_layer_roundtrip() -> None:
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.send(channel, {"type": "health.ping"})
    await asyncio.wait_for(layer.receive(channel), timeout=2)


def channel_layer_ok() -> bool:
    try:
        async_to_sync(_channel_layer_roundtrip)()
        return True
    except Exception:
        logger.warning("health: channel layer unreachable", exc_info=True)
        return False


@safe_methods_only
def health(request):
    checks = {"database": database_ok(), "channel_layer": channel_layer_ok()}
    status = "healthy" if all(checks.values()) else "degraded"
    body = {
        "status": status,
        "version": fetchml.__version__,
        "timestamp": api_time(timezone.now()),
        "checks": {name: "ok" if ok else "unreachable" for name, ok in checks.items()},
    }
    return CompactJsonResponse(body, status=200 if status == "healthy" else 503)
