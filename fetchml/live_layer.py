"""The channel layer of live-update listeners: one membership per group and process, fanned out in memory.

Client WebSockets (/ws) and SSE streams used to join their groups on the
real layer each with a channel of its own, so a change of one user's task
was one Redis message per connection of that user, each pushed, popped and
decoded on its own, and another user's update waited behind all of them
(1,000 connections of one user and 200 changes: 200,000 messages;
bench/ws_fanout.py).

`LiveLayer` (alias `live` in CHANNEL_LAYERS) is what those listeners use
instead. The first of a process's listeners to join a group joins a channel
of the real layer to it, on the listeners' behalf, and a reader hands each
message of that channel to every local member's queue; the last one to
leave takes the channel out. So a change costs one message per group and
process on the real layer, whatever the number of listeners.

A listener whose last receive is cancelled has ended and leaves its groups
(a WebSocket consumer cancelled by its server never leaves them itself).
What a listener sees is what the real layer gave it: each group's messages
in the order they were sent, and a message dropped when the listener's
queue is full (`capacity`, as a real channel at capacity drops it; the
listeners re-read the database). A message is handed to every member as the
same object: members read messages, never change them. Sends go to the real
layer. The state is per event loop (a server runs one; tests run several).
"""

import asyncio
import logging
import uuid
import weakref
from typing import Any

from channels.layers import channel_layers

from fetchml.aio import cancel_and_wait

logger = logging.getLogger("fetchml.channel_layer")

LIVE_LAYER = "live"  # its alias in CHANNEL_LAYERS (settings.py)
_LOCAL = "!live"  # ends the name of every channel of this layer
# A reader's real-layer receive that fails unexpectedly is tried again after this long (the Redis
# layer's own receive already outlives a cut connection).
READ_RETRY_SECONDS = 1.0


class LiveLayer:
    extensions = ["groups"]

    def __init__(self, inner: str = "default", capacity: int = 1000, **_unused: Any) -> None:
        self.inner_alias = inner
        self.capacity = capacity
        self._hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Hub] = weakref.WeakKeyDictionary()

    @property
    def inner(self) -> Any:
        return channel_layers[self.inner_alias]

    def _hub(self) -> "_Hub":
        loop = asyncio.get_running_loop()
        hub = self._hubs.get(loop)
        if hub is None:
            hub = self._hubs[loop] = _Hub(self.inner, self.capacity)
        return hub

    async def new_channel(self, prefix: str = "live") -> str:
        return f"{prefix}.{uuid.uuid4().hex}{_LOCAL}"

    async def receive(self, channel: str) -> dict[str, Any]:
        return await self._hub().receive(channel)

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        if channel.endswith(_LOCAL):
            self._hub().deliver(channel, message)
        else:
            await self.inner.send(channel, message)

    async def group_add(self, group: str, channel: str) -> None:
        await self._hub().join(group, channel)

    async def group_discard(self, group: str, channel: str) -> None:
        await self._hub().leave(group, channel)

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        await self.inner.group_send(group, message)

    def members(self, group: str) -> set[str]:
        """The local channels in `group` (this event loop's)."""
        state = self._hub().groups.get(group)
        return set(state.members) if state else set()

    def local_channels(self) -> set[str]:
        """The local channels this event loop holds a queue for (in a group, or being received from)."""
        return set(self._hub().queues)

    def joined_groups(self) -> set[str]:
        """The groups this event loop's listeners are in on the real layer."""
        return {group for group, state in self._hub().groups.items() if state.reader is not None}


class _Group:
    """One group's local members, and the real-layer channel and reader that stand for them."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()  # joins and leaves of the group, one at a time
        self.users = 0  # coroutines holding or awaiting the lock: the state is dropped at 0 with no members
        self.members: set[str] = set()
        self.inner_channel: str | None = None
        self.reader: asyncio.Task | None = None


class _Hub:
    def __init__(self, inner: Any, capacity: int) -> None:
        self.inner = inner
        self.capacity = capacity
        self.queues: dict[str, asyncio.Queue] = {}  # local channel -> its messages
        self.groups_of: dict[str, set[str]] = {}  # local channel -> its groups
        self.receiving: dict[str, int] = {}  # local channel -> receives under way
        self.leaving: set[asyncio.Future] = set()  # ended listeners leaving their groups (held: not collected)
        self.overflowing: set[str] = set()  # local channels whose full queue dropped a message (warned once)
        self.groups: dict[str, _Group] = {}

    def _queue(self, channel: str) -> asyncio.Queue:
        queue = self.queues.get(channel)
        if queue is None:
            queue = self.queues[channel] = asyncio.Queue(maxsize=self.capacity)
        return queue

    def _forget_if_unused(self, channel: str) -> None:
        if not self.groups_of.get(channel) and not self.receiving.get(channel):
            self.queues.pop(channel, None)
            self.groups_of.pop(channel, None)
            self.overflowing.discard(channel)

    async def receive(self, channel: str) -> dict[str, Any]:
        queue = self._queue(channel)
        self.receiving[channel] = self.receiving.get(channel, 0) + 1
        try:
            return await queue.get()
        except asyncio.CancelledError:
            if self.receiving[channel] == 1 and self.groups_of.get(channel):
                self._abandon(channel)
            raise
        finally:
            self.receiving[channel] -= 1
            if not self.receiving[channel]:
                del self.receiving[channel]
            self._forget_if_unused(channel)

    def _abandon(self, channel: str) -> None:
        """The listener's last receive was cancelled: the listener is ending, and leaves its groups.

        Both listeners receive until they end, and leave their groups themselves (a stream right
        after, a WebSocket consumer before), but a consumer cancelled by its server (past its close
        timeout) never does: without this its groups would be read, and kept, for good."""
        leaving = asyncio.ensure_future(self._leave_all(channel))
        self.leaving.add(leaving)
        leaving.add_done_callback(self.leaving.discard)

    async def _leave_all(self, channel: str) -> None:
        for group in sorted(self.groups_of.get(channel, ())):
            try:
                await self.leave(group, channel)
            except Exception:
                logger.warning("could not leave group %s for an ended listener", group, exc_info=True)

    def deliver(self, channel: str, message: dict[str, Any]) -> None:
        try:
            self._queue(channel).put_nowait(message)
        except asyncio.QueueFull:
            # Once per listener: a stuck client would otherwise log every message of its groups.
            if channel not in self.overflowing:
                self.overflowing.add(channel)
                logger.warning(
                    "a live listener's queue is full (%d messages); its messages are dropped until it reads",
                    self.capacity,
                )
        else:
            self.overflowing.discard(channel)

    async def join(self, group: str, channel: str) -> None:
        async with self._group(group) as state:
            if channel in state.members:
                return
            if state.reader is None:
                inner_channel = await self.inner.new_channel()
                await self.inner.group_add(group, inner_channel)  # a failure leaves nothing joined
                state.inner_channel = inner_channel
                state.reader = asyncio.ensure_future(self._read(group, state, inner_channel))
            state.members.add(channel)
            self.groups_of.setdefault(channel, set()).add(group)
            self._queue(channel)

    async def leave(self, group: str, channel: str) -> None:
        async with self._group(group) as state:
            if channel not in state.members:
                return
            state.members.discard(channel)
            self.groups_of.get(channel, set()).discard(group)
            self._forget_if_unused(channel)
            if state.members or state.reader is None:
                return
            reader, inner_channel = state.reader, state.inner_channel
            state.reader = state.inner_channel = None
            await cancel_and_wait(reader)
            await self.inner.group_discard(group, inner_channel)

    def _group(self, group: str) -> "_GroupHold":
        state = self.groups.get(group)
        if state is None:
            state = self.groups[group] = _Group()
        return _GroupHold(self, group, state)

    async def _read(self, group: str, state: _Group, inner_channel: str) -> None:
        while True:
            try:
                message = await self.inner.receive(inner_channel)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("reading group %s for live listeners failed; trying again", group, exc_info=True)
                await asyncio.sleep(READ_RETRY_SECONDS)
                continue
            for channel in list(state.members):
                self.deliver(channel, message)


class _GroupHold:
    """`async with`: the group's lock held, its state dropped after if nobody uses it any more."""

    def __init__(self, hub: _Hub, group: str, state: _Group) -> None:
        self.hub, self.group, self.state = hub, group, state

    async def __aenter__(self) -> _Group:
        self.state.users += 1
        try:
            await self.state.lock.acquire()
        except BaseException:
            self._release_use()
            raise
        return self.state

    async def __aexit__(self, *exc_info: object) -> None:
        self.state.lock.release()
        self._release_use()

    def _release_use(self) -> None:
        self.state.users -= 1
        if not self.state.users and not self.state.members and self.state.reader is None:
            self.hub.groups.pop(self.group, None)
