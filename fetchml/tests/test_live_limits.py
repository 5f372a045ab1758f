"""The live connections (client WebSockets and SSE streams) one API key may hold open on a server process."""

import asyncio

import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer

from fetchml.asgi import application
from fetchml.live_layer import LIVE_LAYER
from fetchml.live_limits import live_connections
from fetchml.testing import (
    KeyAsyncClient,
    SSEStream,
    close_of,
    http_scope,
    open_client_socket,
    request_then_stay,
    run_async,
)
from fetchml.tests.factories import ApiKeyFactory
from tasks.consumers import CLOSE_RATE_LIMITED

pytestmark = pytest.mark.django_db(transaction=True)
TIMEOUT = 5
STATUS_STREAM = "/v1/scheduler/status/stream"


@pytest.fixture
def limit_of_two(settings):
    settings.FETCHML_LIVE_CONNECTIONS_PER_KEY = 2


@pytest.fixture
def key(user):
    return ApiKeyFactory.pair(user=user)


def _key_id(key) -> str:
    return str(key[0].id)


async def _open_stream(raw: str) -> SSEStream:
    response = await KeyAsyncClient(raw).get(STATUS_STREAM)
    assert response.status_code == 200, response.content
    stream = SSEStream(response.streaming_content)
    await stream.next()  # the first frame: the stream is under way
    return stream


@run_async
async def test_a_websocket_past_its_keys_limit_is_closed_with_4429_and_a_reason(limit_of_two, key):
    open_ones = [await open_client_socket(key[1]) for _ in range(2)]
    refused = await open_client_socket(key[1])
    try:
        code, reason = await close_of(refused)
    finally:
        for socket in open_ones:
            await socket.disconnect()
    assert code == CLOSE_RATE_LIMITED
    assert "2 live connections" in reason


@run_async
async def test_a_closed_websocket_gives_its_place_back(limit_of_two, key):
    first = await open_client_socket(key[1])
    assert live_connections.count(_key_id(key)) == 1
    await first.disconnect()
    assert live_connections.count(_key_id(key)) == 0


@run_async
async def test_a_websocket_consumer_cancelled_without_a_disconnect_gives_its_place_back(limit_of_two, key):
    socket = await open_client_socket(key[1])
    socket.future.cancel()  # as daphne does to an application past its close timeout
    with pytest.raises(asyncio.CancelledError):
        await socket.future
    assert live_connections.count(_key_id(key)) == 0
    await _groups_left()


async def _groups_left() -> None:
    """Until the process's listeners have left every group on the real layer (a consumer cancelled
    leaves them a moment after it ended): a Redis read still under way when the test's event loop
    closes can outlive its cancel."""
    live = get_channel_layer(LIVE_LAYER)
    async with asyncio.timeout(TIMEOUT):
        while live.joined_groups():
            await asyncio.sleep(0.01)


@run_async
async def test_each_key_has_a_limit_of_its_own(limit_of_two, key, user):
    first_key, second_key = key[1], await sync_to_async(ApiKeyFactory.raw)(user=user)
    sockets = [await open_client_socket(first_key) for _ in range(2)]
    other = await open_client_socket(second_key)
    try:
        await other.send_json_to({"type": "ping"})
        pong = await other.receive_json_from(timeout=TIMEOUT)
    finally:
        for socket in [*sockets, other]:
            await socket.disconnect()
    assert pong["type"] == "pong"


@run_async
async def test_a_stream_past_its_keys_limit_is_a_429_in_the_error_format(limit_of_two, key):
    streams = [await _open_stream(key[1]) for _ in range(2)]
    try:
        response = await KeyAsyncClient(key[1]).get(STATUS_STREAM)
    finally:
        for stream in streams:
            await stream.close()
    assert response.status_code == 429
    body = response.json()
    assert body["code"] == "RATE_LIMITED"
    assert "2 live connections" in body["error"]
    assert body["trace_id"]


@run_async
async def test_websockets_and_streams_count_against_the_same_limit(limit_of_two, key):
    socket = await open_client_socket(key[1])
    stream = await _open_stream(key[1])
    refused = await open_client_socket(key[1])
    try:
        code, _ = await close_of(refused)
    finally:
        await socket.disconnect()
        await stream.close()
    assert code == CLOSE_RATE_LIMITED


@run_async
async def test_a_stream_the_client_left_gives_its_place_back(limit_of_two, key):
    stream = await _open_stream(key[1])
    assert live_connections.count(_key_id(key)) == 1
    await stream.close()
    assert live_connections.count(_key_id(key)) == 0


@run_async
async def test_a_head_on_a_stream_holds_no_place_once_answered(limit_of_two, key):
    sent = []

    async def send(message: dict) -> None:
        sent.append(message)

    async with asyncio.timeout(TIMEOUT):
        await application(http_scope("HEAD", STATUS_STREAM, key=key[1]), request_then_stay(), send)
    # No garbage collection needed (it may not run for minutes): closing the answered response gives the place back.
    assert sent[0]["status"] == 200
    assert live_connections.count(_key_id(key)) == 0


@run_async
async def test_a_stream_refused_for_another_reason_takes_no_place(limit_of_two, key):
    response = await KeyAsyncClient(key[1]).get("/v1/scheduler/jobs/00000000-0000-0000-0000-000000000000/stream")
    assert response.status_code == 404
    assert live_connections.count(_key_id(key)) == 0
