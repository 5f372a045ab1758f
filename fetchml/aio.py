"""Small asyncio helpers shared by the server's long-lived coroutines."""

import asyncio
import time

RECANCEL_SECONDS = 0.05
# A cancelled channel-layer read returns at once; this only bounds a broken one.
STOP_READ_SECONDS = 5.0


async def cancel_and_wait(task: asyncio.Future, *, timeout: float = STOP_READ_SECONDS) -> bool:
    """Cancel `task` and wait up to `timeout` seconds for it to end; whether it ended.

    The cancel is repeated while the task runs on: on Python 3.11 a cancel that
    arrives as an inner `asyncio.wait_for` completes is lost (redis-py sends
    every command through one), and a channel-layer read that lost its cancel
    would go on reading, holding a connection, until a message came.
    """
    deadline = time.monotonic() + timeout
    while not task.done():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        task.cancel()
        await asyncio.wait({task}, timeout=min(RECANCEL_SECONDS, remaining))
    return True
