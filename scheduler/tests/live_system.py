"""The whole system in child processes, for end-to-end tests: server, scheduler and real worker agents.

`LiveSystem` starts `manage.py serve --workers 0` (daphne and the scheduler
loop in one process; the only way with the in-memory channel layer) or, with
`separate_scheduler=True`, daphne plus a `manage.py scheduler` process (needs
REDIS_URL). Both run against the test database with short leases and
back-offs. Tests start `manage.py worker` agents themselves, so they can
signal and kill each one. Every wait has a deadline; `stop()` (also on
`__exit__`) SIGTERMs, waits and SIGKILLs every process it started.

    with LiveSystem(tmp_path=tmp_path, database_url=database_url_for(connection)) as system:
        worker = system.start_worker("w1", key=worker_key)
        task = system.submit(user_key, entrypoint="true")
        system.wait_for_status(user_key, task["id"], "completed")
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Self, TypeVar
from urllib.parse import urlsplit, urlunsplit

from django.conf import settings

from fetchml.testing import HOST, free_port

T = TypeVar("T")
WAIT_SECONDS = 30.0
STOP_SECONDS = 10.0
SCHEDULER_APPLICATION_NAME = "fetchml-e2e-scheduler"
SERVER_APPLICATION_NAME = "fetchml-e2e-server"
FINAL_STATES = frozenset({"completed", "failed", "cancelled"})

# Short enough that lease expiry and retries happen within a test, long enough
# that a busy CI machine does not miss heartbeats.
DEFAULT_ENV = {
    "DJANGO_SECRET_KEY": "test",
    "DJANGO_DEBUG": "true",  # no HTTPS redirect on plain HTTP
    "PYTHONUNBUFFERED": "1",
    "FETCHML_WORKER_LEASE_SECONDS": "10",
    "FETCHML_WORKER_HEARTBEAT_SECONDS": "0.5",
    "FETCHML_SCHEDULER_INTERVAL": "0.25",
    "FETCHML_ASSIGN_RESEND_SECONDS": "1",
    "FETCHML_RETRY_BACKOFF_BASE_SECONDS": "0.2",
    "FETCHML_RETRY_BACKOFF_MAX_SECONDS": "1",
    "FETCHML_RATE_LIMIT_POST": "100000/m",
    "FETCHML_RATE_LIMIT_GET": "100000/m",
    "FETCHML_RATE_LIMIT_OTHER": "100000/m",
    "FETCHML_WS_RECHECK_SECONDS": "0.5",
}


def wait_until(predicate: Callable[[], T], *, timeout: float = WAIT_SECONDS, what: str = "condition") -> T:
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


def python_command(code: str) -> str:
    """An entrypoint running `code` with this interpreter, unbuffered."""
    return f"{shlex.quote(sys.executable)} -u -c {shlex.quote(code)}"


def with_query(url: str, key: str, value: str) -> str:
    """The same URL with `key=value` added to its query (a libpq connection parameter, say)."""
    parts = urlsplit(url)
    query = f"{parts.query}&{key}={value}" if parts.query else f"{key}={value}"
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


def with_application_name(database_url: str, name: str) -> str:
    """The same PostgreSQL URL, its connections labelled `name` in pg_stat_activity."""
    return with_query(database_url, "application_name", name)


def stop_process(process: subprocess.Popen, *, timeout: float = STOP_SECONDS) -> int:
    """SIGTERM, wait, SIGKILL: the process is gone when this returns. Returns its exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


class _Child:
    """A child process whose output goes to a file (a pipe could fill up and block it)."""

    def __init__(self, command: list[str], *, env: dict[str, str], label: str) -> None:
        self.label = label
        self.log: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
        # Own session: signals sent to the test's process group never reach it by accident.
        self.process = subprocess.Popen(
            command, cwd=settings.BASE_DIR, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self._closed_output = ""

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait_exit(self, *, timeout: float = WAIT_SECONDS) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.label} still running after {timeout:.0f}s:\n{self.output()}") from None

    def stop(self) -> int:
        if self.process.poll() is None:
            # A frozen process ignores SIGTERM until it is continued.
            self.process.send_signal(signal.SIGCONT)
        return stop_process(self.process)

    def output(self) -> str:
        if self.log.closed:
            return self._closed_output
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def close(self) -> None:
        self.stop()
        self._closed_output = self.output()
        self.log.close()


class ClientWatch:
    """A client on the server's /ws, as a dashboard or CLI would be: a thread keeps every message."""

    DONE = ("task_complete", "completed")

    def __init__(self, url: str, key: str, *, outputs: Callable[[], str]) -> None:
        from websockets.sync.client import connect

        self.outputs = outputs

        self.socket = connect(url, additional_headers={"X-API-Key": key}, open_timeout=15)
        self.messages: list[dict[str, Any]] = []
        self.answers: queue.Queue[dict[str, Any]] = queue.Queue()  # what requests were answered with
        self.closed: str | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            for raw in self.socket:
                message = json.loads(raw)
                self.messages.append(message)
                if message.get("type") in ("subscribed", "error"):
                    self.answers.put(message)
            self.closed = f"closed: {self.socket.close_code} {self.socket.close_reason}"
        except ConnectionClosed as exc:
            self.closed = f"closed: {exc}"

    def subscribe(self, task_id: str, *, timeout: float = WAIT_SECONDS) -> None:
        """Subscribe and wait for the answer, asking again while the server says it is unavailable."""
        deadline = time.monotonic() + timeout
        while True:
            self.socket.send(json.dumps({"type": "subscribe", "task_id": task_id}))
            answer = self.answers.get(timeout=max(deadline - time.monotonic(), 0))
            if answer["type"] == "subscribed":
                return
            if answer.get("code") != "SERVICE_UNAVAILABLE" or time.monotonic() > deadline:
                raise AssertionError(f"subscribing to {task_id} was answered {answer}")

    def told(self, task_id: str) -> list[tuple[str, str]]:
        """(message type, status) of each state this client was told of the task, in order."""
        return [
            (message["type"], message["task"]["status"])
            for message in list(self.messages)
            if message.get("type") in ("task_update", "task_complete") and message["task"]["id"] == task_id
        ]

    def wait_for_completions(self, task_ids: list[str], *, timeout: float = WAIT_SECONDS) -> None:
        """Wait until the last state told of each task is its completion; fails if the connection closes."""

        def all_told() -> bool:
            if self.closed:
                raise AssertionError(f"the /ws connection was {self.closed}")
            return all(self.told(task_id)[-1:] == [self.DONE] for task_id in task_ids)

        try:
            wait_until(all_told, timeout=timeout, what="the /ws client to be told every completion")
        except AssertionError as exc:
            untold = {task_id: self.told(task_id) for task_id in task_ids if self.told(task_id)[-1:] != [self.DONE]}
            raise AssertionError(f"{exc}; untold: {untold}\n{self.outputs()}") from None

    def close(self) -> None:
        self.socket.close()
        self._reader.join(timeout=STOP_SECONDS)


class LiveSystem:
    def __init__(
        self,
        *,
        tmp_path: Path,
        database_url: str,
        env: dict[str, str] | None = None,
        separate_scheduler: bool = False,
        serve_workers: int = 0,
    ) -> None:
        if separate_scheduler and not os.environ.get("REDIS_URL"):
            raise ValueError("a separate scheduler process needs REDIS_URL (a shared channel layer)")
        self.root = tmp_path
        self.database_url = database_url
        self.separate_scheduler = separate_scheduler
        self.serve_workers = serve_workers
        self.port = free_port()
        (tmp_path / "home").mkdir(exist_ok=True)
        self.env = {
            **os.environ,  # REDIS_URL (shared channel layer and cache) passes through when set
            **DEFAULT_ENV,
            "DATABASE_URL": database_url,
            "FETCHML_VAR_DIR": str(tmp_path / "var"),
            "HOME": str(tmp_path / "home"),  # local workers' default work directory
            **(env or {}),
        }
        self.server: _Child | None = None
        self.scheduler: _Child | None = None
        self.workers: list[_Child] = []
        self._stopped: list[_Child] = []

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def __enter__(self) -> Self:
        try:
            self.start_server()
            if self.separate_scheduler:
                self.start_scheduler()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- processes ------------------------------------------------------------------------

    def _manage(self, *args: str) -> list[str]:
        return [sys.executable, str(settings.BASE_DIR / "manage.py"), *args]

    def start_server(self) -> None:
        """Start (or restart, on the same port) the server and wait until /health answers."""
        if self.separate_scheduler:
            command = [sys.executable, "-m", "daphne", "-b", HOST, "-p", str(self.port), "fetchml.asgi:application"]
        else:
            command = self._manage("serve", "--host", HOST, "--port", str(self.port))
            command += ["--workers", str(self.serve_workers)]
        self.server = _Child(
            command, env={**self.env, "DATABASE_URL": self._labelled(SERVER_APPLICATION_NAME)}, label="server"
        )
        wait_until(self._answers, timeout=60, what=f"the server on port {self.port} to answer /health")

    def _answers(self) -> bool:
        assert self.server is not None
        if not self.server.alive():
            raise AssertionError(f"the server exited during startup:\n{self.server.output()}")
        try:
            self.request("GET", "/health")
        except OSError:
            return False
        return True

    def kill_server(self) -> None:
        """kill -9 of the server process (a crash), waited for."""
        assert self.server is not None
        self.server.process.kill()
        self.server.process.wait()
        self._stopped.append(self.server)
        self.server = None

    def start_scheduler(self) -> None:
        env = {**self.env, "DATABASE_URL": self._labelled(SCHEDULER_APPLICATION_NAME)}
        self.scheduler = _Child(self._manage("scheduler"), env=env, label="scheduler")

    def _labelled(self, name: str) -> str:
        """The database URL, its PostgreSQL connections labelled `name` (so a test can find and kill them)."""
        if self.database_url.startswith(("postgres://", "postgresql://")):
            return with_application_name(self.database_url, name)
        return self.database_url

    def start_worker(
        self, name: str, *, key: str, slots: int = 1, wait: bool = True, artifacts: bool = False
    ) -> _Child:
        """A real `manage.py worker` agent; with `wait`, returns once it said hello (its Worker row is active).
        With `artifacts`, it stores each run's files on the server (the agent's default)."""
        command = self._manage("worker", "--server", self.url, "--name", name, "--cpus", "2", "--memory-gb", "2")
        command += ["--gpus", "0", "--batch-slots", str(slots), "--service-slots", "0"]
        command += ["--workdir", str(self.root / f"work-{name}")] + ([] if artifacts else ["--no-artifacts"])
        worker = _Child(command, env={**self.env, "FETCHML_WORKER_API_KEY": key}, label=f"worker {name}")
        self.workers.append(worker)
        if wait:
            wait_until(lambda: self._connected(name, worker), what=f"worker {name} to connect")
        return worker

    def _connected(self, name: str, worker: _Child) -> bool:
        from scheduler.models import Worker

        if not worker.alive():
            raise AssertionError(f"worker {name} exited:\n{worker.output()}")
        return Worker.objects.filter(name=name, status=Worker.Status.ACTIVE).exclude(channel_name="").exists()

    def stop(self) -> None:
        """Workers first (they report to the server), then the scheduler and the server; always all of them."""
        children = [*self.workers, self.scheduler, self.server, *self._stopped]
        self.workers, self.scheduler, self.server, self._stopped = [], None, None, []
        errors = []
        for child in children:
            if child is None:
                continue
            try:
                child.close()
            except Exception as exc:  # keep stopping the others
                errors.append(exc)
        if errors:
            raise errors[0]

    def outputs(self) -> str:
        """Everything the processes printed, for failure messages."""
        children = [self.server, self.scheduler, *self.workers, *self._stopped]
        return "\n".join(f"--- {c.label}\n{c.output()}" for c in children if c is not None)

    # --- the HTTP API -----------------------------------------------------------------------

    def request(self, method: str, path: str, *, key: str | None = None, body: Any = None) -> tuple[int, Any]:
        connection = http.client.HTTPConnection(HOST, self.port, timeout=15)
        headers = {"X-API-Key": key} if key else {}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            connection.request(method, path, body=payload, headers=headers)
            response = connection.getresponse()
            raw = response.read()
        finally:
            connection.close()
        content_type = response.getheader("Content-Type") or ""
        return response.status, json.loads(raw) if raw and content_type.startswith("application/json") else raw

    def watch(self, key: str) -> ClientWatch:
        """A client connected to /ws with `key` (close it when done)."""
        return ClientWatch(f"ws://{HOST}:{self.port}/ws", key, outputs=self.outputs)

    def submit(self, key: str, **fields: Any) -> dict[str, Any]:
        status, body = self.request("POST", "/v1/tasks", key=key, body={"job_name": "e2e", **fields})
        assert status == 201, (status, body)
        return body

    def task(self, key: str, task_id: str) -> dict[str, Any]:
        status, body = self.request("GET", f"/v1/tasks/{task_id}", key=key)
        assert status == 200, (status, body)
        return body

    def wait_for_task(
        self, key: str, task_id: str, predicate: Callable[[dict[str, Any]], bool], *, timeout: float = WAIT_SECONDS
    ) -> dict[str, Any]:
        last: dict[str, Any] = {}

        def check() -> dict[str, Any] | None:
            nonlocal last
            last = self.task(key, task_id)
            return last if predicate(last) else None

        try:
            return wait_until(check, timeout=timeout, what=f"task {task_id}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last seen: {last}\n{self.outputs()}") from None

    def wait_for_status(self, key: str, task_id: str, status: str, *, timeout: float = WAIT_SECONDS) -> dict[str, Any]:
        """Wait for `status`; fails early if the task ends in another final state."""

        def reached(task: dict[str, Any]) -> bool:
            if task["status"] != status and task["status"] in FINAL_STATES:
                raise AssertionError(f"task ended {task['status']}, expected {status}: {task}\n{self.outputs()}")
            return task["status"] == status

        return self.wait_for_task(key, task_id, reached, timeout=timeout)
