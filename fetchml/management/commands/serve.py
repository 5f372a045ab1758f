"""The embedded system in one command: ASGI server + scheduler loop + local workers."""

import asyncio
import errno
import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from fetchml.localkeys import ensure_local_key
from fetchml.management.migrated import require_migrated
from scheduler.agent.client import FORCED_STOP_COLLECT_SECONDS, FORCED_STOP_GRACE_SECONDS

logger = logging.getLogger("fetchml.serve")
# Stopping the local agents: a first SIGTERM drains them for up to WORKER_DRAIN_SECONDS (a second
# Ctrl-C cuts that short); a second one stops their runs (SIGTERM, each run's cancel grace capped at
# FORCED_STOP_GRACE_SECONDS, SIGKILL, its files stored, reported, re-queued), which takes at most
# WORKER_FORCED_STOP_SECONDS (a third Ctrl-C cuts that short); a third kills the runs at once, which
# leaves the agents WORKER_KILL_RUNS_SECONDS to report; then SIGKILL.
WORKER_DRAIN_SECONDS = 15.0
WORKER_FORCED_STOP_SECONDS = FORCED_STOP_GRACE_SECONDS + FORCED_STOP_COLLECT_SECONDS + 15.0
WORKER_KILL_RUNS_SECONDS = 10.0
STOP_POLL_SECONDS = 0.1
SIGNAL_DELIVERY_SECONDS, SIGNAL_DELIVERY_POLL_SECONDS = 2.0, 0.005
LOCK_FILE = "serve.lock"  # in FETCHML_VAR_DIR, holding the pid of the serve that holds it
# A local agent that died is started again after this long, doubling up to the most while it keeps
# dying young; one that ran for RESTART_RESET_SECONDS starts the back-off over.
RESTART_FIRST_SECONDS, RESTART_MOST_SECONDS, RESTART_RESET_SECONDS = 1.0, 60.0, 60.0
WORKER_POLL_SECONDS = 0.5


def local_worker_command(*, host: str, port: int, index: int) -> list[str]:
    """`manage.py worker` for local agent `index`: its runs, caches and Jupyter workspaces live in
    its own directory under FETCHML_VAR_DIR, so two checkouts on one machine do not share them."""
    name = f"{socket.gethostname()}-local-{index + 1}"
    return [
        sys.executable,
        str(settings.BASE_DIR / "manage.py"),
        "worker",
        "--server",
        f"http://{host}:{port}",
        "--name",
        name,
        "--workdir",
        str(Path(settings.VAR_DIR) / "work" / name),
        # It drains and exits once this process is gone, killed without a chance to stop it.
        "--parent-pid",
        str(os.getpid()),
    ]


def lock_var_dir(var_dir: Path) -> int:
    """Hold FETCHML_VAR_DIR for this process's life: one embedded FetchML (one server and scheduler
    on its SQLite file, its local agents under work/) per directory. The lock is the kernel's
    (flock), released when the process ends however it ends; the file holds the holder's pid, for
    the message. Returns the lock file's descriptor, to keep open (not inherited by children)."""
    path = var_dir / LOCK_FILE
    try:
        var_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise CommandError(f"FetchML could not start: cannot create {path}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        who = f"pid {holder}" if holder.isdigit() else "a process that has not written its pid yet"
        stop = f"stop it (Ctrl-C in its terminal, or kill {holder})" if holder.isdigit() else "stop it"
        raise CommandError(
            f"FetchML could not start: another FetchML ({who}) is running on {var_dir} (it holds {path}); "
            f"{stop}, or set FETCHML_VAR_DIR to another directory to run a second one beside it"
        ) from None
    except OSError as exc:
        os.close(fd)
        raise CommandError(f"FetchML could not start: cannot lock {path}: {exc.strerror or exc}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    return fd


def check_can_listen(host: str, port: int) -> None:
    """Refuse to start, saying why, when the server could not listen on host:port. Daphne only logs
    a listen failure and returns, which would leave serve to guess the cause after the fact."""
    try:
        family, kind, proto, _name, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise CommandError(f"FetchML could not start: --host {host!r}: {exc.strerror}") from None
    with socket.socket(family, kind, proto) as probe:
        # As Twisted listens: a port a stopped server left in TIME_WAIT is free, one listened on is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise CommandError(
                    f"FetchML could not start: port {port} on {host} is already in use (another FetchML, or "
                    "another program, listens there); stop it or choose another port (--port, or make run PORT=...)"
                ) from None
            raise CommandError(f"FetchML could not start: cannot listen on {host}:{port}: {exc.strerror}") from None


def wait_delivered(pid: int, signum: int, *, timeout: float = SIGNAL_DELIVERY_SECONDS) -> None:
    """Return once `signum` is no longer pending for process `pid` (Linux: /proc), or after
    `timeout`. A signal sent while the same one is still pending merges with it, and an agent counts
    the SIGTERMs it gets: the next one must not be sent before this one was taken."""
    status = Path(f"/proc/{pid}/status")
    bit = 1 << (signum - 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
            pending = int(fields["SigPnd"], 16) | int(fields["ShdPnd"], 16)
        except (OSError, KeyError, ValueError):
            return  # gone, or no /proc here
        if not pending & bit:
            return
        time.sleep(SIGNAL_DELIVERY_POLL_SECONDS)


class Command(BaseCommand):
    help = (
        "Run FetchML in one process: the ASGI server (daphne: API, admin, WebSockets, SSE) with the "
        "scheduler loop beside it, and N local worker agents as child processes. Ctrl-C stops all of it: "
        f"the workers drain for up to {WORKER_DRAIN_SECONDS:g} s; a second Ctrl-C stops their runs at once with "
        f"their grace (SIGTERM, at most {FORCED_STOP_GRACE_SECONDS:g} s, SIGKILL; the runs are re-queued); a third "
        "kills them. One per FETCHML_VAR_DIR in the embedded mode."
    )

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=9101)
        parser.add_argument("--workers", type=int, default=1, help="local worker agents to start (0 for none)")
        parser.add_argument("--no-scheduler", action="store_true", help="do not run the scheduler loop here")

    def handle(self, *args, host: str, port: int, workers: int, no_scheduler: bool, **options):
        if workers < 0:
            raise CommandError("--workers must be 0 or more")
        if not 0 < port < 65536:
            raise CommandError("--port must be between 1 and 65535")
        # In the embedded mode a second one would run a second server and scheduler on the same SQLite
        # file, its local agents under the same names. With DATABASE_URL, copies side by side are a layout.
        lock = lock_var_dir(Path(settings.VAR_DIR)) if settings.EMBEDDED else None
        try:
            self._serve(host=host, port=port, workers=workers, no_scheduler=no_scheduler)
        finally:
            if lock is not None:
                os.close(lock)

    def _serve(self, *, host: str, port: int, workers: int, no_scheduler: bool) -> None:
        require_migrated()
        check_can_listen(host, port)
        # Import here: daphne installs the Twisted asyncio reactor on import.
        from daphne.endpoints import build_endpoint_description_strings
        from daphne.server import Server
        from twisted.internet import reactor

        from fetchml.asgi import application

        worker_key = (
            ensure_local_key(
                file_name="local-worker.key", username="local-worker", role="worker", key_name="local workers"
            )
            if workers
            else ""
        )
        state: dict = {
            "scheduler_task": None,
            "stop": asyncio.Event(),
            "children": [],
            "stopping": False,
            "started": False,
            "signals": 0,
            # Each stop signal after the first cuts the wait of the stage under way short.
            "hurry": [threading.Event(), threading.Event()],
        }

        async def shutdown() -> None:
            # Workers first, while the server still takes their last reports;
            # then the scheduler; then the server itself.
            await asyncio.to_thread(self._stop_workers, state["children"], state["hurry"])
            state["stop"].set()
            if state["scheduler_task"] is not None:
                try:
                    await asyncio.wait_for(state["scheduler_task"], timeout=10)
                except (TimeoutError, asyncio.CancelledError):
                    logger.warning("scheduler loop did not stop in time")
            reactor.stop()

        def on_signal() -> None:
            state["signals"] += 1
            if state["signals"] == 2 and state["children"]:
                # No more waiting for runs to finish: the agents' second SIGTERM stops them, each with
                # its grace to save its work; their files are stored and the server re-queues them.
                self.stdout.write(
                    f"Stopping now: local workers stop their runs (SIGTERM, up to {FORCED_STOP_GRACE_SECONDS:g} s "
                    "grace each, SIGKILL; re-queued) ... Ctrl-C again to kill them at once"
                )
                state["hurry"][0].set()
            if state["signals"] >= 3 and state["children"]:
                self.stdout.write("Killing the local workers' runs at once ...")
                state["hurry"][1].set()
            if state["stopping"]:
                return
            state["stopping"] = True
            self.stdout.write("Stopping: draining local workers, then the scheduler and the server ...")
            state["shutdown"] = asyncio.ensure_future(shutdown())

        def start_background() -> None:
            state["started"] = True
            loop = asyncio.get_event_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, on_signal)
            if not no_scheduler:
                from scheduler.loop import SchedulerLoop

                state["scheduler_task"] = loop.create_task(SchedulerLoop().run(state["stop"]))
            state["children"] = [self._start_worker(host, port, index, worker_key) for index in range(workers)]
            state["keepers"] = [
                loop.create_task(
                    self._keep_worker(state, index, partial(self._start_worker, host, port, index, worker_key))
                )
                for index in range(workers)
            ]
            self._print_banner(host, port, workers)

        server = Server(
            application=application,
            endpoints=build_endpoint_description_strings(host=host, port=port),
            signal_handlers=False,
            ready_callable=lambda: reactor.callWhenRunning(start_background),
            verbosity=0,
        )
        self.stdout.write(f"Starting FetchML on http://{host}:{port} ...")
        server.run()
        if not state["started"]:
            # daphne logged why (the port taken since the check, say) and stopped: a supervisor must
            # see a failure.
            raise CommandError(f"FetchML could not start: it could not listen on {host}:{port} (see the log above)")
        self.stdout.write("FetchML stopped.")

    def _start_worker(self, host: str, port: int, index: int, key: str) -> subprocess.Popen:
        env = {**os.environ, "FETCHML_WORKER_API_KEY": key}
        command = local_worker_command(host=host, port=port, index=index)
        # Own process group: Ctrl-C in the terminal reaches only this process,
        # which then drains the workers in order.
        return subprocess.Popen(command, env=env, start_new_session=True)

    async def _keep_worker(self, state: dict, index: int, start: Callable[[], subprocess.Popen]) -> None:
        """Start local agent `index` again when it dies (a crash, the OOM killer); not when it
        stopped on purpose: drained by an operator (exit 0) or refused by the server (exit 2: its
        key revoked, its name taken), which starting again would not mend."""
        from scheduler.agent.client import EXIT_OK, EXIT_REFUSED

        delay = RESTART_FIRST_SECONDS
        while True:
            child = state["children"][index]
            started = time.monotonic()
            # Polled: a thread blocked in wait() per agent could take every thread of the loop's
            # default executor, which the shutdown needs.
            while (code := child.poll()) is None:
                await asyncio.sleep(WORKER_POLL_SECONDS)
            if state["stopping"]:
                return
            if code == EXIT_OK:
                logger.warning("local worker %d drained and stopped; restart serve to start it again", index + 1)
                return
            if code == EXIT_REFUSED:
                logger.error("local worker %d was refused by the server (see its log); not started again", index + 1)
                return
            if time.monotonic() - started >= RESTART_RESET_SECONDS:
                delay = RESTART_FIRST_SECONDS
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            logger.warning("local worker %d died (%s); starting it again in %.0f s", index + 1, how, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_MOST_SECONDS)
            # No await between this check and the start: a stop cannot slip in and miss the new agent.
            if state["stopping"]:
                return
            state["children"][index] = start()

    def _stop_workers(self, children: list[subprocess.Popen], hurry: list[threading.Event]) -> None:
        """SIGTERM = drain; a second SIGTERM (after WORKER_DRAIN_SECONDS, or at once on a second
        Ctrl-C: `hurry[0]`) stops the runs with a short grace, their files stored and the runs
        reported, so the server re-queues them; a third (`hurry[1]`) kills them at once; SIGKILL as a
        last resort. Every signal is sent from here, in this order, whenever the Ctrl-Cs come."""
        stages = (
            (signal.SIGTERM, WORKER_DRAIN_SECONDS, hurry[0]),
            (signal.SIGTERM, WORKER_FORCED_STOP_SECONDS, hurry[1]),
            (signal.SIGTERM, WORKER_KILL_RUNS_SECONDS, None),
            (signal.SIGKILL, 5.0, None),
        )
        # Said when a stage begins because the one before ran out of time (a Ctrl-C says its own).
        overdue = {
            1: f"the local workers' runs did not end within {WORKER_DRAIN_SECONDS:g} s: stopping them now "
            f"(SIGTERM, up to {FORCED_STOP_GRACE_SECONDS:g} s grace each, SIGKILL; re-queued)",
            2: "the local workers' runs are still stopping: killing them at once",
            3: "the local workers are still running: killing them",
        }
        for stage, (signum, timeout, cut_short) in enumerate(stages):
            alive = [child for child in children if child.poll() is None]
            if not alive:
                return
            for child in alive:
                child.send_signal(signum)
            for child in alive:
                wait_delivered(child.pid, signum)
            deadline = time.monotonic() + timeout
            waiting = cut_short or threading.Event()
            while any(child.poll() is None for child in alive) and not waiting.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if stage + 1 in overdue:
                        self.stdout.write(overdue[stage + 1])
                    break
                waiting.wait(min(remaining, STOP_POLL_SECONDS))

    def _print_banner(self, host: str, port: int, workers: int) -> None:
        base = f"http://{host}:{port}"
        self.stdout.write(
            "\n".join(
                [
                    "",
                    f"  API:     {base}/v1/",
                    f"  Docs:    {base}/v1/docs",
                    f"  Admin:   {base}/admin/",
                    f"  Health:  {base}/health",
                    f"  Workers: {workers} local agent(s)",
                    "",
                ]
            )
        )
        self.stdout.flush()
