"""fetchml.shared_reads: the asks of one moment share one read, and no ask gets a read older than itself."""

import asyncio
import threading

from fetchml.shared_reads import SharedRead
from fetchml.testing import run_async

WAIT = 5


class GatedRead:
    """A read whose first call waits for `release`: asks made meanwhile pile up behind it.
    Each call's values name the call (1, 2, ...), so an answer says which read it came from."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.first_started = threading.Event()
        self.release = threading.Event()

    def __call__(self, keys: list[str]) -> dict[str, int]:
        self.calls.append(keys)
        if len(self.calls) == 1:
            self.first_started.set()
            assert self.release.wait(WAIT)
        return {key: len(self.calls) for key in keys if key != "missing"}


async def _first_read_under_way(read: GatedRead, shared: SharedRead) -> asyncio.Task:
    first = asyncio.ensure_future(shared(["a"]))
    assert await asyncio.to_thread(read.first_started.wait, WAIT)
    return first


@run_async
async def test_asks_made_during_a_read_share_the_next_one():
    read = GatedRead()
    shared = SharedRead(read)
    first = await _first_read_under_way(read, shared)
    later = [asyncio.ensure_future(shared([key])) for key in ("b", "c", "b")]
    await asyncio.sleep(0)  # every later ask is made before the first read ends
    read.release.set()
    answers = await asyncio.wait_for(asyncio.gather(first, *later), WAIT)
    assert read.calls == [["a"], ["b", "c"]]
    assert answers == [{"a": 1}, {"b": 2}, {"c": 2}, {"b": 2}]


@run_async
async def test_an_ask_made_during_a_read_is_not_answered_by_it():
    read = GatedRead()
    shared = SharedRead(read)
    first = await _first_read_under_way(read, shared)
    same_key_later = asyncio.ensure_future(shared(["a"]))
    await asyncio.sleep(0)
    read.release.set()
    assert await asyncio.wait_for(first, WAIT) == {"a": 1}
    assert await asyncio.wait_for(same_key_later, WAIT) == {"a": 2}


@run_async
async def test_asks_of_the_same_moment_are_one_read():
    read = GatedRead()
    read.release.set()
    shared = SharedRead(read)
    answers = await asyncio.wait_for(asyncio.gather(*(shared(["a", "b"]) for _ in range(50))), WAIT)
    assert read.calls == [["a", "b"]]
    assert all(answer == {"a": 1, "b": 1} for answer in answers)


@run_async
async def test_keys_not_found_are_left_out_of_the_answer():
    read = GatedRead()
    read.release.set()
    assert await SharedRead(read)(["a", "missing"]) == {"a": 1}


@run_async
async def test_an_asker_cancelled_does_not_cancel_the_others_read():
    read = GatedRead()
    shared = SharedRead(read)
    first = await _first_read_under_way(read, shared)
    leaving, staying = asyncio.ensure_future(shared(["b"])), asyncio.ensure_future(shared(["c"]))
    await asyncio.sleep(0)
    leaving.cancel()
    read.release.set()
    assert await asyncio.wait_for(staying, WAIT) == {"c": 2}
    assert await asyncio.wait_for(first, WAIT) == {"a": 1}
    assert leaving.cancelled()


@run_async
async def test_a_failed_read_fails_each_of_its_askers_and_the_next_ask_reads_again():
    calls = []

    def failing_once(keys: list[str]) -> dict[str, int]:
        calls.append(keys)
        if len(calls) == 1:
            raise RuntimeError("database away")
        return dict.fromkeys(keys, 1)

    shared = SharedRead(failing_once)
    failed = await asyncio.gather(shared(["a"]), shared(["b"]), return_exceptions=True)
    assert [type(answer) for answer in failed] == [RuntimeError, RuntimeError]
    assert await shared(["a"]) == {"a": 1}
    assert calls == [["a", "b"], ["a"]]


def test_reads_of_different_event_loops_are_kept_apart():
    read = GatedRead()
    read.release.set()
    shared = SharedRead(read)
    assert asyncio.run(shared(["a"])) == {"a": 1}
    assert asyncio.run(shared(["a"])) == {"a": 2}


@run_async
async def test_listeners_told_of_one_message_share_its_read_even_when_they_ask_later():
    read = GatedRead()
    read.release.set()
    shared = SharedRead(read)
    message = {"type": "task.events"}
    first = await shared.about(message, ["a", "b"])
    later = await shared.about(message, ["a", "b"])
    assert first == later == {"a": 1, "b": 1}
    assert read.calls == [["a", "b"]]


@run_async
async def test_another_message_with_the_same_content_gets_a_read_of_its_own():
    read = GatedRead()
    read.release.set()
    shared = SharedRead(read)
    assert await shared.about({"type": "task.events"}, ["a"]) == {"a": 1}
    assert await shared.about({"type": "task.events"}, ["a"]) == {"a": 2}
