"""`manage.py worker`: run the worker agent on this machine.

The agent speaks only the worker WebSocket protocol (docs/worker-protocol.md); it never opens
the database, so this command skips Django's system checks.

Signals: the first SIGTERM or SIGINT drains (no new work, running tasks finish and are reported,
exit 0); a second one stops the running tasks (SIGTERM, SIGKILL after their cancel grace, 10 s at
most), stores their files, reports them failed (`worker_lost`, so the server re-queues them) and
exits (0 when the server acknowledged those reports, 1 when it could not be told); a third one
kills them at once. Exit 2 when the server refuses the API key.

`--parent-pid PID` (given by `manage.py serve` to its local agents): once PID is no longer this
process's parent (serve was killed, and the agent was handed to init), the agent drains as on its
first SIGTERM, so it does not outlive the serve that started it; without a server for
ORPHAN_UNREACHABLE_SECONDS meanwhile, it stops its runs as on a second one and exits. An agent
given --parent-pid whose work directory another agent still uses (one left so, which the next
serve's server hears from on the same address) waits for that one to exit before it connects:
connecting first, under the same name, would take that agent's runs and results away.

The worker key: `--api-key-file PATH` (read once, whitespace stripped; `-` for stdin) or $FETCHML_WORKER_API_KEY;
`--api-key KEY` works too, but every user of the machine sees it in `ps`. Started from the command
line, the agent first makes itself non-dumpable (`scheduler.agent.secrecy`), so that its runs, of the
same Unix user, cannot read its /proc/<pid>/environ or memory, and drops the variable from its
environment once read.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import re
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from django.core.management.base import BaseCommand, CommandError, CommandParser

from scheduler.agent import orphans
from scheduler.agent.capacity import detect_capacity
from scheduler.agent.client import Agent, AgentConfig
from scheduler.agent.files import DEFAULT_DATASET_CACHE_BYTES, DEFAULT_MAX_UNPACK_BYTES, GIB
from scheduler.agent.secrecy import hide_from_runs
from scheduler.agent.services import CONTAINER_RUNTIMES

logger = logging.getLogger("scheduler.agent")

API_KEY_ENV = "FETCHML_WORKER_API_KEY"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # what the server accepts in hello
WORKER_PATH = "/ws/worker"
PARENT_CHECK_SECONDS = 1.0  # how often an agent given --parent-pid looks whether its parent is still there
# An agent whose serve is gone, and that has had no server this long, gives its runs up and exits.
ORPHAN_UNREACHABLE_SECONDS = 600.0
_SCHEMES = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}


def worker_url(server: str) -> str:
    """`http(s)://host:port[/prefix]` or `ws(s)://...` -> the `/ws/worker` WebSocket URL."""
    parts = urlsplit(server.strip())
    scheme = _SCHEMES.get(parts.scheme.lower())
    if scheme is None or not parts.netloc:
        raise CommandError(f"--server must look like http://host:port or ws://host:port, not {server!r}")
    path = parts.path.rstrip("/")
    if not path.endswith(WORKER_PATH):
        path += WORKER_PATH
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


def default_work_root() -> Path:
    home = Path.home()
    if os.access(home, os.W_OK):
        return home / ".fetchml" / "work"
    return Path(tempfile.gettempdir()) / "fetchml-work"


def _non_negative(value: str) -> int:
    # ArgumentTypeError, not ValueError: argparse prints its message as is ("argument --cpus: ..."),
    # where a ValueError would be shown as "invalid _non_negative value".
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number 0 or more, not {value!r}")
    return number


def _pid(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be a process id (a whole number above 0), not {value!r}")
    return number


async def watch_parent(parent_pid: int, on_gone: Callable[[], None], *, every: float = PARENT_CHECK_SECONDS) -> None:
    """Call `on_gone` once `parent_pid` is no longer this process's parent: it died and this process
    was handed to init (or a subreaper). Looked at every `every` seconds; the parent pid cannot be
    taken by another process while it is this one's parent, so a match means the same process."""
    while os.getppid() == parent_pid:
        await asyncio.sleep(every)
    on_gone()


async def give_up_when_alone(
    agent: Agent, *, after: float, every: float = PARENT_CHECK_SECONDS, clock: Callable[[], float] = time.monotonic
) -> None:
    """Force `agent` down (`shutdown`) once it has had no server connection for `after` seconds."""
    alone_since: float | None = None
    while True:
        if agent.connected:
            alone_since = None
        elif alone_since is None:
            alone_since = clock()
        elif clock() - alone_since >= after:
            logger.warning("no server for %.0f s since the process that started this agent is gone: stopping", after)
            agent.shutdown()
            return
        await asyncio.sleep(every)


def read_api_key(options: dict[str, Any]) -> str:
    """The worker key from --api-key, --api-key-file or $FETCHML_WORKER_API_KEY, in that order. The
    variable leaves this process's environment either way (what it execs would inherit it)."""
    from_env = os.environ.pop(API_KEY_ENV, "")
    if options.get("api_key"):
        return options["api_key"]
    path = options.get("api_key_file")
    if path:
        try:
            # "-": standard input, read as it is (opening /dev/stdin would check the file's permissions
            # again, and refuse one only root may read that the shell opened for this agent).
            key = (sys.stdin.read() if path == "-" else Path(path).expanduser().read_text(encoding="utf-8")).strip()
        except (OSError, UnicodeDecodeError, ValueError, AttributeError) as exc:  # ValueError: stdin closed
            reason = getattr(exc, "strerror", None) or exc
            raise CommandError(f"cannot read the API key file {path}: {reason}") from None
        if not key:
            raise CommandError(f"the API key file {path} is empty")
        return key
    if not from_env.strip():
        raise CommandError(f"an API key is required: --api-key-file, ${API_KEY_ENV} or --api-key")
    return from_env.strip()


def _size_gib(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number < 0:  # nan and inf pass a comparison, then poison the cache's sums
        raise argparse.ArgumentTypeError(f"must be a number of GiB, 0 or more, not {value!r}")
    return number


class Command(BaseCommand):
    help = (
        "Run the FetchML worker agent: connect to the server's /ws/worker, report this machine's capacity "
        "and run the tasks assigned to it. First SIGTERM/SIGINT drains; a second one stops running tasks "
        "(SIGTERM, SIGKILL after their cancel grace, 10 s at most), stores their files and reports them for "
        "the server to re-queue; a third kills them at once. "
        f"The API key comes from --api-key-file or ${API_KEY_ENV} (--api-key shows it to every user in ps)."
    )
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--server", required=True, help="http://host:port or ws://host:port of the server")
        key = parser.add_mutually_exclusive_group()
        key.add_argument(
            "--api-key-file",
            default=None,
            metavar="PATH",
            help=f"read the worker-role API key from this file ('-': standard input), stripped; or set ${API_KEY_ENV}",
        )
        key.add_argument(
            "--api-key",
            default=None,
            help=(
                "a worker-role API key: visible to every user of this machine (ps, /proc/<pid>/cmdline); "
                f"prefer --api-key-file or ${API_KEY_ENV}"
            ),
        )
        parser.add_argument("--name", default=None, help="worker name (default: this machine's hostname)")
        parser.add_argument("--cpus", type=_non_negative, default=None, help="CPU cores to offer (default: detected)")
        parser.add_argument("--memory-gb", type=_non_negative, default=None, help="memory to offer, GiB")
        parser.add_argument("--gpus", type=_non_negative, default=None, help="GPUs to offer (default: nvidia-smi)")
        parser.add_argument("--gpu-type", default=None, help='GPU model, e.g. "A100" (default: from nvidia-smi)')
        parser.add_argument("--batch-slots", type=_non_negative, default=None, help="default: one per GPU, else 1")
        parser.add_argument(
            "--service-slots", type=_non_negative, default=None, help="default: 1 (0 where Jupyter cannot run)"
        )
        parser.add_argument("--workdir", default=None, help="where runs get their directories (~/.fetchml/work)")
        parser.add_argument(
            "--dataset-cache-gb",
            type=_size_gib,
            default=DEFAULT_DATASET_CACHE_BYTES / GIB,
            help="size limit of the dataset and snapshot cache under --workdir, GiB (least recently used go first)",
        )
        parser.add_argument(
            "--max-unpack-bytes",
            type=_non_negative,
            default=DEFAULT_MAX_UNPACK_BYTES,
            help="refuse code snapshots that expand past this many bytes (default: 4 GiB)",
        )
        parser.add_argument(
            "--no-artifacts",
            action="store_true",
            help="do not upload outputs and logs (for a server without the file API)",
        )
        parser.add_argument(
            "--keep-run-dirs",
            type=_non_negative,
            default=0,
            metavar="N",
            help=(
                "keep the work directories of the N most recent finished runs (default: 0). The others are removed "
                "once the server has their outcome and files; one whose upload failed is always kept"
            ),
        )
        parser.add_argument(
            "--container-runtime",
            choices=CONTAINER_RUNTIMES,
            default="",
            help="run Jupyter services in their image with this runtime (default: this environment's Jupyter)",
        )
        parser.add_argument(
            "--parent-pid",
            type=_pid,
            default=None,
            metavar="PID",
            help=(
                "drain and exit, as on a first SIGTERM, once process PID is no longer this agent's parent "
                "(checked every second): `manage.py serve` passes its own pid, so that its local agents do not "
                "outlive it when it is killed"
            ),
        )
        parser.add_argument(
            "--service-host",
            default="",
            help="address services bind and are reached at (default: this worker's address towards the server)",
        )

    def run_from_argv(self, argv: list[str]) -> None:
        # The agent's own process (manage.py worker, as `serve` starts it too): hidden from its runs
        # before anything else, its options parsed and its key read included.
        hide_from_runs()
        super().run_from_argv(argv)

    def handle(self, *args: Any, **options: Any) -> None:
        api_key = read_api_key(options)
        name = options["name"] or socket.gethostname()
        if not NAME_PATTERN.match(name):
            raise CommandError(f"worker name {name!r}: letters, digits, '.', '_' and '-' only (use --name)")
        capacity = detect_capacity(
            cpus=options["cpus"],
            memory_gb=options["memory_gb"],
            gpus=options["gpus"],
            gpu_type=options["gpu_type"],
            batch_slots=options["batch_slots"],
            service_slots=options["service_slots"],
            container_runtime=options["container_runtime"],
        )
        work_root = Path(options["workdir"]).expanduser() if options["workdir"] else default_work_root()
        try:
            work_root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CommandError(f"cannot create the work directory {work_root}: {exc}") from None
        config = AgentConfig(
            server_url=worker_url(options["server"]),
            api_key=api_key,
            name=name,
            capacity=capacity,
            work_root=work_root.resolve(),
            dataset_cache_bytes=int(options["dataset_cache_gb"] * GIB),
            max_unpack_bytes=options["max_unpack_bytes"],
            upload_artifacts=not options["no_artifacts"],
            keep_run_dirs=options["keep_run_dirs"],
            container_runtime=options["container_runtime"],
            service_host=options["service_host"],
        )
        logger.info("worker %s offers %s; runs in %s", config.name, capacity.as_capabilities(), config.work_root)
        parent_pid = options["parent_pid"]
        if parent_pid and not orphans.wait_for_other_agents(
            config.work_root, keep_waiting=lambda: os.getppid() == parent_pid
        ):
            logger.info("the process that started this agent (pid %d) is gone before it could start", parent_pid)
            return
        with contextlib.ExitStack() as claim:
            try:
                # Before the first hello: what an earlier agent here left running is ended (orphans.py).
                claim.enter_context(orphans.claimed(config.work_root))
            except OSError as exc:
                raise CommandError(f"cannot use work directory {config.work_root}: {exc.strerror or exc}") from None
            code = asyncio.run(self._serve(config, parent_pid=parent_pid))
        if code:
            raise SystemExit(code)

    async def _serve(self, config: AgentConfig, *, parent_pid: int | None = None) -> int:
        agent = Agent(config)
        loop = asyncio.get_running_loop()

        # What asked the agent to stop, in order: a signal's name, or "parent" (its parent died).
        received: list[str] = []

        def on_signal(signum: signal.Signals) -> None:
            received.append(signum.name)
            if len(received) == 1:
                logger.info("%s: draining (send it again to stop now)", signum.name)
                agent.drain()
            elif len(received) == 2:
                logger.warning("%s again: stopping now", signum.name)
                agent.shutdown()
            else:
                logger.warning("%s once more: killing the runs at once", signum.name)
                agent.shutdown()

        alone: list[asyncio.Task] = []

        def on_parent_gone() -> None:
            # As a first SIGTERM: the next signal stops the runs now. A drain or stop already under
            # way goes on as it is. Its runs are reported to the next serve's server, on the same
            # address; with none for long, they are given up (the server re-queues them).
            if not received:
                logger.warning(
                    "the process that started this agent (pid %d) is gone: draining (SIGTERM to stop now)", parent_pid
                )
                agent.drain()
                received.append("parent")
                alone.append(asyncio.ensure_future(give_up_when_alone(agent, after=ORPHAN_UNREACHABLE_SECONDS)))

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        watcher = asyncio.create_task(watch_parent(parent_pid, on_parent_gone)) if parent_pid else None
        try:
            return await agent.run()
        finally:
            for task in [watcher, *alone]:
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
