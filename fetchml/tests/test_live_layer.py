"""fetchml.live_layer: a process's live listeners share one membership per group on the real layer."""

import asyncio
import logging
import uuid

import pytest
from channels.layers import get_channel_layer

from fetchml.live_layer import LIVE_LAYER, LiveLayer
from fetchml.testing import run_async

TIMEOUT = 5


def _group() -> str:
    return f"test.live.{uuid.uuid4().hex}"


async def _members(layer, group: str, count: int) -> list[str]:
    channels = [await layer.new_channel() for _ in range(count)]
    for channel in channels:
        await layer.group_add(group, channel)
    return channels


async def _received(layer, channel: str) -> dict:
    return await asyncio.wait_for(layer.receive(channel), TIMEOUT)


async def _heard(layer, group: str, channel: str) -> bool:
    """Whether a message sent to `group` now reaches `channel`."""
    await layer.group_send(group, {"type": "news"})
    return (await _received(layer, channel))["type"] == "news"


async def _nothing_more(layer, channel: str) -> bool:
    """True if nothing waits for `channel`: a marker sent to it directly is the next message."""
    await layer.send(channel, {"type": "marker"})
    return (await _received(layer, channel))["type"] == "marker"


@run_async
async def test_listeners_of_a_group_share_one_membership_of_the_real_layer(group_moves):
    live, group = get_channel_layer(LIVE_LAYER), _group()
    members = await _members(live, group, 3)
    try:
        assert [joined for joined, _ in group_moves.joined] == [group]
        assert live.members(group) == set(members)
    finally:
        for channel in members:
            await live.group_discard(group, channel)


@run_async
async def test_a_group_message_reaches_every_listener_in_the_order_sent():
    live, group = get_channel_layer(LIVE_LAYER), _group()
    members = await _members(live, group, 3)
    try:
        for number in range(3):
            await live.group_send(group, {"type": "news", "number": number})
        told = [[(await _received(live, channel))["number"] for _ in range(3)] for channel in members]
    finally:
        for channel in members:
            await live.group_discard(group, channel)
    assert told == [[0, 1, 2]] * 3


@run_async
async def test_a_listener_in_two_groups_gets_the_messages_of_both():
    live, first, second = get_channel_layer(LIVE_LAYER), _group(), _group()
    channel = await live.new_channel()
    await live.group_add(first, channel)
    await live.group_add(second, channel)
    try:
        await live.group_send(first, {"type": "news", "from": "first"})
        await live.group_send(second, {"type": "news", "from": "second"})
        told = {(await _received(live, channel))["from"] for _ in range(2)}
    finally:
        await live.group_discard(first, channel)
        await live.group_discard(second, channel)
    assert told == {"first", "second"}


@run_async
async def test_the_real_membership_is_left_with_the_last_listener_only(group_moves):
    live, group = get_channel_layer(LIVE_LAYER), _group()
    first, second = await _members(live, group, 2)
    await live.group_discard(group, first)
    assert group_moves.left == []
    assert await _heard(live, group, second)
    await live.group_discard(group, second)
    assert group_moves.left == group_moves.joined
    assert group not in live.joined_groups()


@run_async
async def test_a_listener_that_left_gets_no_more_of_the_groups_messages():
    live, group = get_channel_layer(LIVE_LAYER), _group()
    leaving, staying = await _members(live, group, 2)
    await live.group_discard(group, leaving)
    try:
        assert await _heard(live, group, staying)
        assert await _nothing_more(live, leaving)
    finally:
        await live.group_discard(group, staying)


@run_async
async def test_a_group_joined_again_after_its_last_listener_left_is_heard_again():
    live, group = get_channel_layer(LIVE_LAYER), _group()
    [channel] = await _members(live, group, 1)
    await live.group_discard(group, channel)
    await live.group_add(group, channel)
    try:
        assert await _heard(live, group, channel)
    finally:
        await live.group_discard(group, channel)


@run_async
async def test_listeners_joining_a_group_at_once_make_one_real_membership(group_moves):
    live, group = get_channel_layer(LIVE_LAYER), _group()
    channels = [await live.new_channel() for _ in range(10)]
    await asyncio.gather(*(live.group_add(group, channel) for channel in channels))
    try:
        assert [joined for joined, _ in group_moves.joined] == [group]
        await live.group_send(group, {"type": "news"})
        told = [(await _received(live, channel))["type"] for channel in channels]
    finally:
        await asyncio.gather(*(live.group_discard(group, channel) for channel in channels))
    assert told == ["news"] * 10
    assert group_moves.left == group_moves.joined


@run_async
async def test_a_full_listener_misses_a_message_the_others_still_get():
    live, group = LiveLayer(capacity=2), _group()
    slow, quick = await _members(live, group, 2)
    try:
        for number in range(3):
            await live.group_send(group, {"type": "news", "number": number})
            assert (await _received(live, quick))["number"] == number
        kept = [(await _received(live, slow))["number"] for _ in range(2)]
        assert await _nothing_more(live, slow)
    finally:
        for channel in (slow, quick):
            await live.group_discard(group, channel)
    assert kept == [0, 1]


@run_async
async def test_a_join_the_real_layer_refuses_leaves_nothing_joined(monkeypatch):
    live, group = get_channel_layer(LIVE_LAYER), _group()
    channel = await live.new_channel()

    async def refused(group: str, channel: str) -> None:
        raise ConnectionError("Redis away")

    with monkeypatch.context() as patched:
        patched.setattr(live.inner, "group_add", refused)
        with pytest.raises(ConnectionError):
            await live.group_add(group, channel)
    assert live.members(group) == set()
    await live.group_add(group, channel)  # the real layer is back: joined for good
    try:
        assert await _heard(live, group, channel)
    finally:
        await live.group_discard(group, channel)


@run_async
async def test_a_listener_gone_from_every_group_with_no_receive_under_way_is_forgotten():
    live, group = get_channel_layer(LIVE_LAYER), _group()
    [channel] = await _members(live, group, 1)
    receiving = asyncio.ensure_future(live.receive(channel))
    await asyncio.sleep(0)
    await live.group_discard(group, channel)
    assert channel in live.local_channels()  # a receive still waits on it
    receiving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await receiving
    assert channel not in live.local_channels()


@run_async
async def test_a_listener_whose_last_receive_is_cancelled_leaves_its_groups(group_moves):
    live, group = get_channel_layer(LIVE_LAYER), _group()
    [channel] = await _members(live, group, 1)
    receiving = asyncio.ensure_future(live.receive(channel))
    await asyncio.sleep(0)
    receiving.cancel()  # as a consumer cancelled by its server is, without leaving its groups
    with pytest.raises(asyncio.CancelledError):
        await receiving
    async with asyncio.timeout(TIMEOUT):
        while live.members(group) or group_moves.left != group_moves.joined:
            await asyncio.sleep(0.01)
    assert channel not in live.local_channels()


@run_async
async def test_a_full_listener_is_warned_of_once_not_for_every_message_dropped(caplog):
    live, group = LiveLayer(capacity=1), _group()
    [slow] = await _members(live, group, 1)
    try:
        with caplog.at_level(logging.WARNING, logger="fetchml.channel_layer"):
            for number in range(5):
                await live.send(slow, {"type": "news", "number": number})
    finally:
        await live.group_discard(group, slow)
    assert caplog.text.count("queue is full") == 1
