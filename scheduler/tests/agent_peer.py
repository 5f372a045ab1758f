"""Test helpers for the worker agent: a real WebSocket server playing the server side of the protocol.

`Peer` records every message the agent sends (and the types of each frame's messages), answers
`hello` with `welcome` (optionally with a reconcile list and the features it accepts, none by
default, as an older server) and acknowledges final statuses unless told not to, and `log`
messages when it lists `log_ack` and is not told otherwise. Tests wait on what it
receives with timeouts instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve

from scheduler.agent.capacity import Capacity
from scheduler.agent.client import Agent, AgentConfig
from scheduler.management.commands.worker import API_KEY_ENV

API_KEY = "fetchml_test_secret"
WAIT_SECONDS = 15.0
FINAL = {"completed", "failed", "cancelled"}
MANAGE_PY = Path(__file__).resolve().parents[2] / "manage.py"


class Peer:
    def __init__(
        self,
        *,
        port: int = 0,
        heartbeat_seconds: float = 5.0,
        lease_seconds: float | None = None,
        ack_finals: bool = True,
        ack_logs: bool = True,
        kill: list[str] | None = None,
        api_key: str = API_KEY,
        features: list[str] | None = None,
        refuse_hello: tuple[int, str] | None = None,
    ) -> None:
        self.port = port
        self.refuse_hello = refuse_hello  # the close code and reason that answer every hello
        self.api_key = api_key
        self.heartbeat_seconds = heartbeat_seconds
        self.lease_seconds = heartbeat_seconds * 6 if lease_seconds is None else lease_seconds
        self.ack_finals = ack_finals
        self.ack_logs = ack_logs and "log_ack" in (features or [])
        self.kill = kill or []
        self.features = features
        self.messages: list[dict[str, Any]] = []
        self.frames: list[list[str]] = []  # per frame received after hello: its messages' types
        self.hellos: list[dict[str, Any]] = []
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._connection: ServerConnection | None = None
        self._connected = asyncio.Event()
        self._server: Server | None = None
        self._frozen: list[ServerConnection] = []

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/worker"

    async def __aenter__(self) -> Peer:
        self._server = await serve(self._handle, "127.0.0.1", self.port)
        self.port = next(iter(self._server.sockets)).getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop listening and drop the connection, as a server that goes away would."""
        for connection in self._frozen:  # no close handshake from a frozen server
            connection.transport.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, ws: ServerConnection) -> None:
        if ws.request is None or ws.request.headers.get("X-API-Key") != self.api_key:
            await ws.close(4401, "invalid key")
            return
        hello = json.loads(await ws.recv())
        self.hellos.append(hello)
        if self.refuse_hello is not None:
            await ws.close(*self.refuse_hello)
            return
        await ws.send(
            json.dumps(
                {
                    "type": "welcome",
                    "version": 1,
                    "worker_id": "w-1",
                    "heartbeat_seconds": self.heartbeat_seconds,
                    "lease_seconds": self.lease_seconds,
                    "reconcile": {"keep": [], "kill": self.kill},
                }
                | ({"features": self.features} if self.features is not None else {})
            )
        )
        self._connection = ws
        self._connected.set()
        async for raw in ws:
            frame = json.loads(raw)
            messages = frame["messages"] if frame["type"] == "batch" else [frame]
            self.frames.append([message["type"] for message in messages])
            for message in messages:
                self.messages.append(message)
                self._queue.put_nowait(message)
                if self.ack_finals and message["type"] == "status" and message["status"] in FINAL:
                    await self.send(
                        {
                            "type": "status_ack",
                            "task_id": message["task_id"],
                            "token": message["token"],
                            "accepted": True,
                        }
                    )
                if self.ack_logs and message["type"] == "log":
                    await self.ack_log(message)

    async def close_connection(self, code: int, reason: str) -> None:
        """Close the current connection with `code`, as the server does to a key it stops accepting."""
        assert self._connection is not None
        await self._connection.close(code, reason)

    def freeze(self) -> None:
        """Stop reading the current connection, as a server process that froze would: pings go unanswered."""
        assert self._connection is not None
        self._connection.transport.pause_reading()
        self._frozen.append(self._connection)

    async def ack_log(self, message: dict[str, Any]) -> None:
        await self.send(
            {"type": "log_ack", "task_id": message["task_id"], "token": message["token"], "seq": message["seq"]}
        )

    async def connected(self) -> None:
        await asyncio.wait_for(self._connected.wait(), WAIT_SECONDS)

    async def send(self, message: dict[str, Any]) -> None:
        await self.connected()
        assert self._connection is not None
        await self._connection.send(json.dumps({"version": 1, **message}))

    async def send_batch(self, messages: list[dict[str, Any]]) -> None:
        await self.send({"type": "batch", "messages": [{"version": 1, **message} for message in messages]})

    async def next(self, where: Callable[[dict[str, Any]], bool], timeout: float = WAIT_SECONDS) -> dict[str, Any]:
        """The next received message matching `where` (earlier non-matching ones are skipped)."""

        async def first() -> dict[str, Any]:
            while True:
                message = await self._queue.get()
                if where(message):
                    return message

        return await asyncio.wait_for(first(), timeout)

    async def status(self, token: str, status: str, timeout: float = WAIT_SECONDS) -> dict[str, Any]:
        return await self.next(
            lambda m: m["type"] == "status" and m["token"] == token and m["status"] == status, timeout
        )

    async def final(self, token: str, timeout: float = WAIT_SECONDS) -> dict[str, Any]:
        return await self.next(
            lambda m: m["type"] == "status" and m["token"] == token and m["status"] in FINAL, timeout
        )

    async def finals(self, *tokens: str) -> list[dict[str, Any]]:
        """The final statuses of the runs of `tokens`, in whatever order they arrive."""
        arrived: dict[str, dict[str, Any]] = {}
        while len(arrived) < len(tokens):
            message = await self.next(lambda m: m["type"] == "status" and m["token"] in tokens and m["status"] in FINAL)
            arrived[message["token"]] = message
        return [arrived[token] for token in tokens]

    def about(self, token: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("token") == token]

    def log_lines(self, token: str, stream: str = "stdout") -> list[str]:
        return [
            line["line"]
            for m in self.about(token)
            if m["type"] == "log"
            for line in m["lines"]
            if line["stream"] == stream
        ]


def is_status(message: dict[str, Any], token: str) -> bool:
    return message["type"] == "status" and message["token"] == token


def assign(
    command: str, *, args: str = "", token: str | None = None, task_id: str | None = None, **fields: Any
) -> dict[str, Any]:
    return {
        "type": "assign",
        "task_id": task_id or uuid.uuid4().hex,
        "token": token or str(uuid.uuid4()),
        "attempt": 1,
        "kind": "batch",
        "entrypoint": command,
        "args": args,
        "env": {},
        "resources": {"cpu": 1, "memory_gb": 1, "gpus": 0, "gpu_indices": []},
        "timeout_seconds": 60,
        "cancel_grace_seconds": 5,
        "node": {"rank": 0, "count": 1, "master_addr": "127.0.0.1", "master_port": 29500},
        "snapshot_id": "",
        "dataset_specs": [],
        **fields,
    }


def python(code: str) -> str:
    """An entrypoint running `code` with this interpreter (unbuffered, so lines arrive as printed)."""
    return f"{shlex.quote(sys.executable)} -u -c {shlex.quote(code)}"


def gated(gate: Path, code: str = "") -> str:
    """A task that runs `code`, waits for the file `gate` to exist, then prints 'done'."""
    return python(f"import os, time\n{code}\nwhile not os.path.exists({str(gate)!r}): time.sleep(0.01)\nprint('done')")


TEST_CAPACITY = Capacity(cpu_cores=2, memory_gb=4, gpu_count=0, gpu_type="", batch_slots=2, service_slots=1)


def agent_config(url: str, work_root: Path, **overrides: Any) -> AgentConfig:
    settings: dict[str, Any] = {
        "api_key": API_KEY,
        "name": "test-box",
        "capacity": TEST_CAPACITY,
        "connect_timeout": 5.0,
        "close_timeout": 2.0,
        "backoff_initial": 0.05,
        "backoff_max": 0.3,
        "shutdown_report_seconds": 2.0,
        "upload_artifacts": False,  # this peer speaks only the WebSocket protocol, not the file API
    }
    return AgentConfig(server_url=url, work_root=work_root, **{**settings, **overrides})


@contextlib.asynccontextmanager
async def running_agent(url: str, work_root: Path, **overrides: Any) -> AsyncIterator[Agent]:
    """An agent serving in this event loop; on exit it is cancelled and its runs are reaped."""
    agent = Agent(agent_config(url, work_root, **overrides))
    task = asyncio.create_task(agent.run())
    try:
        yield agent
    finally:
        task.cancel()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), WAIT_SECONDS + 10)


async def until(predicate: Callable[[], bool], timeout: float = WAIT_SECONDS, what: str = "condition") -> None:
    """Wait for a condition that has no event to wait on (another process's state)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def ended_while_away(peer: Peer, agent: Agent, message: dict[str, Any], gate: Path) -> int:
    """Send `peer`'s agent `message` (a run that waits for the file `gate`), see it running, then
    go away as a server would, open the gate and wait until the run has ended. The port to serve
    again on."""
    await peer.send(message)
    await peer.status(message["token"], "running")
    port = peer.port
    await peer.close()
    gate.touch()
    ended = {"task_id": message["task_id"], "token": message["token"], "status": "completed"}
    await until(lambda: agent.held_runs() == [ended], what="the run to end while the server is away")
    return port


def process_gone(pid: int) -> bool:
    """True once `pid` has exited (a zombie waiting for its reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    return state in {"Z", "X"}


def run_async(coro: Any, timeout: float = 60.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


@contextlib.asynccontextmanager
async def worker_process(peer: Peer, tmp_path: Path, *extra: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """`manage.py worker` against `peer`, the key passed through the environment; stderr goes to tmp_path/worker.log."""
    log = tmp_path / "worker.log"
    with log.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(MANAGE_PY),
            "worker",
            "--server",
            f"http://127.0.0.1:{peer.port}",
            "--name",
            "cmd-box",
            "--workdir",
            str(tmp_path / "work"),
            "--no-artifacts",  # the peer has no file API
            *extra,
            env={**os.environ, API_KEY_ENV: API_KEY, "FETCHML_LOG_LEVEL": "INFO"},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        await asyncio.wait_for(process.wait(), 15)
