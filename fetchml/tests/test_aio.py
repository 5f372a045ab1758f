"""cancel_and_wait: a task that loses a cancel is cancelled again; a bound holds."""

import asyncio
import contextlib

from fetchml.aio import cancel_and_wait


async def _ignores_the_first_cancel(started: asyncio.Event) -> None:
    started.set()
    with contextlib.suppress(asyncio.CancelledError):  # lost, as a cancel racing an inner wait_for is on 3.11
        await asyncio.sleep(3600)
    await asyncio.sleep(3600)


def test_a_task_that_lost_its_first_cancel_is_cancelled_again():
    async def scenario() -> tuple[bool, bool]:
        started = asyncio.Event()
        task = asyncio.ensure_future(_ignores_the_first_cancel(started))
        await started.wait()
        ended = await cancel_and_wait(task, timeout=5)
        return ended, task.cancelled()

    assert asyncio.run(scenario()) == (True, True)


async def _refuses_cancels_until(released: asyncio.Event) -> None:
    while not released.is_set():
        with contextlib.suppress(asyncio.CancelledError):
            await released.wait()


def test_a_task_that_refuses_every_cancel_is_given_up_after_the_bound():
    async def scenario() -> tuple[bool, bool]:
        released = asyncio.Event()
        task = asyncio.ensure_future(_refuses_cancels_until(released))
        await asyncio.sleep(0)
        ended = await cancel_and_wait(task, timeout=0.2)
        still_running = not task.done()
        released.set()
        await task
        return ended, still_running

    assert asyncio.run(scenario()) == (False, True)
