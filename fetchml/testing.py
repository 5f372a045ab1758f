"""Test helpers for every app: a live ASGI server in a child process, an SSE parser, TCP gates
that cut or mute a service, and a network namespace whose link to a service can fall silent.

`LiveServer` runs daphne on `fetchml.asgi:application` against the test
database, for end-to-end tests over real HTTP and WebSockets:

    with LiveServer(database_url=database_url_for(connection)) as server:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=10)

With SQLite the test database is a file (see settings), so tests that use it
must commit their data (`transactional_db`) for the server to see it.
"""

import asyncio
import contextlib
import functools
import http.client
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Self
from urllib.parse import quote, urlsplit, urlunsplit

from asgiref.sync import async_to_sync
from django.conf import settings
from django.test import AsyncClient

HOST = "127.0.0.1"


def free_port(host: str = HOST) -> int:
    """A port nobody listens on right now on `host` (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def first_line(stream: IO[str], *, timeout: float, what: str) -> str:
    """The first line a child process writes to the pipe `stream`, waited for at most `timeout`
    seconds ("" if the child closed it first)."""
    ready, _, _ = select.select([stream], [], [], timeout)
    if not ready:
        raise AssertionError(f"no line from {what} in {timeout} s")
    return stream.readline()


def backend_pid() -> int:
    """The PostgreSQL server process behind the calling thread's connection."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


@contextlib.contextmanager
def frozen(pid: int):
    """The process `pid` stopped (SIGSTOP) inside the block, as a host whose process hangs would
    leave it: its host still acknowledges every packet, so no network time-out fires."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def database_url_for(connection: Any) -> str:
    """A DATABASE_URL naming the database `connection` uses (the test database inside tests)."""
    config = connection.settings_dict
    if config["ENGINE"].endswith("sqlite3"):
        # Three slashes, then the absolute path's own leading slash.
        return "sqlite:///" + str(Path(config["NAME"]).resolve())
    if config["ENGINE"].endswith("postgresql"):
        credentials = quote(config.get("USER") or "", safe="")
        if config.get("PASSWORD"):
            credentials += ":" + quote(config["PASSWORD"], safe="")
        host = config.get("HOST") or "127.0.0.1"
        port = f":{config['PORT']}" if config.get("PORT") else ""
        return f"postgres://{credentials}@{host}{port}/{quote(config['NAME'], safe='')}"
    raise ValueError(f"no DATABASE_URL form for {config['ENGINE']}")


def raw_http_answer(server: "LiveServer", request: bytes) -> tuple[str, dict[str, str], dict]:
    """Send `request` as raw bytes (a whole request, or only its head) and read the answer until
    the server closes: its status line, its headers (names lowercased) and its JSON body."""
    with socket.create_connection((server.host, server.port), timeout=15) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return status, headers, json.loads(body)


class LiveServer:
    """Start daphne on a free port, wait for /health to answer; SIGTERM and wait on exit, always."""

    def __init__(
        self,
        *,
        database_url: str,
        env: dict[str, str] | None = None,
        startup_timeout: float = 60.0,
        stop_timeout: float = 10.0,
        network: "IsolatedNetwork | None" = None,
    ) -> None:
        self.database_url = database_url
        self.extra_env = env or {}
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.network = network  # run inside it, at its address, when given
        self.host = network.address if network else HOST
        self.port = 0
        self._process: subprocess.Popen | None = None
        self._log: Any = None
        self._stopped_output = ""

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        self.port = free_port()
        env = {
            **os.environ,  # REDIS_URL (shared channel layer and cache) passes through when set
            "DATABASE_URL": self.database_url,
            "DJANGO_SECRET_KEY": "test",
            "DJANGO_DEBUG": "true",  # no HTTPS redirect on plain HTTP
            "PYTHONUNBUFFERED": "1",
            **self.extra_env,
        }
        command = [sys.executable, "-m", "daphne", "-b", self.host, "-p", str(self.port), "fetchml.asgi:application"]
        if self.network is not None:
            command = self.network.command(command)
        # A file, not a pipe: a chatty server never blocks on it. Closed in stop().
        self._log = tempfile.TemporaryFile()  # noqa: SIM115
        self._process = subprocess.Popen(
            command, cwd=settings.BASE_DIR, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )
        try:
            self._wait_until_answering()
        except BaseException:
            self.stop()
            raise

    def _wait_until_answering(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self._process is None or self._process.poll() is not None:
                raise RuntimeError(f"live server exited during startup:\n{self.output()}")
            try:
                connection = http.client.HTTPConnection(self.host, self.port, timeout=2)
                try:
                    connection.request("GET", "/health")
                    connection.getresponse().read()  # any status: the server answers
                    return
                finally:
                    connection.close()
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"live server did not answer /health within {self.startup_timeout}s:\n{self.output()}"
                    ) from None
                time.sleep(0.05)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._stopped_output = self.output()
        if self._log is not None:
            self._log.close()
            self._log = None

    def output(self) -> str:
        """What the server printed so far (for failure messages)."""
        if self._log is None:
            return self._stopped_output
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode(errors="replace")


@dataclass(frozen=True)
class SSEEvent:
    """One parsed SSE block: an event with JSON data, or a comment (heartbeat)."""

    event: str | None = None
    data: Any = None
    id: str | None = None
    comment: str | None = None


def parse_sse_block(block: str) -> SSEEvent:
    fields: dict[str, str] = {}
    data_lines: list[str] = []
    comment = None
    for line in block.split("\n"):
        if line.startswith(":"):
            comment = line[1:].strip()
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data_lines.append(value)
        elif name in {"event", "id"}:
            fields[name] = value
    data = json.loads("\n".join(data_lines)) if data_lines else None
    return SSEEvent(event=fields.get("event"), data=data, id=fields.get("id"), comment=comment)


class SSEParser:
    """Feed it bytes as they arrive; it returns the complete events so far."""

    def __init__(self) -> None:
        self._buffer = ""

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        self._buffer += chunk.decode()
        *blocks, self._buffer = self._buffer.split("\n\n")
        return [parse_sse_block(block) for block in blocks if block]


def run_async(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test body in an event loop (pytest-django fixtures still apply).

    Blocking database calls made with sync_to_async/database_sync_to_async run
    on the test's own thread, so they use the test database connection.
    """

    @functools.wraps(test)
    def runner(*args: Any, **kwargs: Any) -> None:
        async_to_sync(test)(*args, **kwargs)

    return runner


class SSEStream:
    """Reads SSE events from an async byte iterator (a StreamingHttpResponse's streaming_content).

    A reader task pulls the chunks, as an ASGI server does; `close()` cancels it,
    which raises CancelledError into the stream exactly as a client disconnect does.
    """

    _END = object()

    def __init__(self, content: AsyncIterator[bytes], *, timeout: float = 10.0) -> None:
        self._chunks: asyncio.Queue[Any] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read(content))
        self._parser = SSEParser()
        self._pending: list[SSEEvent] = []
        self.timeout = timeout
        self.ended = False

    async def _read(self, content: AsyncIterator[bytes]) -> None:
        try:
            async for chunk in content:
                self._chunks.put_nowait(chunk)
        finally:
            self._chunks.put_nowait(self._END)

    async def next(self) -> SSEEvent:
        """The next event or comment; StopAsyncIteration once the stream ended."""
        async with asyncio.timeout(self.timeout):
            while not self._pending:
                chunk = await self._chunks.get()
                if chunk is self._END:
                    self.ended = True
                    await self._reader  # re-raises what broke the stream, if anything
                    raise StopAsyncIteration
                self._pending.extend(self._parser.feed(chunk))
        return self._pending.pop(0)

    async def events(self, count: int) -> list[SSEEvent]:
        """The next `count` events, skipping comments."""
        found: list[SSEEvent] = []
        while len(found) < count:
            item = await self.next()
            if item.comment is None:
                found.append(item)
        return found

    async def until_end(self) -> list[SSEEvent]:
        """Every remaining event (no comments) until the server ends the stream."""
        found: list[SSEEvent] = []
        try:
            while True:
                item = await self.next()
                if item.comment is None:
                    found.append(item)
        except StopAsyncIteration:
            return found

    async def close(self) -> None:
        """Disconnect: cancel the reader (a no-op if the stream already ended)."""
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


class KeyAsyncClient(AsyncClient):
    """An AsyncClient sending one X-API-Key on every request.

    (AsyncClient(headers=...) stores WSGI-style names, which its ASGI scope
    then mangles, so the header is added per request instead.)
    """

    def __init__(self, raw_key: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.raw_key = raw_key

    def generic(self, method: str, path: str, *args: Any, headers: dict | None = None, **kwargs: Any) -> Any:
        return super().generic(method, path, *args, headers={"X-API-Key": self.raw_key, **(headers or {})}, **kwargs)


class TcpGate:
    """A TCP forwarder to a service (Redis, say) that can be shut, its connections cut and new ones
    refused, and opened again on the same port: the service out of reach for a while, as behind a
    restarting proxy. It listens on `host` (an `IsolatedNetwork`'s `service_address`, say). Its
    methods are coroutines of the event loop it serves in; `ThreadedGate` runs one in a thread of
    its own for synchronous tests."""

    def __init__(self, url: str, *, host: str = HOST) -> None:
        self._target_url = urlsplit(url)
        self.target = (self._target_url.hostname or HOST, self._target_url.port)
        self.host = host
        self.port = free_port(host)
        self.muted = False
        self.swallowed = 0  # bytes dropped while muted
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.forwarding: set[asyncio.Task] = set()

    @property
    def url(self) -> str:
        """The target's URL (credentials, path and query kept), through the gate."""
        credentials, _, _ = self._target_url.netloc.rpartition("@")
        address = f"{self.host}:{self.port}"
        netloc = f"{credentials}@{address}" if credentials else address
        return urlunsplit(self._target_url._replace(netloc=netloc))

    async def open(self) -> None:
        self.server = await asyncio.start_server(self._forward, self.host, self.port)

    async def shut(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for writer in self.writers:
            writer.close()
        self.writers = []
        # Each connection's forwarding ends with it: none is left pending when the loop stops.
        forwarding, self.forwarding = self.forwarding, set()
        for task in forwarding:
            task.cancel()
        await asyncio.gather(*forwarding, return_exceptions=True)

    def mute(self, muted: bool = True) -> None:
        """From now on drop every byte both ways, connections kept open and new ones accepted: a
        service gone silent (a frozen process) rather than away. `mute(False)` forwards again."""
        self.muted = muted

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.forwarding.add(task)
        task.add_done_callback(self.forwarding.discard)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self.writers += [writer, upstream_writer]
        await asyncio.gather(self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if self.muted:
                    self.swallowed += len(data)
                    continue
                writer.write(data)
                await writer.drain()
        except OSError:  # the other side was cut
            pass
        finally:
            writer.close()


class ThreadedGate:
    """A `TcpGate` serving from an event loop in a thread of its own, driven from synchronous code."""

    def __init__(self, url: str, *, host: str = HOST) -> None:
        self.gate = TcpGate(url, host=host)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return self.gate.url

    def open(self) -> None:
        asyncio.run_coroutine_threadsafe(self.gate.open(), self._loop).result(timeout=10)

    def shut(self) -> None:
        asyncio.run_coroutine_threadsafe(self.gate.shut(), self._loop).result(timeout=10)

    def mute(self, muted: bool = True) -> None:
        self.gate.mute(muted)  # a flag the forwarding reads at each chunk

    @property
    def swallowed(self) -> int:
        return self.gate.swallowed

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shut()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


class IsolatedNetwork:
    """A network namespace whose processes reach this machine over one veth link only.

    The machine's side of the link has two addresses: `host_address`, from which the test
    reaches processes inside (at `address`), and `service_address`, where a test puts services
    for them (a `ThreadedGate` to PostgreSQL bound there). `silence()` makes every packet for
    them from `service_address` vanish without a word (a blackhole route on the machine's side:
    no reset, no ICMP), so that a connection opened before goes unanswered and a new one gets no
    reply to its SYN, as with a database host that died or a network partition; `restore()`
    lifts it. `command()` wraps a command line to run inside. Needs root:
    `IsolatedNetwork.make()` says why it cannot be made here (the test skips with that reason).
    """

    # What a process inside needs: it reaches nothing on this machine's loopback (Redis included,
    # so its channel layer and cache stay in memory), and it is asked for at the namespace's address.
    PROCESS_ENV = {"REDIS_URL": "", "ALLOWED_HOSTS": "*"}
    _made = 0

    def __init__(self) -> None:
        IsolatedNetwork._made += 1
        serial = f"{os.getpid()}{IsolatedNetwork._made % 100}"
        self.name = f"fetchml-{serial}"
        self._host_link, self._inner_link = f"fml{serial}h", f"fml{serial}n"
        # A /29 of its own per test process and namespace. Inside, traffic to the services leaves
        # from an address of its own, so that silencing it leaves the test's own traffic alone.
        subnet = f"10.{20 + os.getpid() % 200}.{IsolatedNetwork._made % 256}"
        self.host_address, self.address, self.service_address = f"{subnet}.1", f"{subnet}.2", f"{subnet}.5"
        self._service_client_address = f"{subnet}.3"

    @classmethod
    def make(cls) -> "tuple[IsolatedNetwork | None, str]":
        """(a network ready to use, "") or (None, why it cannot be made here)."""
        if os.geteuid() != 0:
            return None, "making a network namespace needs root"
        network = cls()
        try:
            network._create()
        except (OSError, subprocess.CalledProcessError) as exc:
            network.close()
            return None, f"cannot make a network namespace here: {exc}"
        return network, ""

    def _ip(self, *args: str, inside: bool = False) -> None:
        command = ["ip", *args]
        subprocess.run(self.command(command) if inside else command, check=True, capture_output=True, timeout=10)

    def _create(self) -> None:
        self._ip("netns", "add", self.name)
        self._ip("link", "add", self._host_link, "type", "veth", "peer", "name", self._inner_link)
        self._ip("link", "set", self._inner_link, "netns", self.name)
        self._ip("addr", "add", f"{self.host_address}/29", "dev", self._host_link)
        self._ip("addr", "add", f"{self.service_address}/29", "dev", self._host_link)
        self._ip("link", "set", self._host_link, "up")
        self._ip("addr", "add", f"{self.address}/29", "dev", self._inner_link, inside=True)
        self._ip("addr", "add", f"{self._service_client_address}/29", "dev", self._inner_link, inside=True)
        self._ip("link", "set", self._inner_link, "up", inside=True)
        self._ip("link", "set", "lo", "up", inside=True)
        to_services = ["route", "add", f"{self.service_address}/32", "dev", self._inner_link]
        self._ip(*to_services, "src", self._service_client_address, inside=True)

    def command(self, command: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *command]

    def silence(self) -> None:
        self._ip("route", "add", "blackhole", f"{self._service_client_address}/32")

    def restore(self) -> None:
        self._ip("route", "del", "blackhole", f"{self._service_client_address}/32")

    def close(self) -> None:
        """Remove the namespace (its end of the link with it), the machine's end and a silence
        left in place; stop what runs inside first."""
        for command in (
            ["ip", "netns", "del", self.name],
            ["ip", "link", "del", self._host_link],
            ["ip", "route", "del", "blackhole", f"{self._service_client_address}/32"],
        ):
            subprocess.run(command, capture_output=True, timeout=10)


def http_scope(method: str, path: str, *, key: str, query_string: bytes = b"") -> dict[str, Any]:
    """The ASGI scope of a request to `path` with the API key `key`, for driving the application
    in-process (over https: production settings, on PostgreSQL runs, redirect plain HTTP)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "https",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query_string,
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1"), (b"x-api-key", key.encode())],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 443),
    }


def client_socket(raw_key: str | None = None, path: str = "/ws") -> Any:
    """A channels communicator for the client WebSocket at `path`, with `raw_key` as its X-API-Key."""
    from channels.testing import WebsocketCommunicator

    from fetchml.asgi import application

    headers = [(b"x-api-key", raw_key.encode())] if raw_key else []
    return WebsocketCommunicator(application, path, headers=headers)


async def open_client_socket(raw_key: str, *, timeout: float = 5.0) -> Any:
    """A client WebSocket with `raw_key`, connected (accepted; a refusal is accepted, then closed)."""
    socket = client_socket(raw_key)
    connected, code = await socket.connect(timeout=timeout)
    assert connected, f"refused with {code}"
    return socket


async def close_of(socket: Any, *, timeout: float = 5.0) -> tuple[int, str]:
    """The close code and reason the server ends a WebSocket with; fails on anything sent before it."""
    closed = await socket.receive_output(timeout=timeout)
    assert closed["type"] == "websocket.close", closed
    return closed["code"], closed.get("reason", "")


def request_then_stay() -> Callable[[], Awaitable[dict[str, Any]]]:
    """An ASGI `receive` of a client that sends its (empty) request and then stays connected."""
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    return receive


def refused_field(response: Any) -> str:
    """The one field a 422 VALIDATION_ERROR answer names."""
    assert response.status_code == 422, response.json()
    body = response.json()
    assert body["code"] == "VALIDATION_ERROR"
    [detail] = body["details"]
    return detail["field"]
