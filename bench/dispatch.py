"""Benchmark of dispatch through the real system: throughput, enqueue-to-assignment latency, round cost.

    DATABASE_URL=postgres://... REDIS_URL=redis://... python bench/dispatch.py [--quick]

Runs a live daphne server and a `manage.py scheduler` process against a scratch
PostgreSQL database (`<name>_dispatchbench_<pid>`, created next to the one in
DATABASE_URL and dropped afterwards) with the Redis channel layer. Benchmark
workers are WebSocket clients in this process speaking the worker protocol;
they ack and complete each assignment at once instead of running a process,
so the figures are the scheduler's, the channel layer's and the protocol's.

- throughput: N tasks inserted queued at once, time until all are completed;
- latency: tasks submitted with `task_submit` at 50 and 200 per second to idle
  workers, time from the submitting commit to the `assign` frame at a worker;
- round cost: one `dispatch_round` (placing a full batch) at queue depths of
  1k, 100k and 1M rows (bulk-inserted with INSERT ... SELECT generate_series).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

WORKERS = 4
SLOTS_PER_WORKER = 32
SERVER_ENV = {
    "DJANGO_SECRET_KEY": "dispatch-bench-only",
    "DJANGO_DEBUG": "true",
    "FETCHML_LOG_LEVEL": "WARNING",
    "FETCHML_SCHEDULER_BATCH_SIZE": "128",
    "FETCHML_RATE_LIMIT_POST": "1000000/m",
    "FETCHML_RATE_LIMIT_GET": "1000000/m",
}


def scratch_postgres(url: str) -> tuple[str, Callable[[], None]]:
    """DATABASE_URL of a new scratch database, and how to drop it."""
    from urllib.parse import urlsplit, urlunsplit

    import psycopg

    parts = urlsplit(url)
    name = f"{(parts.path.lstrip('/') or 'postgres')}_dispatchbench_{os.getpid()}"
    admin_url = urlunsplit(parts._replace(path="/postgres", query=""))
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        from django.db import connections

        connections.close_all()
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return urlunsplit(parts._replace(path=f"/{name}")), drop


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class BenchWorker:
    """A worker-protocol client that completes each assignment at once, noting when it arrived."""

    def __init__(self, url: str, key: str, name: str, arrivals: dict[str, float]) -> None:
        self.url, self.key, self.name, self.arrivals = url, key, name, arrivals
        self.ready = asyncio.Event()
        self.completed = 0

    async def run(self, stop: asyncio.Event) -> None:
        from websockets.asyncio.client import connect

        from scheduler.agent import protocol

        async with connect(self.url, additional_headers={"X-API-Key": self.key}, max_queue=None) as ws:
            capabilities = {"cpu_cores": 64, "memory_gb": 256, "gpu_count": 0, "gpu_type": ""}
            capabilities |= {"batch_slots": SLOTS_PER_WORKER, "service_slots": 0}
            hello = protocol.hello(name=self.name, hostname="127.0.0.1", capabilities=capabilities, running=[])
            await ws.send(protocol.encode(hello))
            welcome = protocol.decode(await ws.recv())
            beat = asyncio.create_task(self._heartbeat(ws, float(welcome["heartbeat_seconds"])))
            self.ready.set()
            receiving = asyncio.ensure_future(ws.recv())
            stopping = asyncio.ensure_future(stop.wait())
            try:
                while True:
                    done, _ = await asyncio.wait({receiving, stopping}, return_when=asyncio.FIRST_COMPLETED)
                    if stopping in done:
                        break
                    message = protocol.decode(receiving.result())
                    receiving = asyncio.ensure_future(ws.recv())
                    if message["type"] != "assign":
                        continue
                    task_id, token = message["task_id"], message["token"]
                    self.arrivals.setdefault(task_id, time.perf_counter())
                    await ws.send(protocol.encode(protocol.ack(task_id=task_id, token=token)))
                    final = protocol.status(task_id=task_id, token=token, status="completed", exit_code=0)
                    await ws.send(protocol.encode(final))
                    self.completed += 1
            finally:
                receiving.cancel()
                stopping.cancel()
                beat.cancel()

    async def _heartbeat(self, ws: Any, every: float) -> None:
        from scheduler.agent import protocol

        while True:
            await ws.send(protocol.encode(protocol.heartbeat(running=[])))
            await asyncio.sleep(every)


class System:
    """daphne + one scheduler process on the scratch database; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, env: dict[str, str]) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.env = env
        self.children: list[subprocess.Popen] = []

    def __enter__(self) -> System:
        python = sys.executable
        daphne = [python, "-m", "daphne", "-b", "127.0.0.1", "-p", str(self.port), "fetchml.asgi:application"]
        for command in (daphne, [python, "manage.py", "scheduler"]):
            self.children.append(subprocess.Popen(command, cwd=REPO_ROOT, env=self.env))
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                if time.monotonic() > deadline or any(child.poll() is not None for child in self.children):
                    self.__exit__()
                    raise RuntimeError("the server did not start") from None
                time.sleep(0.1)

    def __exit__(self, *exc_info: object) -> None:
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in self.children:
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def insert_queued(owner: Any, count: int) -> None:
    """`count` queued no-op tasks in one statement (a template row copied by generate_series)."""
    from django.db import connection

    from tasks.models import Task

    template = Task.objects.create(owner=owner, job_name="bench", entrypoint="true")
    columns = [f.column for f in Task._meta.concrete_fields if f.column != "id"]
    names = ", ".join(columns)
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {Task._meta.db_table} (id, {names}) "  # column names come from the model
            f"SELECT gen_random_uuid(), {names} FROM {Task._meta.db_table}, generate_series(1, %s) "
            "WHERE id = %s",
            [count - 1, template.id],
        )


def completed_count() -> int:
    from tasks.models import Task

    return Task.objects.filter(status="completed").count()


async def measure_throughput(owner: Any, count: int) -> float:
    from asgiref.sync import sync_to_async

    from fetchml import events

    await sync_to_async(insert_queued)(owner, count)
    base = await sync_to_async(completed_count)()
    started = time.perf_counter()
    await sync_to_async(events.send_now)([events.WAKE_GROUP], {"type": "scheduler.wake", "reason": "bench"})
    while await sync_to_async(completed_count)() - base < count:
        await asyncio.sleep(0.05)
    return count / (time.perf_counter() - started)


async def measure_latency(owner: Any, rate: float, count: int, arrivals: dict[str, float]) -> list[float]:
    """Submit `count` tasks at `rate`/s (each its own committed transaction); latency of each, ms."""
    from asgiref.sync import sync_to_async

    from tasks.services import task_submit

    submitted: dict[str, float] = {}

    def submit() -> None:
        task = task_submit(owner=owner, job_name="latency", entrypoint="true")
        submitted[str(task.id)] = time.perf_counter()  # after the commit: the task is visible

    started = time.perf_counter()
    for index in range(count):
        delay = started + index / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await sync_to_async(submit)()
    deadline = time.perf_counter() + 60
    while any(task_id not in arrivals for task_id in submitted) and time.perf_counter() < deadline:
        await asyncio.sleep(0.02)
    return [(arrivals[t] - at) * 1000 for t, at in submitted.items() if t in arrivals]


def round_cost(owner: Any, depth: int, rounds: int) -> float:
    """Median ms of one dispatch round placing a full batch, with `depth` tasks queued."""
    from django.db.models import Count

    from scheduler.dispatch import dispatch_round
    from scheduler.models import Worker
    from tasks.models import Task

    Worker.objects.update(status=Worker.Status.OFFLINE)
    have = Task.objects.filter(status="queued").aggregate(n=Count("id"))["n"]
    if depth > have:
        insert_queued(owner, depth - have)
    worker, _ = Worker.objects.update_or_create(
        name="round-cost", defaults={"status": Worker.Status.ACTIVE, "cpu_cores": 1024, "memory_gb": 4096}
    )
    timings = []
    for _ in range(rounds):
        Worker.objects.filter(id=worker.id).update(batch_slots=128, used_batch_slots=0, used_cpu=0, used_memory_gb=0)
        started = time.perf_counter()
        placed = dispatch_round(batch_size=128)
        timings.append((time.perf_counter() - started) * 1000)
        assert placed == 128, placed
    return statistics.median(timings)


async def run_system(args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    from asgiref.sync import sync_to_async

    from fetchml.services import apikey_create, user_get_or_create

    owner = await sync_to_async(user_get_or_create)(username="bench")
    agent = await sync_to_async(user_get_or_create)(username="bench-workers")
    _, key = await sync_to_async(apikey_create)(user=agent, role="worker", name="bench")
    results: dict[str, Any] = {}
    with System(env) as system:
        arrivals: dict[str, float] = {}
        url = f"ws://127.0.0.1:{system.port}/ws/worker"
        workers = [BenchWorker(url, key, f"bench-{i}", arrivals) for i in range(WORKERS)]
        stop = asyncio.Event()
        running = [asyncio.create_task(worker.run(stop)) for worker in workers]
        await asyncio.wait_for(asyncio.gather(*(w.ready.wait() for w in workers)), timeout=30)
        try:
            results["throughput"] = await measure_throughput(owner, args.tasks)
            print(f"throughput: {results['throughput']:,.0f} tasks/s ({args.tasks:,} tasks queued -> completed)")
            for rate in (50, 200):
                latencies = await measure_latency(owner, rate, args.latency_tasks, arrivals)
                p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
                results[f"latency_{rate}"] = (p50, p99)
                print(
                    f"enqueue -> assign at {rate}/s: p50 {p50:.1f} ms, p99 {p99:.1f} ms "
                    f"({len(latencies)}/{args.latency_tasks} assigned)"
                )
        finally:
            stop.set()
            await asyncio.gather(*running, return_exceptions=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer tasks; round cost up to 100k rows only")
    args = parser.parse_args()
    args.tasks = 2_000 if args.quick else 10_000
    args.latency_tasks = 200 if args.quick else 1_000
    depths = [1_000, 100_000] if args.quick else [1_000, 100_000, 1_000_000]

    url, redis_url = os.environ.get("DATABASE_URL", ""), os.environ.get("REDIS_URL", "")
    if not url.startswith(("postgres://", "postgresql://")) or not redis_url:
        print("needs DATABASE_URL=postgres://... and REDIS_URL=redis://... (a scratch database is created)")
        return 2
    scratch_url, drop = scratch_postgres(url)
    var_dir = tempfile.TemporaryDirectory(prefix="fetchml-dispatchbench-")
    env = {**os.environ, **SERVER_ENV, "DATABASE_URL": scratch_url, "FETCHML_VAR_DIR": var_dir.name}
    os.environ.update(env)
    os.environ["DJANGO_SETTINGS_MODULE"] = "fetchml.settings"
    try:
        import django

        django.setup()
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
        print(
            f"machine: {os.cpu_count()} cores; PostgreSQL + Redis; {WORKERS} bench workers x {SLOTS_PER_WORKER} slots"
        )
        results = asyncio.run(run_system(args, env))
        from fetchml.services import user_get_or_create

        owner = user_get_or_create(username="bench")
        for depth in depths:
            cost = round_cost(owner, depth, rounds=5)
            results[f"round_{depth}"] = cost
            print(f"dispatch round (128 placed) at queue depth {depth:>9,}: {cost:.1f} ms")
    finally:
        drop()
        var_dir.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
