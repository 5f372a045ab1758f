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
and a crowd of connections costs one or two queries per change.
"""

import asyncio
import weakref
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


class _LoopReads:
    def __init__(self) -> None:
        self.next: _Batch | None = None
        self.reading: asyncio.Task | None = None


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
