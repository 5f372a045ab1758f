"""Benchmark of live updates to many /ws connections: what one user's crowd of clients costs the others.

    DATABASE_URL=postgres://... REDIS_URL=redis://... python bench/ws_fanout.py [--connections N] [--keys N]
        [--burst N]

Runs a live daphne server against a scratch PostgreSQL database
(`<name>_wsfanoutbench_<pid>`, dropped afterwards) with the Redis channel
layer. User A opens `--connections` /ws connections (1,000 by default,
spread over `--keys` API keys, 10 by default, so no key passes the
per-key limit), user B one. Tasks are submitted with `task_submit` from
this process, as an API server would; nobody runs them (no worker, no
scheduler), so each submission is one `task_update` to its owner's
connections.

It prints:
- how long opening A's connections took (50 handshakes at a time), and
  how many failed;
- B's latency, quiet: submission commit to B's `task_update`, median and
  p99 of 20 submissions of B's, with A's connections open and idle;
- B's latency in a burst: A submits `--burst` tasks (200 by default) from 4
  threads as fast as they go, and B submits one in the middle of it; and
  how long until every one of A's connections had been told of every task
  of the burst, and a `ping` to `pong` round trip of B's during the burst;
- the CPU time daphne spent per task update told (user + system, from
  /proc, so on Linux only).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from dispatch import System, cpu_seconds, percentile, scratch_services_given, scratch_system  # noqa: E402

HANDSHAKES_AT_ONCE = 50
QUIET_SUBMISSIONS = 20
BURST_THREADS = 4


class Listener:
    """One /ws connection: when each task id was first told (`task_update` or `task_complete`)."""

    def __init__(self, url: str, key: str) -> None:
        self.url = url
        self.key = key
        self.told: dict[str, float] = {}
        self.pongs: asyncio.Queue[float] = asyncio.Queue()
        self.connection: Any = None
        self.reading: asyncio.Task | None = None
        self.changed = asyncio.Event()

    async def open(self) -> None:
        from websockets.asyncio.client import connect

        self.connection = await connect(self.url, additional_headers={"X-API-Key": self.key}, open_timeout=60)
        self.reading = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for frame in self.connection:
            message = json.loads(frame)
            if message["type"] in ("task_update", "task_complete"):
                self.told.setdefault(message["task"]["id"], time.perf_counter())
                self.changed.set()
            elif message["type"] == "pong":
                self.pongs.put_nowait(time.perf_counter())

    async def wait_for(self, task_ids: set[str], timeout: float) -> bool:
        deadline = time.perf_counter() + timeout
        while not task_ids <= self.told.keys():
            self.changed.clear()
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self.changed.wait(), remaining)
            except TimeoutError:
                return False
        return True

    async def ping(self, timeout: float = 120) -> float:
        sent = time.perf_counter()
        await self.connection.send(json.dumps({"type": "ping"}))
        return await asyncio.wait_for(self.pongs.get(), timeout) - sent

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()
        if self.reading is not None:
            self.reading.cancel()


def submit(owner: Any, job_name: str) -> tuple[str, float]:
    """A queued task of `owner`'s, and the moment its transaction committed."""
    from django.db import transaction

    from tasks.services import task_submit

    committed: list[float] = []
    with transaction.atomic():
        # Registered before the submission's own hooks (its messages), so it runs first after COMMIT.
        transaction.on_commit(lambda: committed.append(time.perf_counter()))
        task = task_submit(owner=owner, job_name=job_name, entrypoint="true")
    return str(task.id), committed[0]


async def told_latency(listener: Listener, owner: Any) -> float:
    task_id, committed = await asyncio.to_thread(submit, owner, "b")
    if not await listener.wait_for({task_id}, timeout=120):
        raise RuntimeError("user B was never told of its task")
    return listener.told[task_id] - committed


def submit_burst(owner: Any, count: int) -> list[str]:
    from django.db import connection

    try:
        return [submit(owner, "burst")[0] for _ in range(count)]
    finally:
        connection.close()


async def run(args: argparse.Namespace, url: str, daphne_pid: int) -> None:
    from asgiref.sync import sync_to_async

    from fetchml.services import apikey_create, user_get_or_create

    @sync_to_async
    def make_users() -> tuple[Any, Any, list[str], str]:
        user_a, user_b = user_get_or_create(username="crowd"), user_get_or_create(username="other")
        keys_a = [apikey_create(user=user_a, name=f"crowd-{index}")[1] for index in range(args.keys)]
        return user_a, user_b, keys_a, apikey_create(user=user_b, name="other")[1]

    user_a, user_b, keys_a, key_b = await make_users()
    crowd = [Listener(url, keys_a[index % len(keys_a)]) for index in range(args.connections)]
    other = Listener(url, key_b)
    await other.open()
    started = time.perf_counter()
    failed = 0
    for start in range(0, len(crowd), HANDSHAKES_AT_ONCE):
        results = await asyncio.gather(
            *(listener.open() for listener in crowd[start : start + HANDSHAKES_AT_ONCE]), return_exceptions=True
        )
        failed += sum(isinstance(result, BaseException) for result in results)
    took = time.perf_counter() - started
    print(f"opened {len(crowd) - failed:,} of {len(crowd):,} connections of user A in {took:.1f} s")
    crowd = [listener for listener in crowd if listener.connection is not None]
    try:
        await told_latency(other, user_b)  # warm-up: first queries, first connections
        quiet = [await told_latency(other, user_b) for _ in range(QUIET_SUBMISSIONS)]
        print(
            f"user B told of its task, A's connections idle: p50 {statistics.median(quiet) * 1000:.1f} ms, "
            f"p99 {percentile(quiet, 0.99) * 1000:.1f} ms ({QUIET_SUBMISSIONS} tasks)"
        )

        cpu_before = cpu_seconds(daphne_pid)
        burst_started = time.perf_counter()
        per_thread = args.burst // BURST_THREADS
        burst = [asyncio.to_thread(submit_burst, user_a, per_thread) for _ in range(BURST_THREADS)]
        bursting = asyncio.gather(*burst)
        await asyncio.sleep(0.2)
        b_latency = await told_latency(other, user_b)
        pinged = await other.ping()
        burst_ids = {task_id for ids in await bursting for task_id in ids}
        submitted = time.perf_counter() - burst_started
        waits = await asyncio.gather(*(listener.wait_for(burst_ids, timeout=600) for listener in crowd))
        all_told = time.perf_counter() - burst_started
        cpu = cpu_seconds(daphne_pid) - cpu_before
        print(
            f"burst of {len(burst_ids):,} tasks of user A submitted in {submitted:.1f} s; "
            f"every one of A's connections told of every one after {all_told:.1f} s "
            f"({sum(waits):,} of {len(crowd):,} connections told of all)"
        )
        print(
            f"user B told of its task during the burst: {b_latency * 1000:.0f} ms; ping to pong {pinged * 1000:.0f} ms"
        )
        updates = len(burst_ids) * len(crowd) + 1
        print(f"daphne CPU: {cpu:.1f} s, {cpu / updates * 1e6:.0f} us per task update told")
    finally:
        await asyncio.gather(*(listener.close() for listener in [*crowd, other]), return_exceptions=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1_000, metavar="N", help="user A's connections")
    parser.add_argument("--keys", type=int, default=10, metavar="N", help="API keys A's connections share")
    parser.add_argument("--burst", type=int, default=200, metavar="N", help="tasks user A submits in the burst")
    args = parser.parse_args()
    if not scratch_services_given():
        return 2
    with scratch_system("wsfanoutbench") as env:
        print(f"machine: {os.cpu_count()} cores; PostgreSQL + Redis; one daphne process")
        with System(env, scheduler=False) as system:
            asyncio.run(run(args, f"ws://127.0.0.1:{system.ports[0]}/ws", system.children[0].pid))
    return 0


if __name__ == "__main__":
    sys.exit(main())
