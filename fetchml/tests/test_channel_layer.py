"""The Redis channel layer as configured: an idle receive waits; a group send delivers as channels_redis's does,
and so does each send of a `group_send_all`, all of them in two round trips."""

import asyncio
import logging
import time
import uuid
from typing import Any

import pytest
import redis
from channels.layers import channel_layers, get_channel_layer
from django.conf import settings

from fetchml import channel_layer
from fetchml.channel_layer import RedisChannelLayer
from fetchml.testing import TcpGate

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


needs_redis = pytest.mark.skipif(
    not settings.REDIS_URL, reason="needs Redis: set REDIS_URL=redis://... (CI always does)"
)


def _layer(**config) -> RedisChannelLayer:
    """The configured layer class on the configured Redis, under a prefix of its own."""
    return RedisChannelLayer(hosts=[settings.REDIS_URL], prefix=f"test-{uuid.uuid4().hex}", **config)


def _run(scenario) -> Any:
    return asyncio.run(asyncio.wait_for(scenario(), timeout=10))


async def _another_arrives(layer: RedisChannelLayer, channel: str, within: float = 0.5) -> bool:
    """Whether a message reaches `channel` within `within` seconds."""
    receiving = asyncio.ensure_future(layer.receive(channel))
    done, _ = await asyncio.wait({receiving}, timeout=within)
    receiving.cancel()
    return bool(done)


@pytest.fixture(params=["on an event loop", "blocking"])
def send_all(request):
    """A combined group send as an event loop makes it (`group_send_all`), or as synchronous code
    does (`group_send_all_blocking`, from a thread of its own)."""
    if request.param == "blocking":

        async def send(layer: RedisChannelLayer, sends: list[tuple[str, dict]]) -> None:
            await asyncio.to_thread(layer.group_send_all_blocking, sends)

    else:

        async def send(layer: RedisChannelLayer, sends: list[tuple[str, dict]]) -> None:
            await layer.group_send_all(sends)

    send.blocking = request.param == "blocking"
    return send


@needs_redis
def test_the_configured_layer_is_the_one_with_the_shorter_group_send():
    channel_layers.backends.clear()
    try:
        assert isinstance(get_channel_layer(), RedisChannelLayer)
    finally:
        channel_layers.backends.clear()


@needs_redis
def test_a_group_send_reaches_every_member_of_the_group(send_all):
    layer = _layer()

    async def scenario() -> list[dict]:
        channels = [await layer.new_channel() for _ in range(2)]
        for channel in channels:
            await layer.group_add("workers", channel)
        await send_all(layer, [("workers", {"type": "test.message", "n": 1})])
        received = [await layer.receive(channel) for channel in channels]
        await layer.flush()
        return received

    assert _run(scenario) == [{"type": "test.message", "n": 1}] * 2


def _counting_round_trips(monkeypatch, *, blocking: bool = False) -> tuple[list[str], Any]:
    """The Redis round trips made while counting (a command, or "pipeline"), and how to start counting;
    those of the event loop's clients, or of the blocking ones."""
    if blocking:
        from redis.client import Pipeline, Redis
    else:
        from redis.asyncio.client import Pipeline, Redis

    trips: list[str] = []
    single, batched = Redis.execute_command, Pipeline.execute

    # Counted when called; what they return (an awaitable, for the event loop's clients) is the original's.
    def counted_single(self, *args, **options):
        if not isinstance(self, Pipeline):
            trips.append(str(args[0]))
        return single(self, *args, **options)

    def counted_pipeline(self, *args, **options):
        trips.append("pipeline")
        return batched(self, *args, **options)

    def start() -> None:
        monkeypatch.setattr(Redis, "execute_command", counted_single)
        monkeypatch.setattr(Pipeline, "execute", counted_pipeline)

    return trips, start


@needs_redis
def test_a_group_send_takes_two_redis_round_trips(monkeypatch):
    layer = _layer()
    trips, start_counting = _counting_round_trips(monkeypatch)

    async def scenario() -> None:
        channel = await layer.new_channel()
        await layer.group_add("workers", channel)
        await layer.group_send("workers", {"type": "test.message"})  # loads the script once
        start_counting()
        await layer.group_send("workers", {"type": "test.message"})
        monkeypatch.undo()
        await layer.flush()

    _run(scenario)

    assert trips == ["pipeline", "EVALSHA"]


@needs_redis
def test_sends_to_several_groups_reach_each_groups_members_in_two_redis_round_trips(monkeypatch, send_all):
    layer = _layer()
    trips, start_counting = _counting_round_trips(monkeypatch, blocking=send_all.blocking)

    async def scenario() -> list[dict]:
        first, second, loader = await layer.new_channel(), await layer.new_channel(), await layer.new_channel()
        await layer.group_add("owners", first)
        await layer.group_add("admins", second)
        await layer.group_add("loaders", loader)
        await send_all(layer, [("loaders", {"type": "test.message", "n": 0})])  # loads the script once
        start_counting()
        sends = [("owners", {"type": "test.message", "n": 1}), ("admins", {"type": "test.message", "n": 2})]
        await send_all(layer, [*sends, ("nobody", {"type": "test.message", "n": 3})])
        monkeypatch.undo()
        received = [await layer.receive(first), await layer.receive(second)]
        await layer.flush()
        return received

    received = _run(scenario)

    assert received == [{"type": "test.message", "n": 1}, {"type": "test.message", "n": 2}]
    assert trips == ["pipeline", "EVALSHA"]


@needs_redis
def test_a_channel_in_several_groups_gets_their_messages_in_the_order_they_were_sent(send_all):
    layer = _layer()

    async def scenario() -> list[int]:
        channel = await layer.new_channel()
        for group in ("owners", "admins", "status"):
            await layer.group_add(group, channel)
        groups = ["owners", "admins", "status"] * 4
        await send_all(layer, [(group, {"type": "test.message", "n": n}) for n, group in enumerate(groups)])
        received = [(await layer.receive(channel))["n"] for _ in groups]
        await layer.flush()
        return received

    assert _run(scenario) == list(range(12))


@needs_redis
def test_sends_past_a_channels_capacity_in_one_go_are_not_delivered(send_all):
    layer = _layer(capacity=2)

    async def scenario() -> tuple[list[int], bool]:
        channel = await layer.new_channel()
        await layer.group_add("workers", channel)
        await send_all(layer, [("workers", {"type": "test.message", "n": n}) for n in range(3)])
        received = [(await layer.receive(channel))["n"] for _ in range(2)]
        got_a_third = await _another_arrives(layer, channel)
        await layer.flush()
        return received, got_a_third

    received, got_a_third = _run(scenario)

    assert received == [0, 1]
    assert not got_a_third


@needs_redis
def test_a_member_past_the_group_expiry_gets_nothing_and_leaves_the_group(send_all):
    layer = _layer(group_expiry=60)
    elsewhere = RedisChannelLayer(hosts=[settings.REDIS_URL], prefix=layer.prefix)  # another process

    async def scenario() -> tuple[list, int]:
        stale, fresh = await elsewhere.new_channel(), await layer.new_channel()
        await layer.group_add("workers", stale)
        await layer.group_add("workers", fresh)
        # The stale member joined long ago: its score is its joining time.
        await layer.connection(0).zadd(layer._group_key("workers"), {stale: time.time() - 120})
        await send_all(layer, [("workers", {"type": "test.message"})])
        members = await layer.connection(0).zrange(layer._group_key("workers"), 0, -1)
        pending = await layer.connection(0).zcard(layer.prefix + stale.split("!")[0] + "!")
        await layer.receive(fresh)
        await layer.flush()
        return [member.decode() for member in members], pending

    members, pending_for_stale = _run(scenario)

    assert len(members) == 1
    assert pending_for_stale == 0


@needs_redis
def test_a_channel_at_capacity_does_not_get_the_message(send_all):
    layer = _layer(capacity=1)

    async def scenario() -> tuple[dict, bool]:
        channel = await layer.new_channel()
        await layer.group_add("workers", channel)
        await send_all(layer, [("workers", {"type": "test.message", "n": 1})])
        await send_all(layer, [("workers", {"type": "test.message", "n": 2})])
        first = await layer.receive(channel)
        got_a_second = await _another_arrives(layer, channel)
        await layer.flush()
        return first, got_a_second

    first, got_a_second = _run(scenario)

    assert first == {"type": "test.message", "n": 1}
    assert not got_a_second


@needs_redis
def test_a_group_send_drops_the_channels_expired_messages_first(send_all):
    layer = _layer(capacity=1, expiry=60)

    async def scenario() -> dict:
        channel = await layer.new_channel()
        await layer.group_add("workers", channel)
        key = layer.prefix + channel.split("!")[0] + "!"
        # An undelivered message from long ago fills the channel's one place.
        await layer.connection(0).zadd(key, {b"expired": time.time() - 120})
        await send_all(layer, [("workers", {"type": "test.message", "n": 1})])
        received = await layer.receive(channel)
        await layer.flush()
        return received

    assert _run(scenario) == {"type": "test.message", "n": 1}


@needs_redis
def test_a_group_send_still_delivers_after_redis_forgot_the_script(send_all):
    layer = _layer()

    async def scenario() -> dict:
        channel = await layer.new_channel()
        await layer.group_add("workers", channel)
        await send_all(layer, [("workers", {"type": "test.message", "n": 1})])
        await layer.receive(channel)
        await layer.connection(0).script_flush()  # as a restarted Redis has
        await send_all(layer, [("workers", {"type": "test.message", "n": 2})])
        received = await layer.receive(channel)
        await layer.flush()
        return received

    assert _run(scenario) == {"type": "test.message", "n": 2}


def _cut(client_id: int) -> None:
    """Close a Redis client's connection from the server's side, as a restart of Redis would."""
    import redis

    with redis.Redis.from_url(settings.REDIS_URL) as admin:
        assert admin.client_kill_filter(_id=client_id) == 1


@needs_redis
def test_a_blocking_send_delivers_after_its_connection_was_cut():
    layer = _layer()

    async def scenario() -> dict:
        channel = await layer.new_channel()
        await layer.group_add("workers", channel)
        await asyncio.to_thread(layer.group_send_all_blocking, [("workers", {"type": "test.message", "n": 1})])
        await layer.receive(channel)
        # The pool's one connection, the one the next send takes.
        await asyncio.to_thread(_cut, await asyncio.to_thread(layer._blocking_client(0)[0].client_id))
        await asyncio.to_thread(layer.group_send_all_blocking, [("workers", {"type": "test.message", "n": 2})])
        received = await layer.receive(channel)
        await layer.flush()
        return received

    assert _run(scenario) == {"type": "test.message", "n": 2}


@needs_redis
def test_closing_the_layers_pools_closes_its_blocking_connections():
    layer = _layer()

    async def scenario() -> tuple[bool, bool]:
        await asyncio.to_thread(layer.group_send_all_blocking, [("workers", {"type": "test.message"})])
        [connection] = layer._blocking_client(0)[0].connection_pool._available_connections
        was_open = connection._sock is not None
        await layer.close_pools()
        return was_open, connection._sock is None

    assert _run(scenario) == (True, True)


def test_only_a_layer_whose_hosts_are_addresses_sends_from_a_blocking_thread():
    by_address = RedisChannelLayer(hosts=["redis://127.0.0.1:6379/0"])
    by_sentinel = RedisChannelLayer(hosts=[{"sentinels": [("127.0.0.1", 26379)], "master_name": "fetchml"}])

    assert by_address.sends_blocking
    assert not by_sentinel.sends_blocking


def _receiving_client_ids() -> list[int]:
    """The connections of this database blocked in a receive's pop."""
    import redis

    with redis.Redis.from_url(settings.REDIS_URL) as admin:
        db = str(admin.connection_pool.connection_kwargs.get("db", 0))
        return [client["id"] for client in admin.client_list() if (client["cmd"], client["db"]) == ("bzpopmin", db)]


@needs_redis
def test_a_channel_asked_for_with_another_prefix_gets_its_message_while_another_receive_waits():
    layer = _layer()

    async def scenario() -> dict:
        consumer = await layer.new_channel()
        consuming = asyncio.ensure_future(layer.receive(consumer))
        while not await asyncio.to_thread(_receiving_client_ids):  # its blocking pop is under way
            await asyncio.sleep(0.01)
        stream = await layer.new_channel("sse.")
        await layer.send(stream, {"type": "test.message", "n": 1})
        try:
            return await asyncio.wait_for(layer.receive(stream), timeout=3)
        finally:
            consuming.cancel()
            await layer.flush()

    assert _run(scenario) == {"type": "test.message", "n": 1}


@needs_redis
def test_a_waiting_receive_whose_connection_is_cut_still_gets_the_next_message(caplog):
    layer = _layer()

    async def scenario() -> dict:
        channel = await layer.new_channel()
        receiving = asyncio.ensure_future(layer.receive(channel))
        waiting = []
        while not waiting:  # the receive's blocking pop is under way
            await asyncio.sleep(0.01)
            waiting = await asyncio.to_thread(_receiving_client_ids)
        for client_id in waiting:
            await asyncio.to_thread(_cut, client_id)
        await asyncio.sleep(0.1)
        assert not receiving.done(), receiving
        await layer.send(channel, {"type": "test.message", "n": 1})
        received = await asyncio.wait_for(receiving, timeout=5)
        await layer.flush()
        return received

    assert _run(scenario) == {"type": "test.message", "n": 1}
    assert "lost its connection" in caplog.text  # the receive's own connection was the one cut


async def _layer_behind(gate: TcpGate) -> tuple[RedisChannelLayer, str]:
    """A layer reaching Redis through `gate` (opened for it), and a channel of its own."""
    await gate.open()
    layer = RedisChannelLayer(hosts=[gate.url], prefix=f"test-{uuid.uuid4().hex}")
    return layer, await layer.new_channel()


@needs_redis
@pytest.mark.parametrize("joining", [True, False], ids=["group_add", "group_discard"])
def test_a_group_change_while_redis_is_out_of_reach_is_made_once_it_is_back(caplog, joining):
    gate = TcpGate(settings.REDIS_URL)

    async def scenario() -> bool:
        layer, channel = await _layer_behind(gate)
        if not joining:
            await layer.group_add("watchers", channel)
        await gate.shut()
        change = layer.group_add if joining else layer.group_discard
        changing = asyncio.ensure_future(change("watchers", channel))
        while "lost its connection" not in caplog.text:  # the change failed at least once
            await asyncio.sleep(0.01)
        assert not changing.done(), changing
        await gate.open()
        await asyncio.wait_for(changing, timeout=5)
        await layer.group_send("watchers", {"type": "test.message"})
        arrived = await _another_arrives(layer, channel)
        await layer.flush()
        await layer.close_pools()
        await gate.shut()
        return arrived

    assert _run(scenario) is joining


@needs_redis
def test_a_receive_waits_out_a_redis_outage_of_any_length(caplog, monkeypatch):
    monkeypatch.setattr(channel_layer, "RECONNECT_SECONDS", 0.2)  # what a group change would give up after
    caplog.set_level(logging.DEBUG, logger="fetchml.channel_layer")
    gate = TcpGate(settings.REDIS_URL)

    async def scenario() -> dict:
        layer, channel = await _layer_behind(gate)
        await gate.shut()
        receiving = asyncio.ensure_future(layer.receive(channel))
        # Five failed tries: 0.05 + 0.1 + 0.2 + 0.4 s of back-off at most, past the group changes' bound.
        while caplog.text.count("lost its connection") < 5:
            await asyncio.sleep(0.01)
        assert not receiving.done(), receiving
        await gate.open()
        await layer.send(channel, {"type": "test.message"})
        received = await asyncio.wait_for(receiving, timeout=5)
        await layer.flush()
        await layer.close_pools()
        await gate.shut()
        return received

    assert _run(scenario) == {"type": "test.message"}
    assert "is back after" in caplog.text


@needs_redis
def test_a_group_change_gives_up_when_redis_stays_away(monkeypatch):
    monkeypatch.setattr(channel_layer, "RECONNECT_SECONDS", 0.2)
    gate = TcpGate(settings.REDIS_URL)

    async def scenario() -> None:
        layer, channel = await _layer_behind(gate)
        await gate.shut()
        with pytest.raises(redis.ConnectionError):
            await layer.group_add("watchers", channel)
        await layer.close_pools()

    _run(scenario)


def _forget_group(layer: RedisChannelLayer, group: str) -> None:
    """Drop `group`'s members from Redis, as a Redis restarted without its data has."""
    with redis.Redis.from_url(settings.REDIS_URL) as admin:
        admin.delete(layer._group_key(group))


def _is_member(layer: RedisChannelLayer, group: str, channel: str) -> bool:
    with redis.Redis.from_url(settings.REDIS_URL) as admin:
        return admin.zscore(layer._group_key(group), channel) is not None


@needs_redis
def test_memberships_redis_lost_while_out_of_reach_are_put_back_once_it_is_back(caplog):
    gate = TcpGate(settings.REDIS_URL)

    async def scenario() -> bool:
        layer, channel = await _layer_behind(gate)
        await layer.group_add("workers", channel)
        receiving = asyncio.ensure_future(layer.receive(channel))  # a consumer waiting for its next message
        while not await asyncio.to_thread(_receiving_client_ids):
            await asyncio.sleep(0.01)
        await gate.shut()
        while "lost its connection" not in caplog.text:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(_forget_group, layer, "workers")
        await gate.open()
        while not await asyncio.to_thread(_is_member, layer, "workers", channel):
            await asyncio.sleep(0.01)
        await layer.group_send("workers", {"type": "test.message"})
        received = await asyncio.wait_for(receiving, timeout=5)
        await layer.flush()
        await layer.close_pools()
        await gate.shut()
        return received == {"type": "test.message"}

    assert _run(scenario)


@needs_redis
def test_a_member_is_joined_again_before_the_group_expiry_drops_it(monkeypatch):
    monkeypatch.setattr(channel_layer, "MEMBERSHIP_REFRESH_SECONDS", 0.0)  # put back before every receive
    layer = _layer(group_expiry=1)

    async def scenario() -> dict:
        channel = await layer.new_channel()
        await layer.group_add("workers", channel)
        await asyncio.sleep(1.5)  # the join is now older than the group expiry
        receiving = asyncio.ensure_future(layer.receive(channel))
        while not await asyncio.to_thread(_receiving_client_ids):
            await asyncio.sleep(0.01)
        await layer.group_send("workers", {"type": "test.message"})
        received = await asyncio.wait_for(receiving, timeout=5)
        await layer.flush()
        return received

    assert _run(scenario) == {"type": "test.message"}


@needs_redis
def test_a_channel_that_left_its_group_is_not_put_back():
    layer = _layer()

    async def scenario() -> bool:
        channel = await layer.new_channel()
        await layer.group_add("workers", channel)
        await layer.group_discard("workers", channel)
        layer.refresh_memberships_soon()
        await layer.group_send("workers", {"type": "test.message"})
        arrived = await _another_arrives(layer, channel)  # its receive puts back what is due first
        member = await asyncio.to_thread(_is_member, layer, "workers", channel)
        await layer.flush()
        return arrived or member

    assert not _run(scenario)


@pytest.mark.skipif(bool(settings.REDIS_URL), reason="the embedded layer is configured only without REDIS_URL")
def test_the_embedded_layer_keeps_a_group_member_as_long_as_it_is_connected():
    channel_layers.backends.clear()
    try:
        # channels' default of a day would stop telling a worker connected longer of its assignments
        assert get_channel_layer().group_expiry >= 10 * 365 * 86400
    finally:
        channel_layers.backends.clear()
