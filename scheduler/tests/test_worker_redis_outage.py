"""A worker connecting while Redis is out of reach is welcomed, and is sent work once Redis is back."""

import asyncio
import uuid

import pytest
import redis
from channels.layers import channel_layers, get_channel_layer
from django.conf import settings

from fetchml import events
from fetchml.testing import TcpGate
from scheduler.models import Worker
from scheduler.tests.ws import receive, run, start_worker

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("thread_connections"),
    pytest.mark.skipif(not settings.REDIS_URL, reason="needs Redis: set REDIS_URL=redis://... (CI always does)"),
]


@pytest.fixture
def redis_behind_a_gate(settings):
    """The channel layer reaching Redis through a gate the test opens and shuts."""
    gate = TcpGate(settings.REDIS_URL)
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "fetchml.channel_layer.RedisChannelLayer",
            "CONFIG": {"hosts": [gate.url], "prefix": f"test-{uuid.uuid4().hex}"},
        }
    }
    channel_layers.backends.clear()
    yield gate
    channel_layers.backends.clear()


def _is_member(group_key: str, channel: str) -> bool:
    with redis.Redis.from_url(settings.REDIS_URL) as admin:
        return admin.zscore(group_key, channel) is not None


async def _until_member(group_key: str, channel: str) -> None:
    while not await asyncio.to_thread(_is_member, group_key, channel):
        await asyncio.sleep(0.01)  # the consumer's receive, trying again, joins it


def test_a_worker_connecting_while_redis_is_away_is_welcomed_and_told_once_redis_is_back(
    worker_key, redis_behind_a_gate
):
    gate = redis_behind_a_gate

    async def scenario() -> dict:
        # Shut from the start: the worker's joins cannot be made.
        communicator, welcome = await start_worker(worker_key)
        await gate.open()
        layer = get_channel_layer()
        group = events.worker_group(welcome["worker_id"])
        channel = (await Worker.objects.aget(id=welcome["worker_id"])).channel_name
        await asyncio.wait_for(_until_member(layer._group_key(group), channel), timeout=15)
        await layer.group_send(group, {"type": "worker.drain"})
        told = await receive(communicator)
        await communicator.disconnect()
        await layer.flush()
        await layer.close_pools()
        await gate.shut()
        return told

    assert run(scenario())["type"] == "drain"
