"""One database read for many connections that ask for the same rows at once.

A change of one user's task is told to every connection of that user (and of
every admin); each of them used to read the task for itself, one query after
another on the process's one database thread, so a thousand dashboards of one
user made every other connection, and every worker heartbeat, wait behind a
thousand queries per change. `SharedRead` joins the asks of one event loop:
an ask made while no read of its function is under way starts one; asks made
while one is under way join the next, which starts as soon as that one ends
and reads the union of their keys. So every ask is answered by a read that
started after it was made (nothing older than the change it was told of),
and a crowd of connections costs one or two queries per change. `about`
goes further for listeners told of one message object: the first one's read
answers them all.
"""

import asyncio
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from channels.db import database_sync_to_async

Value = TypeVar("Value")


class _Batch:
    """The asks waiting for the next read of one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.keys: dict[str, None] = {}  # an ordered set
        self.answer: asyncio.Future = loop.create_future()
        # A read that failed after all its askers went away (connections closed) is not an error
        # to report on its own.
        self.answer.add_done_callback(lambda answer: answer.cancelled() or answer.exception())


# Messages whose read is remembered, per event loop (the oldest forgotten first): listeners told of
# one message handle it within moments of each other.
MESSAGES_REMEMBERED = 256


class _LoopReads:
    def __init__(self) -> None:
        self.next: _Batch | None = None
        self.reading: asyncio.Task | None = None
        # id(message) -> (the message, its read): the message is held so that its id is not reused
        self.by_message: OrderedDict[int, tuple[object, asyncio.Future]] = OrderedDict()


class SharedRead(Generic[Value]):
    """`await shared(keys)`: `read(keys)` (a sync function returning a dict by key, run on the
    database thread), shared with the other asks of the same moment; the found keys asked for."""

    def __init__(self, read: Callable[[list[str]], dict[str, Value]]) -> None:
        self._read = database_sync_to_async(read)
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopReads] = weakref.WeakKeyDictionary()

    async def __call__(self, keys: Iterable[str]) -> dict[str, Value]:
        keys = list(keys)
        loop = asyncio.get_running_loop()
        reads = self._loops.setdefault(loop, _LoopReads())
        if reads.next is None:
            reads.next = _Batch(loop)
        batch = reads.next
        batch.keys.update(dict.fromkeys(keys))
        if reads.reading is None:
            reads.reading = loop.create_task(self._read_while_asked(reads))
        # Shielded: an asker cancelled (its connection closed) does not cancel the others' read.
        found = await asyncio.shield(batch.answer)
        return {key: found[key] for key in keys if key in found}

    async def about(self, message: object, keys: Iterable[str]) -> dict[str, Value]:
        """`keys` read once for every listener told of the same `message` object (the live layer
        hands one object to all its listeners), by the first one to ask; `keys` are all the keys
        the message is about, and each listener picks its own from the answer. That read started
        after the message reached this process, so it is no older than what the message tells."""
        reads = self._loops.setdefault(asyncio.get_running_loop(), _LoopReads())
        remembered = reads.by_message.get(id(message))
        if remembered is None or remembered[0] is not message:
            remembered = (message, asyncio.ensure_future(self(keys)))
            reads.by_message[id(message)] = remembered
            while len(reads.by_message) > MESSAGES_REMEMBERED:
                reads.by_message.popitem(last=False)
        return await asyncio.shield(remembered[1])

    async def _read_while_asked(self, reads: _LoopReads) -> None:
        try:
            while reads.next is not None:
                batch, reads.next = reads.next, None
                try:
                    found = await self._read(list(batch.keys))
                except asyncio.CancelledError:
                    batch.answer.cancel()
                    raise
                except Exception as exc:  # told to each asker, which handles it as its own read's
                    batch.answer.set_exception(exc)
                else:
                    batch.answer.set_result(found)
        finally:
            reads.reading = None
            if reads.next is not None and not reads.next.answer.done():
                # Cancelled (the loop is closing): nobody will read for the asks left.
                reads.next.answer.cancel()
