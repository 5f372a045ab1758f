"""`manage.py serve` as a supervisor sees it: a server that cannot listen fails; a local agent that dies
is started again, one drained on purpose is not."""

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import CommandError

from fetchml.management.commands.serve import RESTART_FIRST_SECONDS, check_can_listen
from fetchml.testing import free_port

WAIT = 60.0


def _manage(tmp_path: Path, *arguments: str) -> subprocess.CompletedProcess:
    """`manage.py` in the embedded layout (SQLite) with its state under `tmp_path`."""
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", ""), "FETCHML_VAR_DIR": str(tmp_path)}
    return subprocess.run(
        [sys.executable, "manage.py", *arguments],
        cwd=Path(settings.BASE_DIR),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_serve_on_a_database_not_migrated_exits_non_zero_saying_to_migrate(tmp_path: Path) -> None:
    result = _manage(tmp_path, "serve", "--port", str(free_port()), "--workers", "1")

    assert result.returncode != 0
    assert "not applied: run `python manage.py migrate` first" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_on_a_port_already_taken_exits_non_zero_saying_so(tmp_path: Path) -> None:
    assert _manage(tmp_path, "migrate", "--verbosity", "0").returncode == 0
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _manage(tmp_path, "serve", "--port", str(port), "--workers", "0")

    assert result.returncode != 0
    assert f"FetchML could not start: port {port} on 127.0.0.1 is already in use" in result.stderr
    assert "nothing is listening" not in result.stderr
    assert "Traceback" not in result.stderr


def test_the_listen_check_refuses_a_port_in_use_saying_so() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        with pytest.raises(CommandError, match=f"port {port} on 127.0.0.1 is already in use"):
            check_can_listen("127.0.0.1", port)


def test_the_listen_check_passes_a_free_port() -> None:
    check_can_listen("127.0.0.1", free_port())


def test_the_listen_check_refuses_a_host_that_does_not_resolve() -> None:
    with pytest.raises(CommandError, match=re.escape("--host 'no-such-host.invalid'")):
        check_can_listen("no-such-host.invalid", free_port())


class _Serve:
    """`manage.py serve` with one local worker on a fresh embedded database in `var_dir`, its log read
    line by line in a thread."""

    def __init__(self, var_dir: Path, *, port: int | None = None) -> None:
        self.env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": os.environ.get("HOME", ""),
            "FETCHML_VAR_DIR": str(var_dir),
            "FETCHML_LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
        }
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        manage = [sys.executable, "manage.py"]
        subprocess.run(
            [*manage, "migrate", "--noinput"],
            cwd=settings.BASE_DIR,
            env=self.env,
            check=True,
            capture_output=True,
            timeout=WAIT,
        )
        self.port = port or free_port()
        self.process = subprocess.Popen(
            [*manage, "serve", "--port", str(self.port), "--workers", "1"],
            cwd=settings.BASE_DIR,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line)

    def wait_for(self, text: str, *, timeout: float = WAIT) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"no line with {text!r} in {timeout} s; seen:\n{''.join(self.seen)}") from None
            self.seen.append(line)
            if text in line:
                return line

    def agents(self) -> list[int]:
        """Pids of the local agents serve runs now."""
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.process.pid:
                found.append(int(stat.parent.name))
        return found

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=WAIT)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self.reader.join(timeout=WAIT)
            self.process.stdout.close()


@pytest.fixture
def serve(tmp_path: Path):
    if not Path("/proc/self/stat").exists():
        pytest.skip("finds the local agents through /proc (Linux)")
    running = _Serve(tmp_path)
    yield running
    running.stop()


@pytest.mark.e2e
def test_a_local_worker_that_dies_is_started_again(serve):
    serve.wait_for("connected to ws://")
    [agent] = serve.agents()

    os.kill(agent, signal.SIGKILL)

    serve.wait_for("local worker 1 died (signal 9); starting it again")
    serve.wait_for("connected to ws://")
    [again] = serve.agents()
    assert again != agent
    assert serve.stop() == 0
    with pytest.raises(ProcessLookupError):
        os.kill(again, 0)


@pytest.mark.e2e
def test_a_local_worker_drained_by_an_operator_stays_stopped(serve):
    serve.wait_for("connected to ws://")
    [agent] = serve.agents()
    os.kill(agent, signal.SIGTERM)  # as the server's drain does, the agent finishes and exits 0

    serve.wait_for("local worker 1 drained and stopped")
    deadline = time.monotonic() + RESTART_FIRST_SECONDS * 3
    while time.monotonic() < deadline:  # long enough for a restart to have begun
        assert serve.agents() == []
        time.sleep(0.1)
    assert serve.stop() == 0


def submit_through(serve: "_Serve", *, job_name: str, entrypoint: str) -> str:
    """Submit a task to `serve` with a new user key of alice's; its id."""
    created = subprocess.run(
        [sys.executable, "manage.py", "createapikey", "alice", "--role", "user"],
        cwd=settings.BASE_DIR,
        env=serve.env,
        check=True,
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    key = created.stdout.strip().splitlines()[-1]
    request = urllib.request.Request(
        f"http://127.0.0.1:{serve.port}/v1/tasks",
        data=json.dumps({"job_name": job_name, "entrypoint": entrypoint}).encode(),
        headers={"X-API-Key": key, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=WAIT) as answer:
        assert answer.status == 201
        return json.load(answer)["id"]


@pytest.mark.e2e
def test_a_second_stop_signal_stops_the_local_workers_runs_at_once(serve, tmp_path: Path):
    serve.wait_for("connected to ws://")
    submit_through(serve, job_name="long", entrypoint="sleep 600")
    serve.wait_for("started (token")  # the agent started the run
    serve.process.send_signal(signal.SIGTERM)
    serve.wait_for("Stopping: draining local workers")
    serve.process.send_signal(signal.SIGTERM)  # a second Ctrl-C: no waiting for the run
    serve.wait_for("Stopping now: local workers stop their runs")
    serve.wait_for("shutting down: killing 1 run(s)")
    assert serve.stop() == 0
