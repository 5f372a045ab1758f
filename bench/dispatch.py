"""Benchmark of dispatch through the real system: throughput, enqueue-to-assignment latency, round cost.

    DATABASE_URL=postgres://... REDIS_URL=redis://... python bench/dispatch.py [--quick] [--mixed]
        [--compare procrastinate] [--pairs N] [--slots N] [--servers N]

Runs a live daphne server (`--servers N`: N of them, the bench workers spread
over them) and a `manage.py scheduler` process against a scratch
PostgreSQL database (`<name>_dispatchbench_<pid>`, created next to the one in
DATABASE_URL and dropped afterwards) with the Redis channel layer. Benchmark
workers are WebSocket clients in this process speaking the worker protocol;
they ack and complete each assignment at once instead of running a process,
so the figures are the scheduler's, the channel layer's and the protocol's.

- throughput: N tasks inserted queued at once, time until all are completed
  (4 bench workers with 32 batch slots each, `--slots` to change it), as
  the server's `status_ack`s of the last nodes' `completed` say (sent after
  the commit; no progress query competes with the system measured); after
  an unmeasured warm-up of 1,000 tasks, measured `--pairs` times (3; 1 with
  `--quick`), the median being the figure; the scratch database is analysed
  inside the measured time, as autovacuum would after such a burst;
- latency: tasks submitted with `task_submit` at 50 and 200 per second to idle
  workers (from a process of their own, as from an API server), time from the
  submitting commit to the `assign` frame at a worker
  (and from the start of the submitting call: a submission that finds a free
  worker runs the dispatch round itself, before its commit);
- round cost: one `dispatch_round` (placing a full batch) at queue depths of
  1k, 100k and 1M rows (bulk-inserted with INSERT ... SELECT generate_series);
- fleet size: one `task_submit` placed at once by its own round (median of
  200) and one `dispatch_round` placing 32 tasks (median of 20), in this
  process, with 1, 100 and 1,000 idle workers, on the emptied queue before
  the round costs at depth fill it;
- with each throughput figure, the CPU time per task of each part (daphne, the
  scheduler, the scratch database's PostgreSQL backends, Redis, this process),
  read from /proc (Linux only).

`--mixed` adds a mixed workload on a second set of 4 bench workers (8 GPUs
each): two active reservations (booked with `reservation_create`) hold GPUs
and a batch slot on 3 of them, and every 10th task is a 2-node gang job (each
node gets its own `assign` with its rank; the task completes when both nodes
reported `completed`). It prints throughput and enqueue-to-assign latency at
50/s, a gang task counting as assigned when its last node's `assign` arrives.

`--compare procrastinate` runs the same no-op workload through procrastinate
(`pip install -r requirements/bench.txt`; app and tasks in
bench/procrastinate_app.py) on its own scratch database
(`<name>_procrastinatebench_<pid>`), up at the same time as FetchML's system:
10,000 jobs deferred in one batch to 4 idle `procrastinate worker`
processes, time until all succeeded (warmed up and analysed alike, and
measured in turns with FetchML's throughput, each pair giving a ratio and
the median ratio the figure); and
enqueue-to-start latency at 50 and 200 jobs/s (from the return of each
job's `defer_async`, i.e. its commit, to the first line of the job function;
and from the start of that call);
and the CPU time per job of its workers, its backends and this process.
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import contextlib
import importlib.util
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Self

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(REPO_ROOT))

WORKERS = 4
SLOTS_PER_WORKER = 32
SERVER_ENV = {
    "DJANGO_SECRET_KEY": "dispatch-bench-only",
    # Production settings (DEBUG off: no query log); the bench speaks plain ws:// and HTTP to 127.0.0.1.
    "DJANGO_DEBUG": "false",
    "DJANGO_SECURE_SSL_REDIRECT": "false",
    "FETCHML_LOG_LEVEL": "WARNING",
    "FETCHML_SCHEDULER_BATCH_SIZE": "128",
    "FETCHML_RATE_LIMIT_POST": "1000000/m",
    "FETCHML_RATE_LIMIT_GET": "1000000/m",
}

# Unmeasured submissions a fresh submitting process makes first (see `submitter_process`).
SUBMITTER_WARM_UP = 10

# --mixed: GPU workers (so that reservations can hold part of the fleet), every 10th task on 2 nodes.
MIXED_GPUS_PER_WORKER = 8
MIXED_GPU_TYPE = "BENCH"
MIXED_MULTI_NODE_EVERY = 10
MIXED_RESERVATIONS = ({"gpu_count": 4, "node_count": 1}, {"gpu_count": 8, "node_count": 2})

# Unmeasured tasks (jobs) each system runs before its throughput is measured: a server's first
# statements compile and plan its queries, open its connections and fill its caches.
WARM_UP_TASKS = 1_000

# Idle workers registered while the cost of a submission and of a round is measured.
FLEET_SIZES = (1, 100, 1_000)

# --compare procrastinate
PROCRASTINATE_WORKERS = 4
PROCRASTINATE_JOBS = 10_000
PROCRASTINATE_INSTALL = "pip install -r requirements/bench.txt"


def scratch_postgres(url: str, purpose: str = "dispatchbench") -> tuple[str, Callable[[], None]]:
    """DATABASE_URL of a new scratch database, and how to drop it."""
    from urllib.parse import urlsplit, urlunsplit

    import psycopg

    parts = urlsplit(url)
    name = f"{(parts.path.lstrip('/') or 'postgres')}_{purpose}_{os.getpid()}"
    admin_url = urlunsplit(parts._replace(path="/postgres", query=""))
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        from django.db import connections

        connections.close_all()
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return urlunsplit(parts._replace(path=f"/{name}")), drop


def scratch_services_given() -> bool:
    """Whether DATABASE_URL and REDIS_URL name PostgreSQL and Redis (saying what is missing if not)."""
    url, redis_url = os.environ.get("DATABASE_URL", ""), os.environ.get("REDIS_URL", "")
    if url.startswith(("postgres://", "postgresql://")) and redis_url:
        return True
    print("needs DATABASE_URL=postgres://... and REDIS_URL=redis://... (a scratch database is created)")
    return False


@contextlib.contextmanager
def scratch_system(purpose: str) -> Iterator[dict[str, str]]:
    """A migrated scratch database beside DATABASE_URL's and a state directory, both removed after;
    Django set up on them in this process. Yields the environment of the system's processes."""
    scratch_url, drop = scratch_postgres(os.environ["DATABASE_URL"], purpose)
    var_dir = tempfile.TemporaryDirectory(prefix=f"fetchml-{purpose}-")
    env = {**os.environ, **SERVER_ENV, "DATABASE_URL": scratch_url, "FETCHML_VAR_DIR": var_dir.name}
    os.environ.update(env)
    os.environ["DJANGO_SETTINGS_MODULE"] = "fetchml.settings"
    try:
        import django

        django.setup()
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
        yield env
    finally:
        drop()
        var_dir.cleanup()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class Completions:
    """Tasks the server has recorded completed, counted from its answers: a `status_ack` accepting a
    node's `completed` is sent after the commit that stored it, and a task is complete with its last
    node. The bench's progress, with no query competing with the system it measures."""

    def __init__(self) -> None:
        self.count = 0
        self.changed = asyncio.Event()
        self._nodes_left: dict[str, int] = {}

    def assigned(self, task_id: str, nodes: int) -> None:
        self._nodes_left.setdefault(task_id, nodes)

    def node_completed(self, task_id: str) -> None:
        left = self._nodes_left.pop(task_id, 1) - 1
        if left:
            self._nodes_left[task_id] = left
            return
        self.count += 1
        self.changed.set()

    async def reached(self, count: int, *, stalled_after: float) -> None:
        """Until `count` tasks completed; raises if none completes for `stalled_after` seconds."""
        while self.count < count:
            self.changed.clear()
            before = self.count
            try:
                await asyncio.wait_for(self.changed.wait(), timeout=stalled_after)
            except TimeoutError:
                raise RuntimeError(f"no task completed for {stalled_after:.0f} s ({before:,} completed)") from None


class BenchWorker:
    """A worker-protocol client that completes each assignment at once, noting when it arrived.

    `arrivals[task_id]` lists the arrival times of the task's node assignments
    (one per node of a multi-node task, each node on its own worker). A
    re-sent `assign` (same token) is acknowledged again but never completed
    twice. The answers to one frame (a `batch` of assigns) go back in one
    `batch` frame when the server accepts those, as the agent sends what it
    queued together. Like the agent, it re-sends a final `status` with each
    heartbeat until the server answers `status_ack` (a report the server could
    not apply gets `error` SERVER_ERROR, counted in `server_errors`); `stop`
    forgets the run; `drain` needs nothing from a client that runs nothing.
    """

    def __init__(
        self,
        url: str,
        key: str,
        name: str,
        arrivals: dict[str, list[float]],
        completions: Completions,
        gpus: int = 0,
        gpu_type: str = "",
        slots: int = SLOTS_PER_WORKER,
    ) -> None:
        self.url, self.key, self.name, self.arrivals, self.completions = url, key, name, arrivals, completions
        self.gpus, self.gpu_type, self.slots = gpus, gpu_type, slots
        self.ready = asyncio.Event()
        self.tokens: set[str] = set()
        self.unacked: dict[str, tuple[dict[str, Any], float]] = {}  # token -> (final status, when sent)
        self.server_errors = 0

    async def run(self, stop: asyncio.Event) -> None:
        from websockets.asyncio.client import connect

        from scheduler.agent import protocol

        async with connect(self.url, additional_headers={"X-API-Key": self.key}, max_queue=None) as ws:
            capabilities = {"cpu_cores": 64, "memory_gb": 256, "gpu_count": self.gpus, "gpu_type": self.gpu_type}
            capabilities |= {"batch_slots": self.slots, "service_slots": 0}
            hello = protocol.hello(
                name=self.name, instance=uuid.uuid4().hex, hostname="127.0.0.1", capabilities=capabilities, running=[]
            )
            await ws.send(protocol.encode(hello))
            welcome = protocol.decode(await ws.recv())
            batches = protocol.BATCH in (welcome.get("features") or [])
            beat = asyncio.create_task(self._heartbeat(ws, float(welcome["heartbeat_seconds"])))
            self.ready.set()
            receiving = asyncio.ensure_future(ws.recv())
            stopping = asyncio.ensure_future(stop.wait())
            try:
                while True:
                    done, _ = await asyncio.wait({receiving, stopping}, return_when=asyncio.FIRST_COMPLETED)
                    if stopping in done:
                        break
                    replies = []
                    for message in protocol.decode_frame(receiving.result()):
                        replies.extend(self._answer(message))
                    receiving = asyncio.ensure_future(ws.recv())
                    for text, _ in protocol.frames(replies, batches=batches):
                        await ws.send(text)
            finally:
                receiving.cancel()
                stopping.cancel()
                beat.cancel()

    def _answer(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        """What to send back for one server message: an `assign` is acked and completed at once."""
        from scheduler.agent import protocol

        kind = message.get("type") if isinstance(message, dict) else None
        if kind in ("status_ack", "stop"):
            settled = self.unacked.pop(message.get("token", ""), None)
            if settled is not None and kind == "status_ack" and message.get("accepted"):
                self.completions.node_completed(message["task_id"])
        elif kind == "error":
            self.server_errors += message.get("code") == "SERVER_ERROR"
        if kind != "assign":
            return []
        arrived = time.perf_counter()
        task_id, token = message["task_id"], message["token"]
        ack = protocol.ack(task_id=task_id, token=token)
        if token in self.tokens:
            return [ack]  # a re-sent assign: acknowledged again, run once
        self.tokens.add(token)
        self.arrivals.setdefault(task_id, []).append(arrived)
        self.completions.assigned(task_id, message["node"]["count"])
        final = protocol.status(task_id=task_id, token=token, status="completed", exit_code=0)
        self.unacked[token] = (final, time.monotonic())
        return [ack, final]

    async def _heartbeat(self, ws: Any, every: float) -> None:
        from scheduler.agent import protocol

        while True:
            await ws.send(protocol.encode(protocol.heartbeat(running=[])))
            now = time.monotonic()
            for token, (final, sent_at) in list(self.unacked.items()):
                if now - sent_at >= every:
                    self.unacked[token] = (final, now)
                    await ws.send(protocol.encode(final))
            await asyncio.sleep(every)


class Fleet:
    """A set of bench workers connected for the duration of a `async with`."""

    def __init__(self, workers: list[BenchWorker]) -> None:
        self.workers = workers
        self.stop = asyncio.Event()
        self.running: list[asyncio.Task] = []

    async def __aenter__(self) -> Fleet:
        self.running = [asyncio.create_task(worker.run(self.stop)) for worker in self.workers]
        ready = asyncio.ensure_future(asyncio.gather(*(worker.ready.wait() for worker in self.workers)))
        await asyncio.wait({ready, *self.running}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if not all(worker.ready.is_set() for worker in self.workers):
            await self.__aexit__()
            failed = [task.exception() for task in self.running if task.done() and task.exception()]
            raise RuntimeError(f"bench workers did not connect: {failed}")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.stop.set()
        await asyncio.gather(*self.running, return_exceptions=True)


class System:
    """`servers` daphne processes and one scheduler process (unless `scheduler` is false) on the scratch
    database; stopped with SIGTERM, then SIGKILL. Bench workers are spread over the daphne processes, as a load
    balancer in front of them would."""

    def __init__(self, env: dict[str, str], servers: int = 1, *, scheduler: bool = True) -> None:
        self.ports = [free_port() for _ in range(servers)]
        self.env = env
        self.scheduler = scheduler
        self.children: list[subprocess.Popen] = []

    def worker_url(self, index: int) -> str:
        return f"ws://127.0.0.1:{self.ports[index % len(self.ports)]}/ws/worker"

    def __enter__(self) -> System:
        python = sys.executable
        commands = [
            [python, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "fetchml.asgi:application"]
            for port in self.ports
        ]
        if self.scheduler:
            commands.append([python, "manage.py", "scheduler"])
        for command in commands:
            self.children.append(subprocess.Popen(command, cwd=REPO_ROOT, env=self.env))
        deadline = time.monotonic() + 60
        for port in self.ports:
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1):
                        break
                except OSError:
                    if time.monotonic() > deadline or any(child.poll() is not None for child in self.children):
                        self.__exit__()
                        raise RuntimeError("the server did not start") from None
                    time.sleep(0.1)
        return self

    def __exit__(self, *exc_info: object) -> None:
        stop_children(self.children)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_children(children: list[subprocess.Popen]) -> None:
    """SIGTERM to each child still running, SIGKILL to any not gone 15 s later."""
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for child in children:
        try:
            child.wait(timeout=15)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def insert_queued(owner: Any, count: int, multi_node_every: int = 0) -> None:
    """`count` queued no-op tasks in one statement (a template row copied by generate_series).

    With `multi_node_every` N, every N-th copy has `node_count` 2, and the
    copies are queued a microsecond apart so that the gang tasks are spread
    through the dispatch order instead of tied with the rest.
    """
    from django.db import connection

    from tasks.models import Task

    template = Task.objects.create(owner=owner, job_name="bench", entrypoint="true")
    columns = [f.column for f in Task._meta.concrete_fields if f.column != "id"]
    names = ", ".join(columns)
    values = names
    if multi_node_every:
        spread = {
            "node_count": f"CASE WHEN g %% {int(multi_node_every)} = 0 THEN 2 ELSE node_count END",
            "created_at": "created_at + g * interval '1 microsecond'",
            "queued_at": "queued_at + g * interval '1 microsecond'",
        }
        values = ", ".join(spread.get(column, column) for column in columns)
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {Task._meta.db_table} (id, {names}) "  # column names come from the model
            f"SELECT gen_random_uuid(), {values} FROM {Task._meta.db_table}, generate_series(1, %s) AS g "
            "WHERE id = %s",
            [count - 1, template.id],
        )


# CPU time (user + system) per task of each part of a system, from /proc (Linux; elsewhere nothing is
# read): what a task costs where, a figure far steadier than wall-clock throughput on a shared machine,
# and how many tasks/s the machine's cores could do at that cost.
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
BACKENDS_SQL = "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def cpu_snapshot(parts: dict[str, list[int]]) -> dict[int, float]:
    return {pid: cpu_seconds(pid) for pids in parts.values() for pid in pids}


def cpu_per_task(parts: dict[str, list[int]], before: dict[int, float], tasks: int) -> dict[str, float]:
    """ms of CPU per task of each part since `before` (a process started since counts from zero)."""
    return {
        part: sum(cpu_seconds(pid) - before.get(pid, 0.0) for pid in pids) * 1000 / tasks
        for part, pids in parts.items()
    }


def redis_pids() -> list[int]:
    import redis

    try:
        return [int(redis.Redis.from_url(os.environ["REDIS_URL"]).info("server")["process_id"])]
    except Exception:
        return []


def system_parts(system: System) -> dict[str, list[int]]:
    """FetchML's parts: daphne, the scheduler, the PostgreSQL backends of the scratch database, Redis,
    and this process (the bench clients, the inserts and the progress queries)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(BACKENDS_SQL)
        backends = [pid for (pid,) in cursor.fetchall()]
    *servers, scheduler = system.children
    return {
        "daphne": [child.pid for child in servers],
        "scheduler": [scheduler.pid],
        "PostgreSQL": backends,
        "Redis": redis_pids(),
        "bench": [os.getpid()],
    }


def print_cpu_per_task(label: str, cost: dict[str, float]) -> None:
    total = sum(cost.values())
    if not total:
        print(f"{label}: not measurable here (needs /proc)")
        return
    parts = ", ".join(f"{part} {ms:.2f}" for part, ms in cost.items())
    cores = os.cpu_count() or 1
    print(f"{label} (ms): {parts}; total {total:.2f} (at this cost {cores} cores do {cores * 1000 / total:,.0f}/s)")


def completed_count() -> int:
    from tasks.models import Task

    return Task.objects.filter(status="completed").count()


def unfinished_count() -> int:
    from tasks.models import Task

    return Task.objects.exclude(status__in=("completed", "failed", "cancelled")).count()


def analyze() -> None:
    """The scratch database's tables analysed, inside the measured time (for procrastinate too), as a
    production server's autovacuum would soon after a burst of inserts: this machine's PostgreSQL may
    run without it (CI's configuration), and procrastinate's fetch, planned on a table never analysed,
    scans its queue: 4.5 ms of PostgreSQL's CPU a job instead of 1 (measured)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")


async def measure_throughput(
    owner: Any, count: int, completions: Completions, multi_node_every: int = 0, system: System | None = None
) -> tuple[float, dict[str, float]]:
    """Tasks/s from queued to completed, and (with `system`) the CPU each of its parts spent per task."""
    from asgiref.sync import sync_to_async

    from fetchml import events

    # Counted before the insert: a scheduler pass may complete the first inserted row
    # (the template the others are copied from) before the copies are in.
    base, stored_base = completions.count, await sync_to_async(completed_count)()
    parts = await sync_to_async(system_parts)(system) if system else {}
    cpu_before = cpu_snapshot(parts)
    await sync_to_async(insert_queued)(owner, count, multi_node_every)
    started = time.perf_counter()
    await sync_to_async(events.send_now)([events.WAKE_GROUP], {"type": "scheduler.wake", "reason": "bench"})
    await sync_to_async(analyze)()
    await completions.reached(base + count, stalled_after=180)
    throughput = count / (time.perf_counter() - started)
    if system:  # with the backends that connected meanwhile
        parts = await sync_to_async(system_parts)(system)
    cost = cpu_per_task(parts, cpu_before, count)
    stored = await sync_to_async(completed_count)() - stored_base
    if stored < count:
        raise RuntimeError(f"the server acknowledged {count:,} completions but stored {stored:,}")
    return throughput, cost


async def measure_latency(
    owner: Any, rate: float, count: int, arrivals: dict[str, list[float]], multi_node_every: int = 0
) -> dict[str, list[float]]:
    """Submit `count` tasks at `rate`/s (each its own committed transaction); latency of each, ms:
    `commit` from the submitting commit, `call` from the start of the submitting call (which
    includes the dispatch round a submission runs while a worker is free).

    The submissions come from a process of their own, as from an API server: in this one,
    the submitter's event loop would also be the bench workers' (its task events, sent after
    each `assign`, would delay the workers' reading of it). A task is assigned when all its
    nodes' `assign` frames arrived (with `multi_node_every` N, every N-th task has two nodes).
    """
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    receiving, sending = context.Pipe(duplex=False)
    submitter = context.Process(
        target=submitter_process, args=(sending, owner.pk, rate, count, multi_node_every), daemon=True
    )
    submitter.start()
    sending.close()
    loop = asyncio.get_running_loop()
    try:
        # (task id, call, commit, nodes) per submission, perf_counter: CLOCK_MONOTONIC, shared by the processes.
        submitted = {row[0]: row[1:] for row in await loop.run_in_executor(None, _received, receiving, 120)}
    finally:
        submitter.join(timeout=15)
        if submitter.is_alive():
            submitter.kill()

    def assigned(task_id: str) -> bool:
        return len(arrivals.get(task_id, ())) >= submitted[task_id][2]

    deadline = time.perf_counter() + 60
    while not all(assigned(task_id) for task_id in submitted) and time.perf_counter() < deadline:
        await asyncio.sleep(0.02)
    done = {task_id: max(arrivals[task_id]) for task_id in submitted if assigned(task_id)}
    return {
        "commit": [(at - submitted[task_id][1]) * 1000 for task_id, at in done.items()],
        "call": [(at - submitted[task_id][0]) * 1000 for task_id, at in done.items()],
    }


def _received(connection: Any, timeout: float) -> Any:
    if not connection.poll(timeout):
        raise RuntimeError(f"the submitting process sent nothing within {timeout:.0f} s")
    return connection.recv()


def submitter_process(connection: Any, owner_pk: Any, rate: float, count: int, multi_node_every: int) -> None:
    """The submitting side of `measure_latency`, in a process of its own (the environment is the bench's):
    sync submissions from an event loop's thread pool, as an ASGI server runs its views."""
    import django

    django.setup()
    from asgiref.sync import sync_to_async
    from django.contrib.auth import get_user_model
    from django.db import transaction

    from tasks.services import task_submit

    owner = get_user_model().objects.get(pk=owner_pk)
    submitted: list[tuple[str, float, float, int]] = []

    def submit(nodes: int) -> None:
        called = time.perf_counter()
        committed: list[float] = []
        with transaction.atomic():
            # Registered before the submission's own hooks (its messages), so it runs first after COMMIT.
            transaction.on_commit(lambda: committed.append(time.perf_counter()))
            task = task_submit(owner=owner, job_name="latency", entrypoint="true", node_count=nodes)
        submitted.append((str(task.id), called, committed[0], nodes))

    async def submit_all() -> None:
        # A fresh process compiles its queries and opens its connections on its first submissions.
        for _ in range(SUBMITTER_WARM_UP):
            await sync_to_async(submit)(1)
            await asyncio.sleep(1 / rate)
        del submitted[:]
        started = time.perf_counter()
        for index in range(count):
            delay = started + index / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            nodes = 2 if multi_node_every and index % multi_node_every == multi_node_every - 1 else 1
            await sync_to_async(submit)(nodes)

    asyncio.run(submit_all())
    connection.send(submitted)
    connection.close()


async def wait_until_idle(timeout: float = 120) -> None:
    """Until every task is final (the latency tasks' completions may still be in flight)."""
    from asgiref.sync import sync_to_async

    deadline = time.perf_counter() + timeout
    while await sync_to_async(unfinished_count)() and time.perf_counter() < deadline:
        await asyncio.sleep(0.1)


def round_cost(owner: Any, depth: int, rounds: int) -> float:
    """Median ms of one dispatch round placing a full batch, with `depth` tasks queued."""
    from django.db.models import Count

    from scheduler.dispatch import dispatch_round
    from scheduler.models import Worker
    from tasks.models import Task

    Worker.objects.update(status=Worker.Status.OFFLINE)
    have = Task.objects.filter(status="queued").aggregate(n=Count("id"))["n"]
    if depth > have:
        # Measured right after the burst, before autovacuum has analysed it: the round's reads
        # of the queue must not depend on the planner's statistics (scheduler/dispatch.py).
        insert_queued(owner, depth - have)
    worker, _ = Worker.objects.update_or_create(
        name="round-cost",
        # A channel name: a worker without a connection is given no work.
        defaults={
            "status": Worker.Status.ACTIVE,
            "channel_name": "bench!round-cost",
            "cpu_cores": 1024,
            "memory_gb": 4096,
        },
    )
    timings = []
    for _ in range(rounds):
        Worker.objects.filter(id=worker.id).update(batch_slots=128, used_batch_slots=0, used_cpu=0, used_memory_gb=0)
        started = time.perf_counter()
        placed = dispatch_round(batch_size=128)
        timings.append((time.perf_counter() - started) * 1000)
        assert placed == 128, placed
    return statistics.median(timings)


def idle_fleet(idle_workers: int) -> None:
    """Exactly `idle_workers` active workers, alike and with room for any number of tasks."""
    from scheduler.models import Worker

    Worker.objects.update(status=Worker.Status.OFFLINE)
    have = Worker.objects.filter(name__startswith="idle-").count()
    Worker.objects.bulk_create(
        # A channel name: a worker without a connection is given no work.
        Worker(name=f"idle-{index:05}", channel_name=f"bench!{index}", cpu_cores=8, memory_gb=32, batch_slots=1_000_000)
        for index in range(have, idle_workers)
    )
    Worker.objects.filter(name__in=[f"idle-{index:05}" for index in range(idle_workers)]).update(
        status=Worker.Status.ACTIVE
    )


def submission_cost(owner: Any, idle_workers: int, submissions: int) -> float:
    """Median ms of one `task_submit` placed at once by its own round, with `idle_workers` workers free."""
    from tasks.services import task_submit

    idle_fleet(idle_workers)
    timings = []
    for _ in range(submissions):
        started = time.perf_counter()
        task = task_submit(owner=owner, job_name="submission-cost", entrypoint="true")
        timings.append((time.perf_counter() - started) * 1000)
        assert task.status == "preparing", task.status
    return statistics.median(timings)


def fleet_round_cost(owner: Any, idle_workers: int, rounds: int) -> float:
    """Median ms of one `dispatch_round` placing 32 queued tasks, with `idle_workers` workers free."""
    from scheduler.dispatch import dispatch_round

    idle_fleet(idle_workers)
    timings = []
    for _ in range(rounds):
        insert_queued(owner, 32)
        started = time.perf_counter()
        placed = dispatch_round(batch_size=32)
        timings.append((time.perf_counter() - started) * 1000)
        assert placed == 32, placed
    return statistics.median(timings)


def print_latency(label: str, latencies: list[float], expected: int) -> tuple[float, float]:
    if not latencies:
        print(f"{label}: nothing arrived within 60 s (0/{expected})")
        return float("nan"), float("nan")
    p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
    print(f"{label}: p50 {p50:.1f} ms, p99 {p99:.1f} ms ({len(latencies)}/{expected} measured)")
    return p50, p99


def print_latencies(label: str, latencies: dict[str, list[float]], expected: int) -> tuple[float, float]:
    """The figure from the commit (returned), then the one from the submitting call."""
    figure = print_latency(label, latencies["commit"], expected)
    print_latency("  from the start of the submitting call", latencies["call"], expected)
    return figure


def print_server_errors(workers: list[BenchWorker]) -> None:
    """Status reports the server failed to apply so far (answered SERVER_ERROR; re-sent until acknowledged)."""
    errors = sum(worker.server_errors for worker in workers)
    if errors:
        print(
            f"  ({errors} status report(s) answered SERVER_ERROR so far on these workers, re-sent until acknowledged)"
        )


def drain_workers(names: list[str]) -> None:
    """Drain (through the service layer) bench workers that are about to leave: they go offline, empty."""
    from fetchml.auth import Actor
    from fetchml.models import ApiKey
    from fetchml.services import user_get_or_create
    from scheduler.models import Worker
    from scheduler.services import worker_drain

    admin = user_get_or_create(username="bench-admin", is_staff=True)
    actor = Actor(user=admin, role=ApiKey.Role.ADMIN)
    for worker in Worker.objects.filter(name__in=names):
        worker_drain(worker=worker, actor=actor)


def book_reservations() -> list[Any]:
    """The --mixed reservations, booked now through the service layer (they stay active: no task names them)."""
    from fetchml.auth import Actor
    from fetchml.models import ApiKey
    from fetchml.services import user_get_or_create
    from scheduler.reservations import reservation_create

    holder = user_get_or_create(username="bench-reserver")
    actor = Actor(user=holder, role=ApiKey.Role.USER)
    return [
        reservation_create(owner=holder, actor=actor, gpu_type=MIXED_GPU_TYPE, expires_minutes=240, **shape)
        for shape in MIXED_RESERVATIONS
    ]


async def run_mixed(args: argparse.Namespace, owner: Any, system: System, key: str, results: dict[str, Any]) -> None:
    from asgiref.sync import sync_to_async

    arrivals: dict[str, list[float]] = {}
    completions = Completions()
    workers = [
        BenchWorker(
            system.worker_url(i),
            key,
            f"mixed-{i}",
            arrivals,
            completions,
            gpus=MIXED_GPUS_PER_WORKER,
            gpu_type=MIXED_GPU_TYPE,
        )
        for i in range(WORKERS)
    ]
    async with Fleet(workers):
        reservations = await sync_to_async(book_reservations)()
        held = ", ".join(f"{r.gpu_count} GPUs on each of {r.node_count} worker(s)" for r in reservations)
        print(
            f"mixed workload: {WORKERS} workers x {SLOTS_PER_WORKER} slots x {MIXED_GPUS_PER_WORKER} GPUs; "
            f"{len(reservations)} active reservations ({held}; each also holds one batch slot per worker); "
            f"every {MIXED_MULTI_NODE_EVERY}th task on 2 nodes"
        )
        results["mixed_throughput"], cost = await measure_throughput(
            owner, args.tasks, completions, MIXED_MULTI_NODE_EVERY, system
        )
        print(
            f"mixed throughput: {results['mixed_throughput']:,.1f} tasks/s "
            f"({args.tasks:,} tasks queued -> completed, {args.tasks // MIXED_MULTI_NODE_EVERY:,} of them 2-node)"
        )
        print_cpu_per_task("mixed CPU per task", cost)
        latencies = await measure_latency(owner, 50, args.latency_tasks, arrivals, MIXED_MULTI_NODE_EVERY)
        results["mixed_latency_50"] = print_latencies(
            "mixed enqueue -> assign (all nodes) at 50/s", latencies, args.latency_tasks
        )
        await wait_until_idle()
        print_server_errors(workers)


class Side(abc.ABC):
    """A system under measurement, up for the duration of an `async with`: what `_start` enters on
    `self.stack` is undone on leaving, or at once if starting fails."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> Self:
        await self.stack.__aenter__()
        try:
            await self._start()
        except BaseException:
            await self.stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stack.aclose()

    @abc.abstractmethod
    async def _start(self) -> None: ...


class FetchmlSide(Side):
    """FetchML's system (daphne, the scheduler) and its 4 bench workers."""

    def __init__(self, args: argparse.Namespace, env: dict[str, str]) -> None:
        super().__init__(args)
        self.env = env
        self.arrivals: dict[str, list[float]] = {}
        self.completions = Completions()

    async def _start(self) -> None:
        from asgiref.sync import sync_to_async

        from fetchml.services import apikey_create, user_get_or_create

        self.owner = await sync_to_async(user_get_or_create)(username="bench")
        agent = await sync_to_async(user_get_or_create)(username="bench-workers")
        _, self.key = await sync_to_async(apikey_create)(user=agent, role="worker", name="bench")
        self.system = self.stack.enter_context(System(self.env, servers=self.args.servers))
        self.workers = [
            BenchWorker(
                self.system.worker_url(i),
                self.key,
                f"bench-{i}",
                self.arrivals,
                self.completions,
                slots=self.args.slots,
            )
            for i in range(WORKERS)
        ]
        self.fleet = Fleet(self.workers)
        await self.stack.enter_async_context(self.fleet)

    async def warm_up(self) -> None:
        await measure_throughput(self.owner, WARM_UP_TASKS, self.completions)

    async def throughput(self) -> float:
        throughput, cost = await measure_throughput(self.owner, self.args.tasks, self.completions, system=self.system)
        print(f"throughput: {throughput:,.1f} tasks/s ({self.args.tasks:,} tasks queued -> completed)")
        print_cpu_per_task("CPU per task", cost)
        print_server_errors(self.workers)
        return throughput

    async def latencies(self, results: dict[str, Any]) -> None:
        for rate in (50, 200):
            latencies = await measure_latency(self.owner, rate, self.args.latency_tasks, self.arrivals)
            results[f"latency_{rate}"] = print_latencies(
                f"enqueue -> assign at {rate}/s", latencies, self.args.latency_tasks
            )
        print_server_errors(self.workers)

    async def mixed(self, results: dict[str, Any]) -> None:
        """The --mixed workload, on other workers: the throughput workers are drained and leave first."""
        from asgiref.sync import sync_to_async

        await wait_until_idle()
        await sync_to_async(drain_workers)([worker.name for worker in self.workers])
        await self.fleet.__aexit__()  # leaving the stack later finds it stopped already
        await run_mixed(self.args, self.owner, self.system, self.key, results)


# --- procrastinate ---------------------------------------------------------------


def procrastinate_installed() -> bool:
    return importlib.util.find_spec("procrastinate") is not None


class ProcrastinateWorkers:
    """`procrastinate worker` processes (its own CLI, loading bench/procrastinate_app.py); SIGTERM, then SIGKILL."""

    def __init__(self, env: dict[str, str], count: int, concurrency: int) -> None:
        self.env, self.count, self.concurrency = env, count, concurrency
        self.children: list[subprocess.Popen] = []

    def __enter__(self) -> ProcrastinateWorkers:
        command = [sys.executable, "-m", "procrastinate", "--app=procrastinate_app.app", "--log-level=warning"]
        command += ["worker", f"--concurrency={self.concurrency}"]
        for index in range(self.count):
            self.children.append(subprocess.Popen([*command, f"--name=bench-{index}"], cwd=REPO_ROOT, env=self.env))
        return self

    def __exit__(self, *exc_info: object) -> None:
        stop_children(self.children)


class ProcrastinateSide(Side):
    """procrastinate on its own scratch database with its 4 worker processes."""

    def __init__(self, args: argparse.Namespace, url: str) -> None:
        super().__init__(args)
        self.url = url

    async def _start(self) -> None:
        import logging

        import psycopg

        scratch_url, drop = scratch_postgres(self.url, "procrastinatebench")
        self.stack.callback(drop)
        handle, self.stamps = tempfile.mkstemp(prefix="fetchml-procrastinate-stamps-")
        os.close(handle)
        self.stack.callback(os.unlink, self.stamps)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCH_DIR), os.environ.get("PYTHONPATH", "")])),
            "FETCHML_BENCH_PROCRASTINATE_DSN": scratch_url,
            "FETCHML_BENCH_PROCRASTINATE_STAMPS": self.stamps,
        }
        os.environ.update(
            {k: env[k] for k in ("FETCHML_BENCH_PROCRASTINATE_DSN", "FETCHML_BENCH_PROCRASTINATE_STAMPS")}
        )
        sys.path.insert(0, str(BENCH_DIR))
        import procrastinate_app

        logging.getLogger("procrastinate").setLevel(logging.WARNING)  # one INFO line per deferred job otherwise
        self.app = procrastinate_app
        await self.stack.enter_async_context(procrastinate_app.app.open_async())
        self.watch = await self.stack.enter_async_context(
            await psycopg.AsyncConnection.connect(scratch_url, autocommit=True)
        )
        await procrastinate_app.app.schema_manager.apply_schema_async()
        self.workers = self.stack.enter_context(
            ProcrastinateWorkers(env, PROCRASTINATE_WORKERS, self.args.procrastinate_concurrency)
        )
        deadline = time.monotonic() + 60
        while await self._count("SELECT count(*) FROM procrastinate_workers") < PROCRASTINATE_WORKERS:
            if time.monotonic() > deadline or any(c.poll() is not None for c in self.workers.children):
                raise RuntimeError("the procrastinate workers did not start")
            await asyncio.sleep(0.1)
        await asyncio.sleep(1)  # their LISTEN connections come up right after registering

    async def _count(self, query: str) -> int:
        cursor = await self.watch.execute(query)
        return (await cursor.fetchone())[0]

    async def _parts(self) -> dict[str, list[int]]:
        cursor = await self.watch.execute(BACKENDS_SQL)
        backends = [pid for (pid,) in await cursor.fetchall()]
        workers_pids = [child.pid for child in self.workers.children]
        return {"workers": workers_pids, "PostgreSQL": backends, "bench": [os.getpid()]}

    async def warm_up(self) -> None:
        await self._drain(WARM_UP_TASKS)

    async def throughput(self) -> float:
        jobs = self.args.procrastinate_jobs
        cpu_before = cpu_snapshot(await self._parts())
        throughput = jobs / await self._drain(jobs)
        print(
            f"procrastinate throughput: {throughput:,.1f} jobs/s "
            f"({jobs:,} no-op jobs deferred in one batch -> succeeded; {PROCRASTINATE_WORKERS} worker "
            f"processes, concurrency {self.args.procrastinate_concurrency} each)"
        )
        print_cpu_per_task("procrastinate CPU per job", cpu_per_task(await self._parts(), cpu_before, jobs))
        return throughput

    async def _drain(self, jobs: int) -> float:
        """Seconds from the commit deferring `jobs` no-op jobs until all of them succeeded."""
        # Only this batch's rows are counted (by key): earlier measurements' jobs are in the same table.
        after = await self._count("SELECT coalesce(max(id), 0) FROM procrastinate_jobs")
        await self.app.noop.batch_defer_async(*({} for _ in range(jobs)))
        started = time.monotonic()  # the batch is committed: every job is visible
        await self.watch.execute("ANALYZE")  # as FetchML's `measure_throughput` does (see `analyze`)
        # One scan per look, as light as the watch can be: it competes with the workers.
        progress_query = (
            "SELECT count(*) FILTER (WHERE status = 'succeeded'), count(*) FILTER (WHERE status = 'failed') "
            "FROM procrastinate_jobs WHERE id > %s AND task_name = 'noop'"
        )
        while True:
            succeeded, failed = await (await self.watch.execute(progress_query, [after])).fetchone()
            if failed:
                raise RuntimeError("a procrastinate job failed")
            if succeeded >= jobs:
                break
            await asyncio.sleep(0.05)
        return time.monotonic() - started

    async def latencies(self, results: dict[str, Any]) -> None:
        for rate in (50, 200):
            submitted: dict[str, tuple[float, float]] = {}  # key -> (call, commit)
            begun = time.monotonic()
            for index in range(self.args.latency_tasks):
                delay = begun + index / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                key = f"{rate}-{index}"
                called = time.monotonic()
                await self.app.stamp.defer_async(key=key)
                submitted[key] = (called, time.monotonic())  # the return: after the commit
            started_at: dict[str, float] = {}
            deadline = time.monotonic() + 60
            while len(started_at) < len(submitted) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                with open(self.stamps, encoding="utf-8") as lines:
                    for line in lines:
                        stamp_key, _, at = line.strip().partition(" ")
                        if stamp_key in submitted and at:
                            started_at[stamp_key] = float(at)
            latencies = {
                clock: [(at - submitted[key][index]) * 1000 for key, at in started_at.items()]
                for index, clock in enumerate(("call", "commit"))
            }
            results[f"latency_{rate}"] = print_latencies(
                f"procrastinate enqueue -> start at {rate}/s", latencies, self.args.latency_tasks
            )


async def run_both(args: argparse.Namespace, env: dict[str, str], url: str) -> dict[str, Any]:
    """FetchML's figures, and with --compare procrastinate's beside them: both systems are up together
    and their throughputs measured in turns (`--pairs`), so that a change of the machine's speed
    (seen here within minutes) touches both figures of a pair alike."""
    results: dict[str, Any] = {}
    async with contextlib.AsyncExitStack() as stack:
        ours = await stack.enter_async_context(FetchmlSide(args, env))
        theirs = await stack.enter_async_context(ProcrastinateSide(args, url)) if args.compare else None
        for side in (ours, theirs) if theirs else (ours,):
            await side.warm_up()
        figures: list[float] = []
        ratios: list[float] = []
        for pair in range(args.pairs):
            if args.pairs > 1:
                print(f"pair {pair + 1} of {args.pairs} ({python_loop_seconds():.2f} s for 10^7 Python additions):")
            figures.append(await ours.throughput())
            if theirs:
                ratios.append(figures[-1] / await theirs.throughput())
                print(f"  ratio of this pair: {ratios[-1]:.3f}")
        results["throughput"] = statistics.median(figures)
        if ratios:
            results["ratio"] = statistics.median(ratios)
            listed = ", ".join(f"{ratio:.2f}" for ratio in ratios)
            print(
                f"throughput FetchML / procrastinate: {results['ratio']:.3f} "
                f"(the median of {len(ratios)} pair(s): {listed}; {args.tasks:,} tasks vs "
                f"{args.procrastinate_jobs:,} jobs each)"
            )
        elif args.pairs > 1:
            print(f"throughput, the median of {args.pairs} runs: {results['throughput']:,.1f} tasks/s")
        await ours.latencies(results)
        if theirs:
            theirs_results: dict[str, Any] = {}
            await theirs.latencies(theirs_results)
            results["procrastinate"] = theirs_results
        if args.mixed:
            await ours.mixed(results)
    return results


def python_loop_seconds() -> float:
    """Seconds this machine takes for a plain Python loop of 10^7 additions: the speed of one core,
    to compare runs across machines and days (the same machine's speed has been seen to vary 2x)."""
    started = time.perf_counter()
    total = 0
    for number in range(10_000_000):
        total += number
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer tasks; round cost up to 100k rows only")
    parser.add_argument(
        "--mixed", action="store_true", help="also a mixed workload: active reservations, 10%% 2-node tasks"
    )
    parser.add_argument(
        "--compare",
        choices=["procrastinate"],
        help=f"also run the no-op workload through procrastinate ({PROCRASTINATE_INSTALL})",
    )
    parser.add_argument(
        "--procrastinate-concurrency",
        type=int,
        default=8,
        metavar="N",
        help="jobs each procrastinate worker process runs at once (default: 8; procrastinate's own default is 1)",
    )
    parser.add_argument(
        "--slots",
        type=int,
        default=SLOTS_PER_WORKER,
        metavar="N",
        help=f"batch slots of each of the {WORKERS} bench workers, i.e. tasks in flight (default: {SLOTS_PER_WORKER})",
    )
    parser.add_argument(
        "--servers",
        type=int,
        default=1,
        metavar="N",
        help="daphne processes the bench workers connect to, spread evenly (default: 1)",
    )
    parser.add_argument(
        "--pairs",
        type=int,
        metavar="N",
        help="throughput measured N times, in turns with procrastinate's under --compare; the median is the "
        "figure (default: 3, 1 with --quick)",
    )
    args = parser.parse_args()
    args.pairs = args.pairs or (1 if args.quick else 3)
    args.tasks = 2_000 if args.quick else 10_000
    args.latency_tasks = 200 if args.quick else 1_000
    args.procrastinate_jobs = PROCRASTINATE_JOBS
    depths = [1_000, 100_000] if args.quick else [1_000, 100_000, 1_000_000]

    if args.compare == "procrastinate" and not procrastinate_installed():
        print(f"--compare procrastinate needs procrastinate, which is not installed: {PROCRASTINATE_INSTALL}")
        return 2
    url = os.environ.get("DATABASE_URL", "")
    if not scratch_services_given():
        return 2
    with scratch_system("dispatchbench") as env:
        print(
            f"machine: {os.cpu_count()} cores, {python_loop_seconds():.2f} s for 10^7 Python additions; "
            f"PostgreSQL + Redis; {args.servers} daphne process(es); "
            f"{WORKERS} bench workers x {args.slots} slots"
        )
        results = asyncio.run(run_both(args, env, url))
        from fetchml.services import user_get_or_create

        owner = user_get_or_create(username="bench")
        # Before the deep queues: a round places the best runnable task, which must be the one submitted.
        for idle in FLEET_SIZES:
            cost = submission_cost(owner, idle, submissions=200)
            results[f"submission_{idle}"] = cost
            print(f"submission placed by its own round, {idle:>5,} idle worker(s): {cost:.1f} ms")
            cost = fleet_round_cost(owner, idle, rounds=20)
            results[f"fleet_round_{idle}"] = cost
            print(f"dispatch round (32 placed),         {idle:>5,} idle worker(s): {cost:.1f} ms")
        for depth in depths:
            cost = round_cost(owner, depth, rounds=5)
            results[f"round_{depth}"] = cost
            print(f"dispatch round (128 placed) at queue depth {depth:>9,}: {cost:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
