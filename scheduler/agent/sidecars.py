"""Plugin sidecars: processes started beside a task, probed over HTTP, stopped with it.

Each sidecar of an `assign` ({name, version, command, image, health_path}) gets a free port;
`{port}` in its command and `{output_dir}` in its command are replaced literally
(`str.replace`). It runs in its own process group in the run's work directory, with the run's
environment, its output in ``.fetchml/sidecar-<name>.log``, tied to the agent's life as the run
is (`orphans.tethered`: it dies with an agent killed outright). The agent reports
`plugin_status`: `starting` at launch, `healthy` once `http://<host>:<port><health_path>`
answers, `unhealthy` if it does not within the health timeout or exits early, and `stopped`
when the run ends (SIGTERM to the group, SIGKILL after a grace period). A sidecar never fails
its task: whatever goes wrong is reported `unhealthy`, with an `error` that says why (the
program missing, its exit code and last line of output, no answer in time) and no URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from scheduler.agent import orphans, protocol

logger = logging.getLogger(__name__)

PORT, OUTPUT_DIR = "{port}", "{output_dir}"
HEALTH_TIMEOUT_SECONDS = 30.0
PROBE_TIMEOUT_SECONDS = 1.0
PROBE_INTERVAL_SECONDS = 0.1
STOP_GRACE_SECONDS = 5.0
LOG_TAIL_BYTES = 4096
LAST_LINE_CHARACTERS = 300
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

Emit = Callable[[dict[str, Any]], None]


class Companion(Protocol):
    """Something a run starts beside its process and stops when the process ends."""

    def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass(frozen=True)
class SidecarSpec:
    name: str
    command: tuple[str, ...]
    health_path: str = "/"
    image: str = ""
    version: str = ""


def parse_sidecar(raw: Any) -> SidecarSpec:
    """One sidecar of an `assign`; ValueError when it is malformed."""
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not _NAME.match(raw["name"]):
        raise ValueError("a sidecar needs a plugin name")
    command = raw.get("command")
    if not isinstance(command, list) or not command or not all(isinstance(part, str) for part in command):
        raise ValueError(f"sidecar {raw['name']}: 'command' must be a non-empty list of strings")
    health_path = raw.get("health_path") or "/"
    if not isinstance(health_path, str) or not health_path.startswith("/"):
        raise ValueError(f"sidecar {raw['name']}: 'health_path' must start with '/'")
    return SidecarSpec(
        name=raw["name"],
        command=tuple(command),
        health_path=health_path,
        image=str(raw.get("image") or ""),
        version=str(raw.get("version") or ""),
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now (the sidecar binds it a moment later; a collision shows as unhealthy)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def http_answers(url: str, *, headers: Mapping[str, str] | None = None, timeout: float = PROBE_TIMEOUT_SECONDS) -> int:
    """The HTTP status `url` answers with; 0 when nothing answers. Blocking: call it in a thread."""
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError, ValueError):
        return 0


def start_failure(program: str, exc: OSError) -> str:
    """Why a program could not be started, said so that whoever runs the worker can mend it."""
    if isinstance(exc, FileNotFoundError):
        return f"{program!r} was not found on this worker (is it installed, and on the agent's PATH?)"
    if isinstance(exc, PermissionError):
        return f"{program!r} cannot be run on this worker: permission denied"
    return f"could not start {program!r}: {exc.strerror or exc}"


def last_line(path: Path, *, window: int = LOG_TAIL_BYTES) -> str:
    """The last non-empty line a program wrote to `path` (its end only is read; bounded)."""
    try:
        with path.open("rb") as file:
            file.seek(max(0, file.seek(0, os.SEEK_END) - window))
            tail = file.read()
    except OSError:
        return ""
    lines = [line.strip() for line in tail.decode("utf-8", "replace").splitlines() if line.strip()]
    return lines[-1][:LAST_LINE_CHARACTERS] if lines else ""


def kill_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


async def stop_process(process: asyncio.subprocess.Process, *, grace: float) -> None:
    """SIGTERM the process group, SIGKILL it after `grace` seconds (and whatever is left of it anyway)."""
    if process.returncode is None:
        kill_group(process.pid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await process.wait()
    kill_group(process.pid, signal.SIGKILL)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(grace):
            await process.wait()


class Sidecar:
    def __init__(
        self,
        spec: SidecarSpec,
        *,
        task_id: str,
        token: str,
        work_dir: Path,
        output_dir: Path,
        env: Mapping[str, str],
        emit: Emit,
        host: str,
        health_timeout: float = HEALTH_TIMEOUT_SECONDS,
    ) -> None:
        self.spec = spec
        self._task_id, self._token = task_id, token
        self._work_dir, self._output_dir = work_dir, output_dir
        self._env = dict(env)
        self._emit = emit
        self._host = host
        self._health_timeout = health_timeout
        self.port = 0
        self.url = ""
        self.process: asyncio.subprocess.Process | None = None
        self._watch: asyncio.Task[None] | None = None

    @property
    def log_path(self) -> Path:
        return self._work_dir / ".fetchml" / f"sidecar-{self.spec.name}.log"

    def _report(self, status: str) -> None:
        self._emit(
            protocol.plugin_status(
                task_id=self._task_id, token=self._token, name=self.spec.name, status=status, url=self.url
            )
        )

    def _report_unhealthy(self, error: str) -> None:
        """Not serving: no URL to follow, and the reason instead."""
        logger.warning("task %s: sidecar %s is unhealthy: %s", self._task_id, self.spec.name, error)
        self.url = ""
        self._emit(
            protocol.plugin_status(
                task_id=self._task_id, token=self._token, name=self.spec.name, status="unhealthy", error=error
            )
        )

    def start(self) -> None:
        self._watch = asyncio.create_task(self._run())

    async def _run(self) -> None:
        self.port = free_port()
        self.url = f"http://{self._host}:{self.port}"
        argv = [
            part.replace(PORT, str(self.port)).replace(OUTPUT_DIR, str(self._output_dir)) for part in self.spec.command
        ]
        self._report("starting")
        try:
            # Tied to the agent as the run is: an agent killed outright takes its sidecars along.
            command, passed_fds = orphans.tethered(argv, cwd=self._work_dir, env=self._env)
            with self.log_path.open("ab") as log:
                self.process = await asyncio.create_subprocess_exec(
                    *command,
                    cwd=self._work_dir,
                    env=self._env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    pass_fds=passed_fds,
                )
        except OSError as exc:
            self._report_unhealthy(start_failure(argv[0], exc))
            return
        if await self._healthy():
            self._report("healthy")
            await self.process.wait()
        if self.process.returncode is not None:
            self._report_unhealthy(self._exited())
        else:
            self._report_unhealthy(f"did not answer HTTP within {self._health_timeout:g} s")

    def _exited(self) -> str:
        assert self.process is not None and self.process.returncode is not None
        code = self.process.returncode
        how = f"exited with signal {-code}" if code < 0 else f"exited with code {code}"
        said = last_line(self.log_path)
        return f"{how}: {said}" if said else how

    async def _healthy(self) -> bool:
        """Probe until the sidecar answers HTTP (any status below 500), exits, or the timeout passes."""
        assert self.process is not None
        probe_url = f"http://127.0.0.1:{self.port}{self.spec.health_path}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._health_timeout
        while self.process.returncode is None and loop.time() < deadline:
            status = await asyncio.to_thread(http_answers, probe_url)
            if 0 < status < 500:
                return True
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PROBE_INTERVAL_SECONDS):
                    await self.process.wait()
        return False

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        if self.process is not None:
            await stop_process(self.process, grace=STOP_GRACE_SECONDS)
            self._report("stopped")


def sidecars_for(
    raw: tuple[Any, ...],
    *,
    task_id: str,
    token: str,
    work_dir: Path,
    output_dir: Path,
    env: Mapping[str, str],
    emit: Emit,
    host: str,
) -> list[Sidecar]:
    """The run's sidecars; a malformed one is reported unhealthy and skipped (it never fails the task)."""
    sidecars = []
    for item in raw:
        try:
            spec = parse_sidecar(item)
        except ValueError as exc:
            logger.warning("task %s: %s", task_id, exc)
            name = item.get("name") if isinstance(item, dict) and isinstance(item.get("name"), str) else ""
            if name:
                emit(
                    protocol.plugin_status(
                        task_id=task_id, token=token, name=name[:128], status="unhealthy", error=str(exc)
                    )
                )
            continue
        sidecars.append(
            Sidecar(
                spec,
                task_id=task_id,
                token=token,
                work_dir=work_dir,
                output_dir=output_dir,
                env=env,
                emit=emit,
                host=host,
            )
        )
    return sidecars
