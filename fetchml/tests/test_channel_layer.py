"""The Redis channel layer as configured: an idle receive waits, it does not time out."""

import asyncio

import pytest
from channels.layers import channel_layers, get_channel_layer
from django.conf import settings

IDLE_SECONDS = 7  # longer than the layer's 5 s blocking pop, which a 5 s socket timeout cut short


@pytest.mark.skipif(not settings.REDIS_URL, reason="needs Redis: set REDIS_URL=redis://... (CI always does)")
def test_an_idle_receive_outlasts_the_layers_blocking_pop_and_then_gets_its_message():
    channel_layers.backends.clear()
    layer = get_channel_layer()

    async def scenario() -> tuple[bool, dict]:
        channel = await layer.new_channel()
        receiving = asyncio.ensure_future(layer.receive(channel))
        done, _ = await asyncio.wait({receiving}, timeout=IDLE_SECONDS)
        failed_while_idle = bool(done)  # a receive ends only with a message or an error
        if failed_while_idle:
            receiving.result()  # raises the error
        await layer.send(channel, {"type": "test.message"})
        return failed_while_idle, await asyncio.wait_for(receiving, timeout=5)

    try:
        failed_while_idle, message = asyncio.run(scenario())
    finally:
        channel_layers.backends.clear()

    assert not failed_while_idle
    assert message == {"type": "test.message"}
