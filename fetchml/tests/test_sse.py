"""fetchml.sse: frames, heartbeats, group messages, and cleanup on end and on disconnect."""

import asyncio
from collections.abc import AsyncIterator

from channels.layers import get_channel_layer

from conftest import GroupMoves
from fetchml.sse import event_stream, sse_frame
from fetchml.testing import SSEParser, SSEStream, run_async

GROUPS = ["sse-test.one", "sse-test.two"]


class EchoSource:
    """Says hello, echoes each message, counts heartbeats; finished by a message with "last"."""

    def __init__(self, group_moves: GroupMoves | None = None) -> None:
        self.finished = False
        self.group_moves = group_moves
        self.joined_at_start: list[str] = []

    async def start(self) -> AsyncIterator[bytes]:
        if self.group_moves is not None:
            self.joined_at_start = [group for group, _ in self.group_moves.joined]
        yield sse_frame({"hello": True}, event="hello")

    async def on_message(self, message: dict) -> AsyncIterator[bytes]:
        yield sse_frame({"n": message["n"]}, event="echo", event_id=message["n"])
        if message.get("last"):
            self.finished = True

    async def on_heartbeat(self) -> AsyncIterator[bytes]:
        yield sse_frame({}, event="checked")


async def _send(message: dict) -> None:
    await get_channel_layer().group_send(GROUPS[0], {"type": "test.message", **message})


async def _no_tasks_but(before: set[asyncio.Task]) -> None:
    """Wait until every task started since `before` has finished (cancelled ones settle a turn later)."""
    async with asyncio.timeout(5):
        while asyncio.all_tasks() - before - {asyncio.current_task()}:
            await asyncio.sleep(0.01)


def test_frame_has_id_event_and_one_json_data_line():
    assert sse_frame({"a": "x\ny"}, event="log", event_id=7) == b'id: 7\nevent: log\ndata: {"a":"x\\ny"}\n\n'


def test_frame_without_event_is_only_data():
    assert sse_frame([1, 2]) == b"data: [1,2]\n\n"


def test_parser_reassembles_frames_split_across_chunks():
    parser = SSEParser()
    assert parser.feed(b"event: log\nda") == []
    events = parser.feed(b'ta: {"n":1}\n\n: heartbeat\n\n')
    assert [(e.event, e.data, e.comment) for e in events] == [("log", {"n": 1}, None), (None, None, "heartbeat")]


@run_async
async def test_groups_are_joined_before_the_source_starts(group_moves):
    source = EchoSource(group_moves)
    stream = SSEStream(event_stream(source, groups=GROUPS, heartbeat_seconds=60))
    try:
        await stream.events(1)
    finally:
        await stream.close()
    assert source.joined_at_start == GROUPS


@run_async
async def test_group_messages_reach_the_source_in_order():
    stream = SSEStream(event_stream(EchoSource(), groups=GROUPS, heartbeat_seconds=60))
    try:
        await stream.events(1)
        for n in range(3):
            await _send({"n": n})
        echoed = await stream.events(3)
    finally:
        await stream.close()
    assert [(e.event, e.id, e.data) for e in echoed] == [("echo", str(n), {"n": n}) for n in range(3)]


@run_async
async def test_idle_stream_sends_heartbeat_comments_and_lets_the_source_check():
    stream = SSEStream(event_stream(EchoSource(), groups=GROUPS, heartbeat_seconds=0.05))
    try:
        await stream.events(1)
        after_hello = [await stream.next() for _ in range(4)]
    finally:
        await stream.close()
    assert [(e.comment, e.event) for e in after_hello] == [("heartbeat", None), (None, "checked")] * 2


@run_async
async def test_stream_ends_when_the_source_is_finished_and_leaves_its_groups(group_moves):
    before = asyncio.all_tasks()
    stream = SSEStream(event_stream(EchoSource(), groups=GROUPS, heartbeat_seconds=60))
    await stream.events(1)
    await _send({"n": 1, "last": True})
    rest = await stream.until_end()
    await _no_tasks_but(before)

    assert [e.event for e in rest] == ["echo"]
    assert stream.ended
    assert sorted(group_moves.left) == sorted(group_moves.joined)
    assert len(group_moves.joined) == len(GROUPS)


@run_async
async def test_client_disconnect_leaves_every_group_and_leaves_no_task_behind(group_moves):
    before = asyncio.all_tasks()
    stream = SSEStream(event_stream(EchoSource(), groups=GROUPS, heartbeat_seconds=60))
    await stream.events(1)  # now waiting on the channel layer, as an idle stream does

    await stream.close()  # cancels the reader: CancelledError inside the stream, as on disconnect
    await _no_tasks_but(before)

    assert len(group_moves.joined) == len(GROUPS)
    assert sorted(group_moves.left) == sorted(group_moves.joined)
