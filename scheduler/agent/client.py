"""The agent's WebSocket session: connect, hello/welcome, handle server messages, reconnect.

Runs keep going while the server is away. Messages produced meanwhile wait in a bounded
outbox; final statuses are kept per run and re-sent after every welcome and every heartbeat
until the server acknowledges them.

Stopping: `drain()` (first SIGTERM/SIGINT, or the server's `drain`) takes no new work — an
`assign` is neither acked nor started, so the server can hand it to another worker — stops its
services (they never finish), and returns from `run()` with 0 once every run has finished and
its final status was acknowledged.
`shutdown()` (a second signal) stops the runs now, each as a cancel would but with a shorter grace:
SIGTERM to its process group, SIGKILL after its `cancel_grace_seconds` capped at
`forced_stop_grace_seconds` (10 s), then its files (a checkpoint written on SIGTERM) are stored as a
cancelled run's are, for `forced_stop_collect_seconds` at most. Each is reported `failed` with
failure_reason `worker_lost` (the server re-queues it); the agent waits a few seconds for the
acknowledgements and returns 0 if they all arrived, 1 if not. A second `shutdown()` (a third
signal), or the runs still going past the grace and the collection, kills them at once, storing
nothing more. Credentials the server refuses end the agent with 2. Refused because another
live agent holds its name, the agent kills its runs (that agent's hello ended them on the server)
and keeps trying.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from scheduler.agent import files as agent_files
from scheduler.agent import protocol
from scheduler.agent.artifacts import RunDirs
from scheduler.agent.cache import BlobCache
from scheduler.agent.capacity import Capacity
from scheduler.agent.files import FileServices
from scheduler.agent.http import ServerFiles
from scheduler.agent.protocol import ProtocolError
from scheduler.agent.runner import Run
from scheduler.agent.services import ServiceLauncher

logger = logging.getLogger(__name__)

AUTH_CLOSE_CODES = frozenset({protocol.CLOSE_BAD_KEY, protocol.CLOSE_NOT_WORKER, protocol.CLOSE_NAME_OWNED})
# What each close code of the server means to whoever runs the agent (`{name}`: this agent's name).
CLOSE_MEANINGS = {
    protocol.CLOSE_BAD_HELLO: "the server did not accept this agent's hello: are the agent and the server one version?",
    protocol.CLOSE_BAD_KEY: "the server refused the API key: missing, unknown, revoked or expired",
    protocol.CLOSE_NOT_WORKER: "the API key is not a worker key: the agent needs a key with the worker role",
    protocol.CLOSE_NOT_FOUND: "the server has no worker endpoint at this address: check --server",
    protocol.CLOSE_NAME_IN_USE: (
        "another worker named {name!r} is connected to this server; if it is another machine, start this one "
        "with --name (the name defaults to the host name). Retrying: the name is this agent's again once that "
        "worker is gone"
    ),
    protocol.CLOSE_NAME_OWNED: (
        "the worker name {name!r} is registered to another account's API key; start this agent with another "
        "--name, or have that key revoked to take the name over"
    ),
    protocol.CLOSE_RECONNECT: "the server asked this agent to reconnect",
    protocol.CLOSE_UNAVAILABLE: "the server cannot reach its database; retrying",
}
OUTBOX_LIMIT = 10_000
# `log` messages of one run held until the server acknowledges them (each up to 200 lines).
UNACKED_LOGS_LIMIT = 1_000
# Flow control of a run's output while connected to a server that acknowledges `log` messages: at
# LOG_WINDOW unacknowledged ones the agent stops reading the run's pipes (the task then waits on its
# own writes), and reads on once acknowledgements bring them down to LOG_WINDOW_RESUME. The server
# applies a connection's messages in order: unbounded, a chatty run's lines would hold up the
# heartbeats behind them until the lease ran out.
LOG_WINDOW = 32
LOG_WINDOW_RESUME = 16
# Tokens of runs cancelled before they were started here, and of runs this agent has finished with
# (settled, or taken away by the server), remembered so that a late or repeated `assign` of one
# starts nothing: so many of each, the oldest forgotten first.
RECENT_TOKENS_LIMIT = 1_000
# A running run's standing state (its sidecars' last `plugin_status`, its service's `service_ready`
# and last `service_activity`) is said again every `AgentConfig.standing_report_seconds` and after
# each reconnect: nothing answers those, and one the server failed to apply would otherwise stand
# wrong until it changed (a lost activity would stop a Jupyter service as idle too early).
STANDING_REPORTS = frozenset({"plugin_status", "service_ready", "service_activity"})
EXIT_OK, EXIT_UNREPORTED, EXIT_REFUSED = 0, 1, 2
# A forced stop (`Agent.shutdown`): each run gets SIGTERM and its own `cancel_grace_seconds`, at most
# this long, before SIGKILL; then its files are stored for this long at most. Past both, what is
# still going is killed and reported without its files. `manage.py serve` waits this long and more.
FORCED_STOP_GRACE_SECONDS = 10.0
FORCED_STOP_COLLECT_SECONDS = 20.0


class CredentialsRefused(Exception):
    """The server will not accept this key; retrying cannot help."""


def close_explained(closed: ConnectionClosed, *, name: str) -> str | None:
    """What the server's close code means, with the reason it gave; None for a code it does not send."""
    if closed.rcvd is None or closed.rcvd.code not in CLOSE_MEANINGS:
        return None
    meaning = CLOSE_MEANINGS[closed.rcvd.code].format(name=name)
    said = f", the server said: {closed.rcvd.reason}" if closed.rcvd.reason else ""
    return f"{meaning} (close code {closed.rcvd.code}{said})"


class ServerUnresponsive(TimeoutError):
    """The server did not answer a ping in time: the connection is given up and made again."""


@dataclass
class AgentConfig:
    server_url: str
    api_key: str
    name: str
    capacity: Capacity
    work_root: Path
    connect_timeout: float = 10.0
    close_timeout: float = 5.0
    backoff_initial: float = 0.5
    backoff_max: float = 10.0
    shutdown_report_seconds: float = 5.0
    forced_stop_grace_seconds: float = FORCED_STOP_GRACE_SECONDS
    forced_stop_collect_seconds: float = FORCED_STOP_COLLECT_SECONDS
    standing_report_seconds: float = 30.0
    base_env: dict[str, str] | None = None
    # Files (docs/files-protocol.md). files_url defaults to the server's http(s) address.
    files_url: str | None = None
    http_timeout: float = 30.0
    transfer_retry_seconds: float = 120.0
    dataset_cache_bytes: int = agent_files.DEFAULT_DATASET_CACHE_BYTES
    max_unpack_bytes: int = agent_files.DEFAULT_MAX_UNPACK_BYTES
    max_unpack_members: int = agent_files.DEFAULT_MAX_UNPACK_MEMBERS
    upload_artifacts: bool = True
    # Finished runs' work directories kept (the most recent ones) when their files are stored on the server.
    keep_run_dirs: int = 0
    # Service runs (Jupyter): the address services bind and are reached at (default: the agent's
    # address on its connection to the server), and an optional container runtime (podman, docker).
    service_host: str = ""
    container_runtime: str = ""


@dataclass
class Backoff:
    """Exponential back-off with jitter: each delay is 50-100 % of min(max, initial * 2**n)."""

    initial: float
    maximum: float
    attempts: int = 0

    def next_delay(self) -> float:
        ceiling = min(self.maximum, self.initial * 2**self.attempts)
        self.attempts = min(self.attempts + 1, 32)
        return ceiling * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        self.attempts = 0


@dataclass
class _Held:
    """A run the agent is responsible for, until its final status and its log lines are acknowledged."""

    run: Run
    final: dict[str, Any] | None = None
    ended_at: float = 0.0  # when the final status was made
    final_sent_at: float | None = None
    final_acked: bool = False
    # Its `log` messages the server has not acknowledged, by `seq`: each with when it was last sent.
    logs: dict[int, tuple[dict[str, Any], float]] = field(default_factory=dict)
    # The last standing report of each kind and plugin, and when they were last sent.
    standing: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    standing_sent_at: float = 0.0
    dropped_logs: int = 0  # `log` messages given up past UNACKED_LOGS_LIMIT (while the server was away)
    # When the server last acknowledged one of its `log` messages, or when one began waiting for it.
    logs_progressed_at: float = 0.0

    @property
    def settled(self) -> bool:
        return self.final_acked and not self.logs

    def summary(self) -> dict[str, str]:
        status = self.final["status"] if self.final else self.run.progress
        return {"task_id": self.run.task_id, "token": self.run.token, "status": status}


@dataclass
class _Session:
    ws: ClientConnection
    heartbeat_seconds: float
    answer_seconds: float  # how long the server has to answer a ping
    # Messages queued together go out in one `batch` frame when the server accepts those.
    batches: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.worker_id: str | None = None
        self.instance = uuid.uuid4().hex  # this process, in every hello: its reconnects replace its old connection
        self._held: dict[str, _Held] = {}
        self._run_dirs = RunDirs(keep=config.keep_run_dirs, name=config.name)
        self._cancelled_unstarted = _RecentTokens()
        self._done_with = _RecentTokens()
        # Every run's supervising task, also of runs already forgotten but still being killed.
        self._run_tasks: set[asyncio.Task[None]] = set()
        self._outbox: deque[dict[str, Any]] = deque()
        self._session: _Session | None = None
        self._log_acks = True  # the server acknowledges `log` messages (its `welcome` says)
        # How long a run's final status waits for its earlier `log` messages to be acknowledged: a
        # lease, as the last `welcome` gave it. Past it the final goes anyway, so that a server
        # failing to store lines does not hold up the end for longer than it would a lost worker.
        self._final_hold_seconds = 30.0
        self._draining = False
        self._forced = False
        # The agent is exiting and kills what still runs: those runs' directories are left as a killed
        # agent's would be, for the next agent's start (it removes them unless kept).
        self._leaving = False
        self._give_up: asyncio.TimerHandle | None = None
        self._kill_later: asyncio.TimerHandle | None = None
        self._finished = asyncio.Event()
        self._exit_code = EXIT_OK
        self._backoff = Backoff(config.backoff_initial, config.backoff_max)
        self.launcher = ServiceLauncher(host=config.service_host or "127.0.0.1", runtime=config.container_runtime)
        # The fleet's plugin configuration as last announced (`config`): names, modes, images.
        self.plugins: dict[str, dict[str, Any]] = {}
        self.files = FileServices(
            server=ServerFiles(
                base_url=config.files_url or ServerFiles.from_worker_url(config.server_url),
                api_key=config.api_key,
                timeout=config.http_timeout,
            ),
            # Beside the runs' directories; a task id cannot start with a dot, so it never collides.
            cache=BlobCache(config.work_root / ".cache" / "blobs", max_bytes=config.dataset_cache_bytes),
            max_unpack_bytes=config.max_unpack_bytes,
            max_unpack_members=config.max_unpack_members,
            retry_seconds=config.transfer_retry_seconds,
            backoff_initial=config.backoff_initial,
            backoff_max=config.backoff_max,
            upload_artifacts=config.upload_artifacts,
        )

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> int:
        """Serve until drained, shut down or refused; the process exit code."""
        self._run_dirs.adopt(self.config.work_root)
        connection = asyncio.create_task(self._connection_loop())
        finished = asyncio.create_task(self._finished.wait())
        try:
            await asyncio.wait({connection, finished}, return_when=asyncio.FIRST_COMPLETED)
            if connection.done() and not connection.cancelled() and connection.exception():
                raise connection.exception()  # type: ignore[misc]
            # Let the session end with a proper close handshake before anything is cancelled.
            await asyncio.wait({connection}, timeout=self.config.close_timeout + 1)
        finally:
            for timer in (self._give_up, self._kill_later):
                if timer is not None:
                    timer.cancel()
            finished.cancel()
            connection.cancel()
            await asyncio.gather(connection, finished, return_exceptions=True)
            await self._abandon_runs()
        return self._exit_code

    @property
    def draining(self) -> bool:
        return self._draining

    def drain(self) -> None:
        if not self._draining:
            services = [held.run for held in self._held.values() if held.run.assignment.kind == "service"]
            logger.info(
                "draining: no new work; %d run(s) to finish, %d service(s) to stop",
                len(self._held) - len(services),
                len(services),
            )
            # Tell the server, so it stops assigning and re-queues what we will not take.
            self._enqueue(protocol.draining())
            # A service (Jupyter) never ends by itself: waiting for it would hold the drain for good.
            for run in services:
                run.wind_down()
        self._draining = True
        self._check_drained()

    def shutdown(self) -> None:
        """Stop every run now (SIGTERM, a short grace, SIGKILL), store its files as a cancel does and
        report it failed (`worker_lost`, so that the server re-queues it); give the reports a few
        seconds to be acknowledged. Called again, or once the grace and the collection are over,
        it kills what still runs at once."""
        if self._forced:
            self._kill_runs()
            return
        going = [held for held in self._held.values() if held.final is None]
        cap = self.config.forced_stop_grace_seconds
        logger.warning(
            "shutting down: killing %d run(s): SIGTERM, SIGKILL after their cancel grace (%g s at most), "
            "their files stored; the server re-queues them",
            len(going),
            cap,
        )
        self._draining = self._forced = True
        for held in going:
            if held.run.progress != "collecting":  # one that exited by itself reports its own outcome
                held.run.give_up(grace=cap)  # a no-op for a run already being stopped (a cancel)
        self._kill_later = asyncio.get_running_loop().call_later(
            cap + self.config.forced_stop_collect_seconds, self._kill_runs
        )
        self._check_drained()

    def _kill_runs(self) -> None:
        """The forced stop's last step: what still runs (or still stores its files) is killed at once."""
        if self._kill_later is not None:
            self._kill_later.cancel()
        going = [held for held in self._held.values() if held.final is None]
        if going:
            logger.warning("killing %d run(s) at once, storing no more of their files", len(going))
        for held in going:
            held.run.shutdown()

    def unacknowledged_logs(self, token: str) -> int:
        """How many `log` messages of the run of `token` wait for the server's acknowledgement."""
        held = self._held.get(token)
        return len(held.logs) if held is not None else 0

    def held_runs(self) -> list[dict[str, str]]:
        """The runs the agent is responsible for: still going, or finished but not yet acknowledged."""
        return [held.summary() for held in self._held.values()]

    @property
    def connected(self) -> bool:
        """Whether the agent is connected to a server that welcomed it."""
        return self._session is not None

    @property
    def failed_attempts(self) -> int:
        """Connection attempts failed since the last welcome."""
        return self._backoff.attempts

    def _yield_runs_to_namesake(self) -> None:
        """Refused because another live agent holds this worker's name: the server answers that only
        while it heartbeats, and its hello has ended this agent's runs there (re-queued as worker_lost,
        or handed to it). Running on would do their work twice, beside their new attempts."""
        for held in list(self._held.values()):
            self._stop_run(held, f"another agent named {self.config.name!r} took this worker's runs over")

    def _stop_run(self, held: _Held, why: str) -> None:
        """Kill a run the server no longer counts as this agent's, and say nothing more about it."""
        logger.warning("stopping task %s (token %s): %s", held.run.task_id, held.run.token, why)
        self._forget(held.run.token, kill=True)

    def _give_up_reporting(self) -> None:
        if self._held:
            unsettled = len(self._held)
            logger.error("exiting with %d run(s) whose outcome or log lines the server has not acknowledged", unsettled)
            self._exit_code = EXIT_UNREPORTED
        self._finished.set()

    def _check_drained(self) -> None:
        if self._forced and self._give_up is None and all(held.final is not None for held in self._held.values()):
            # Every run of the forced stop has ended: its reports get a few seconds to be acknowledged.
            self._give_up = asyncio.get_running_loop().call_later(
                self.config.shutdown_report_seconds, self._give_up_reporting
            )
        if self._draining and not self._held and not self._finished.is_set():
            if not self._forced:
                # The last line of a drained agent: its exit is the end of a drain, not a crash.
                logger.info("drained: every run finished and reported; exiting")
            self._finished.set()

    def _stop_runs_leaving(self) -> None:
        """The agent is exiting: every run is killed, its directory left for the next agent's start."""
        self._leaving = True
        for held in self._held.values():
            held.run.stop()

    async def _abandon_runs(self) -> None:
        """On the way out: nothing we started may outlive the agent."""
        self._stop_runs_leaving()
        if self._run_tasks:
            await asyncio.wait(self._run_tasks, timeout=self.config.shutdown_report_seconds + 10)
        await self._run_dirs.wait()

    # -- connection --------------------------------------------------------------------------

    async def _connection_loop(self) -> None:
        while True:
            try:
                await self._connect_once()
            except CredentialsRefused as exc:
                logger.error("%s; stopping", exc)
                self._exit_code = EXIT_REFUSED
                self._stop_runs_leaving()
                self._finished.set()
                return
            except ConnectionClosed as exc:
                explained = close_explained(exc, name=self.config.name)
                logger.warning("connection to %s closed: %s", self.config.server_url, explained or exc)
                if exc.rcvd is not None and exc.rcvd.code == protocol.CLOSE_NAME_IN_USE:
                    self._yield_runs_to_namesake()
            except (OSError, TimeoutError, InvalidHandshake, ProtocolError) as exc:
                logger.warning("connection to %s lost or refused: %s", self.config.server_url, exc)
            if self._finished.is_set():
                return
            delay = self._backoff.next_delay()
            logger.info("reconnecting in %.2f s", delay)
            await asyncio.sleep(delay)

    async def _connect_once(self) -> None:
        try:
            async with connect(
                self.config.server_url,
                additional_headers={"X-API-Key": self.config.api_key},
                open_timeout=self.config.connect_timeout,
                close_timeout=self.config.close_timeout,
                ping_interval=None,  # pings once welcomed, timed by the lease (`_liveness`)
            ) as ws:
                try:
                    await self._serve(ws)
                finally:
                    self._session = None
                    self._pace_all()  # no run waits for acknowledgements that cannot come now
        except InvalidStatus as exc:
            if exc.response.status_code in (401, 403):
                raise CredentialsRefused(
                    f"the server refused this worker's credentials (HTTP {exc.response.status_code})"
                ) from None
            raise
        except ConnectionClosed as exc:
            if exc.rcvd is not None and exc.rcvd.code in AUTH_CLOSE_CODES:
                raise CredentialsRefused(close_explained(exc, name=self.config.name)) from None
            raise

    async def _serve(self, ws: ClientConnection) -> None:
        address = ws.local_address[0] if ws.local_address else ""
        if not self.config.service_host and address:
            self.launcher.host = address
        await ws.send(
            protocol.encode(
                protocol.hello(
                    name=self.config.name,
                    instance=self.instance,
                    hostname=address,
                    capabilities=self.config.capacity.as_capabilities(),
                    running=self.held_runs(),
                )
            )
        )
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that races the reply.
        async with asyncio.timeout(self.config.connect_timeout):
            welcome = protocol.parse_welcome(protocol.decode(await ws.recv()))
        self.worker_id = welcome.worker_id
        self._backoff.reset()
        # Out of touch (the server restarting, its database out of reach), the agent tries again at
        # least every third of the lease: heard within a lease of the system coming back, it keeps
        # the lease and its runs (the scheduler waits that long after an outage of its own).
        self._backoff.maximum = min(self.config.backoff_max, welcome.lease_seconds * protocol.LEASE_SHARE_TO_RECONNECT)
        logger.info("connected to %s as %s (worker %s)", self.config.server_url, self.config.name, welcome.worker_id)
        self._log_acks = protocol.LOG_ACK in welcome.features
        self._final_hold_seconds = welcome.lease_seconds
        for token in welcome.kill:
            held = self._held.get(token)
            # A run that ended is settled by its re-sent final status (and logs), which the server answers.
            if held is not None and held.final is None:
                self._stop_run(held, "the server no longer holds this run for this worker (it was re-queued or ended)")
        if not self._log_acks:
            for held in list(self._held.values()):
                held.logs.clear()
                self._forget_if_settled(held)
        session = self._session = _Session(
            ws=ws,
            heartbeat_seconds=welcome.heartbeat_seconds,
            # A server that stops answering (frozen, starved of CPU, a dead network path) is left.
            answer_seconds=welcome.lease_seconds * protocol.LEASE_SHARE_TO_RECONNECT,
            batches=protocol.BATCH in welcome.features,
        )
        self._pace_all()  # a run with many messages kept through the outage waits for their acknowledgements
        if self._draining:
            self._enqueue(protocol.draining())  # a restarted server must hear it again
        self._resend_unacknowledged(older_than=0.0, standing_older_than=0.0)
        session.wake.set()
        tasks = [
            asyncio.create_task(self._receive(session)),
            asyncio.create_task(self._send(session)),
            asyncio.create_task(self._heartbeat(session)),
            asyncio.create_task(self._liveness(session)),
            asyncio.create_task(self._finished.wait()),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # a lost connection surfaces here
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._finished.is_set():
                await self._flush(session)

    async def _send(self, session: _Session) -> None:
        while True:
            await session.wake.wait()
            session.wake.clear()
            await self._send_outbox(session)

    async def _send_outbox(self, session: _Session) -> None:
        while self._outbox:
            # A frame's worth at a time (one message, or a batch), so that what is about runs
            # forgotten meanwhile is dropped when its frame is put together: nothing more about them.
            limit = protocol.MAX_BATCH if session.batches else 1
            taken = [self._outbox.popleft() for _ in range(min(len(self._outbox), limit))]
            wanted = [message for message in taken if self._still_about(message.get("token"))]
            sent = 0
            try:
                for text, count in protocol.frames(wanted, batches=session.batches):
                    await session.ws.send(text)
                    sent += count
            except BaseException:
                self._outbox.extendleft(reversed(wanted[sent:]))  # sent again on the next connection
                raise

    def _still_about(self, token: str | None) -> bool:
        """Whether a queued message is still to be sent: not about a run forgotten since."""
        return token is None or token in self._held or token in self._cancelled_unstarted

    async def _flush(self, session: _Session) -> None:
        """On the way out, send what is still queued (the draining notice above all), briefly;
        final statuses held back for their lines go too: an end told beats an end lost."""
        for held in self._held.values():
            if held.final is not None and held.final_sent_at is None:
                held.final_sent_at = time.monotonic()
                self._enqueue(held.final)
        try:
            async with asyncio.timeout(self.config.close_timeout):
                await self._send_outbox(session)
        except (TimeoutError, ConnectionClosed, OSError) as exc:
            logger.info("leaving with %d message(s) unsent: %s", len(self._outbox), exc)

    async def _heartbeat(self, session: _Session) -> None:
        while True:
            self._enqueue(protocol.heartbeat(running=self.held_runs()))
            if self._draining:
                # Said again with every heartbeat: a `draining` the server failed to apply would
                # leave it assigning runs this agent will not take.
                self._enqueue(protocol.draining())
            self._resend_unacknowledged(
                older_than=session.heartbeat_seconds, standing_older_than=self.config.standing_report_seconds
            )
            self._pace_all()  # a run held past a lease without acknowledgements reads on
            await asyncio.sleep(session.heartbeat_seconds)

    async def _liveness(self, session: _Session) -> None:
        """Ping the server every heartbeat; end the connection if it does not answer in time."""
        unanswered = ServerUnresponsive(f"the server did not answer a ping within {session.answer_seconds:g} s")
        while True:
            await asyncio.sleep(session.heartbeat_seconds)
            deadline = asyncio.get_running_loop().time() + session.answer_seconds
            try:
                # The ping's own send too: a server that stopped reading leaves it waiting for room.
                async with asyncio.timeout_at(deadline):
                    pong = await session.ws.ping()
            except TimeoutError:
                raise unanswered from None
            # Judged by the pong itself, not by which came first: after this process was stopped
            # and resumed, the answer already waiting and the expired timer are handled together.
            answered, _ = await asyncio.wait({pong}, timeout=max(deadline - asyncio.get_running_loop().time(), 0))
            if not answered:
                raise unanswered

    async def _receive(self, session: _Session) -> None:
        async for raw in session.ws:
            for message in protocol.decode_frame(raw):
                try:
                    self._handle(_valid(message))
                except ProtocolError as exc:
                    logger.warning("ignoring a bad message from the server: %s", exc)

    # -- outgoing ----------------------------------------------------------------------------

    def _enqueue(self, message: dict[str, Any]) -> None:
        if len(self._outbox) >= OUTBOX_LIMIT:
            dropped = self._outbox.popleft()
            why = "while disconnected" if self._session is None else "faster than the server takes them"
            logger.warning(
                "outbox full (%s messages queued %s); dropped a %s message", OUTBOX_LIMIT, why, dropped["type"]
            )
        self._outbox.append(message)
        if self._session is not None:
            self._session.wake.set()

    def _emit(self, message: dict[str, Any]) -> None:
        """A run's message: queued; a `log` also held until the server acknowledges it, a standing
        report kept to be said again."""
        held = self._held.get(message.get("token", ""))
        if message["type"] == "log" and held is not None and self._log_acks:
            # Reached only while the server is away: connected, `_pace` holds the run at LOG_WINDOW.
            if len(held.logs) >= UNACKED_LOGS_LIMIT:
                del held.logs[min(held.logs)]
                held.dropped_logs += 1
                if held.dropped_logs == 1:
                    logger.warning(
                        "task %s: %d log messages unacknowledged; dropping the oldest (its log files keep every line)",
                        held.run.task_id,
                        UNACKED_LOGS_LIMIT,
                    )
            if not held.logs:
                held.logs_progressed_at = time.monotonic()
            held.logs[message["seq"]] = (message, time.monotonic())
            self._pace(held)
        elif message["type"] in STANDING_REPORTS and held is not None:
            held.standing[(message["type"], message.get("name", ""))] = message
            held.standing_sent_at = time.monotonic()
        self._enqueue(message)

    def _pace(self, held: _Held) -> None:
        """Flow control of a run's output: held at LOG_WINDOW unacknowledged `log` messages, read on
        at LOG_WINDOW_RESUME. Only while connected to a server that acknowledges them: while it is away
        the run reads on, its messages kept up to UNACKED_LOGS_LIMIT (then the oldest go), so that an
        outage does not stall its work; its log files keep every line anyway. Nor does a server that
        stops acknowledging them: held for a lease without one, the run reads on as if it were away."""
        if self._session is None or not self._log_acks:
            held.run.release_output()
        elif len(held.logs) >= LOG_WINDOW:
            if time.monotonic() - held.logs_progressed_at < self._final_hold_seconds:
                held.run.hold_output()
            elif held.run.output_held:
                logger.warning(
                    "task %s: the server acknowledged none of its log messages for %.0f s; reading its output on",
                    held.run.task_id,
                    self._final_hold_seconds,
                )
                held.run.release_output()
        elif len(held.logs) <= LOG_WINDOW_RESUME:
            held.run.release_output()

    def _pace_all(self) -> None:
        for held in list(self._held.values()):
            self._pace(held)

    def _resend_unacknowledged(self, *, older_than: float, standing_older_than: float) -> None:
        """Send again the final statuses and `log` messages not acknowledged within `older_than`
        seconds, and the standing reports of running runs last sent `standing_older_than` ago. What
        is still in the outbox (made while the server was away, or not sent yet) is not queued twice."""
        now = time.monotonic()
        queued = {id(message) for message in self._outbox}
        for held in self._held.values():
            # Only while it runs: about an ended run the server takes nothing but its outcome and lines.
            if held.final is None and held.standing and now - held.standing_sent_at >= standing_older_than:
                held.standing_sent_at = now
                for message in held.standing.values():
                    if id(message) not in queued:
                        self._enqueue(message)
            for seq, (message, sent_at) in sorted(held.logs.items()):
                if now - sent_at >= older_than:
                    held.logs[seq] = (message, now)
                    if id(message) not in queued:
                        self._enqueue(message)
            self._send_final_when_due(held, older_than=older_than, queued=queued)

    def _send_final_when_due(self, held: _Held, *, older_than: float = 0.0, queued: Set[int] = frozenset()) -> None:
        """Send the run's final status, unless it was sent less than `older_than` seconds ago (or is
        among the outbox's messages `queued`) or earlier `log` messages still wait for their
        acknowledgement: the server records the end once every line before it is stored, so that
        whoever reads or follows the log of an ended run has all of it. Held back for
        `_final_hold_seconds` at most."""
        if held.final is None or held.final_acked:
            return
        now = time.monotonic()
        if held.logs and now - held.ended_at < self._final_hold_seconds:
            return
        if held.final_sent_at is None or now - held.final_sent_at >= older_than:
            held.final_sent_at = now
            if id(held.final) not in queued:
                self._enqueue(held.final)

    # -- incoming ----------------------------------------------------------------------------

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "assign":
            self._on_assign(message)
        elif kind == "cancel":
            task_id, token = protocol.token_of(message)
            held = self._held.get(token)
            if held is None:
                self._cancel_unstarted(task_id, token)
            elif held.final is None:
                logger.info("cancelling task %s: %s", task_id, message.get("reason", ""))
                held.run.cancel()
        elif kind == "stop":
            task_id, token = protocol.token_of(message)
            # The server answers each report of a run it took away (a backlog of them after a
            # freeze): said once, for the run this agent still held.
            said = logger.info if token in self._held else logger.debug
            said("stopping task %s (token %s): %s", task_id, token, message.get("reason", ""))
            self._forget(token, kill=True)
        elif kind == "status_ack":
            _, token = protocol.token_of(message)
            held = self._held.get(token)
            if held is not None and held.final is not None:
                if message.get("accepted") is False:
                    logger.warning("server refused the final status of task %s", held.run.task_id)
                if not held.final_acked:
                    run = held.run
                    self._run_dirs.finished(task_id=run.task_id, work_dir=run.work_dir, unstored=run.unstored)
                held.final_acked = True
                self._forget_if_settled(held)
        elif kind == "log_ack":
            token, seq = protocol.log_ack_of(message)
            held = self._held.get(token)
            if held is not None:
                held.logs.pop(seq, None)
                held.logs_progressed_at = time.monotonic()
                self._pace(held)
                self._send_final_when_due(held, older_than=float("inf"))
                self._forget_if_settled(held)
        elif kind == "drain":
            self.drain()
        elif kind == "config":
            self._on_config(message)
        elif kind == "error":
            logger.warning(
                "server error %s about a %s message: %s",
                message.get("code"),
                message.get("ref_type"),
                message.get("message"),
            )
        else:
            logger.info("ignoring %s outside the handshake", kind)

    def _on_config(self, message: dict[str, Any]) -> None:
        """A plugin configuration changed. New runs get it in their `assign`; running sidecars keep theirs."""
        plugins = message.get("plugins")
        if not isinstance(plugins, list):
            raise ProtocolError("field 'plugins': a list is required")
        for plugin in plugins:
            if isinstance(plugin, dict) and isinstance(plugin.get("name"), str):
                self.plugins[plugin["name"]] = plugin
                logger.info(
                    "plugin %s is now %s (mode %s)%s",
                    plugin["name"],
                    "enabled" if plugin.get("enabled") else "disabled",
                    plugin.get("mode"),
                    "; running sidecars keep the old configuration until their task ends"
                    if message.get("restart_required")
                    else "",
                )

    def _cancel_unstarted(self, task_id: str, token: str) -> None:
        """A cancel for a run this agent does not hold: its `assign` never came, was refused or is
        still on its way (the two are sent by different processes). Nothing runs, so the run is
        reported cancelled, which frees its slot; left unanswered, the task would stay active."""
        if token not in self._cancelled_unstarted:
            logger.info("task %s (token %s) cancelled before this worker started it", task_id, token)
            self._cancelled_unstarted.add(token)
        self._enqueue(
            protocol.status(
                task_id=task_id, token=token, status="cancelled", error="cancelled before this worker started it"
            )
        )

    def _on_assign(self, message: dict[str, Any]) -> None:
        assignment = protocol.parse_assign(message)
        if assignment.token in self._cancelled_unstarted:
            self._cancel_unstarted(assignment.task_id, assignment.token)
            return
        if assignment.token in self._done_with:
            # Sent again before the server recorded this run's end (its re-send raced the report):
            # started again, it would run twice and its new directory replace the kept one.
            logger.info(
                "task %s (token %s) was run here already; not starting it again", assignment.task_id, assignment.token
            )
            return
        if assignment.token in self._held:
            # Ack again (our first ack may have been lost), draining or not, but never run it twice.
            self._enqueue(protocol.ack(task_id=assignment.task_id, token=assignment.token))
            return
        if self._draining:
            logger.info("draining: not taking task %s", assignment.task_id)
            return
        self._enqueue(protocol.ack(task_id=assignment.task_id, token=assignment.token))
        run = Run(
            assignment,
            work_root=self.config.work_root,
            emit=self._emit,
            base_env=self.config.base_env,
            files=self.files,
            launcher=self.launcher,
        )
        held = self._held[assignment.token] = _Held(run=run)
        task = asyncio.create_task(self._execute(held))
        self._run_tasks.add(task)
        task.add_done_callback(self._run_tasks.discard)
        logger.info("task %s started (token %s, attempt %s)", assignment.task_id, assignment.token, assignment.attempt)

    async def _execute(self, held: _Held) -> None:
        try:
            final = await held.run.execute()
        except Exception:
            logger.exception("task %s: the agent failed while supervising it", held.run.task_id)
            final = protocol.status(
                task_id=held.run.task_id,
                token=held.run.token,
                status="failed",
                failure_reason="worker_lost",
                error="the worker agent failed while supervising this run",
            )
        stopped = self._held.get(held.run.token) is not held
        if stopped or final is None:
            self._remove_taken_run_dir(held)
            if not stopped:
                self._forget(held.run.token, kill=False)
            return
        logger.info("task %s finished: %s", held.run.task_id, final["status"])
        self._run_dirs.ended(work_dir=held.run.work_dir, unstored=held.run.unstored)
        held.final, held.ended_at = final, time.monotonic()
        self._send_final_when_due(held)
        self._check_drained()

    def _forget_if_settled(self, held: _Held) -> None:
        if held.settled:
            self._forget(held.run.token, kill=False)

    def _forget(self, token: str, *, kill: bool) -> None:
        held = self._held.pop(token, None)
        self._done_with.add(token)
        if held is not None and kill:
            held.run.stop()
            if held.final is not None and not held.final_acked:
                # Taken away after it ended: its supervision (`_execute`) is over, so its directory goes here.
                self._remove_taken_run_dir(held)
        self._check_drained()

    def _remove_taken_run_dir(self, held: _Held) -> None:
        """The server took the run away (a `stop`, its reconcile, its files refused): nothing in its
        directory is wanted now that a new attempt runs elsewhere. Removed as a finished run's, unless
        among the most recent kept; an exiting agent leaves it for the next start (`_leaving`)."""
        if not self._leaving:
            self._run_dirs.finished(task_id=held.run.task_id, work_dir=held.run.work_dir, unstored="")


class _RecentTokens:
    """The last `RECENT_TOKENS_LIMIT` tokens added, the oldest forgotten first."""

    def __init__(self) -> None:
        self._tokens: dict[str, None] = {}  # a dict keeps insertion order

    def add(self, token: str) -> None:
        self._tokens[token] = None
        if len(self._tokens) > RECENT_TOKENS_LIMIT:
            del self._tokens[next(iter(self._tokens))]

    def __contains__(self, token: object) -> bool:
        return token in self._tokens


def _valid(message: dict[str, Any] | ProtocolError) -> dict[str, Any]:
    """A message of `protocol.decode_frame`, or the error it is raised."""
    if isinstance(message, ProtocolError):
        raise message
    return message
