"""Service runs (assign `kind` "service" with a `service` object): Jupyter.

The agent, not the server, chooses the port and generates the token. Jupyter runs as the
run's process -- so cancel, stop, the process group kill and the slot accounting are the
batch machinery's -- with the token in its environment (`JUPYTER_TOKEN`, never on the
command line, which other local users can read):

- by default the worker's own Jupyter: ``<python> -m jupyter_server`` bound to the
  agent's address, serving the workspace directory;
- with ``--container-runtime podman|docker``: ``<runtime> run --rm`` of the service's
  image, the workspace mounted at /home/jovyan/work and the port published on the
  agent's address.

A worker that has neither (no ``jupyter_server`` module, or the runtime not on its PATH)
offers no service slots unless told to, and a service run assigned to it anyway fails
its preparation saying what to install.

The workspace is a directory relative to the worker's work directory (created if
missing); an absolute path or one leaving that directory fails the run (`preparation`).

`JupyterWatch` polls ``/api/status`` with the token until it answers 200, then reports
`service_ready` {url, service_token}; afterwards it reports Jupyter's `last_activity` in
`service_activity` whenever it changes (the server stops idle services).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import secrets
import shutil
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scheduler.agent import protocol
from scheduler.agent.sidecars import free_port

logger = logging.getLogger(__name__)

CONTAINER_RUNTIMES = ("podman", "docker")
CONTAINER_PORT = 8888
CONTAINER_WORKSPACE = "/home/jovyan/work"
WORKSPACES_DIR = "workspaces"
READY_PROBE_SECONDS = 0.2
ACTIVITY_POLL_SECONDS = 30.0
PROBE_TIMEOUT_SECONDS = 2.0

Emit = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class ServiceSpec:
    type: str
    service_id: str
    workspace: str
    image: str


def parse_service(raw: dict[str, Any]) -> ServiceSpec:
    """The `service` object of an assign; ValueError when this agent cannot serve it."""
    kind = raw.get("type")
    if kind != "jupyter":
        raise ValueError(f"unknown service type {kind!r}")
    fields = {name: raw.get(name) or "" for name in ("service_id", "workspace", "image")}
    if not all(isinstance(value, str) for value in fields.values()):
        raise ValueError("service: 'service_id', 'workspace' and 'image' must be strings")
    return ServiceSpec(type=kind, **fields)


def workspace_dir(work_root: Path, workspace: str) -> Path:
    """`<work_root>/workspaces/<workspace>`, refusing anything that would leave it."""
    base = (work_root / WORKSPACES_DIR).resolve()
    if workspace.startswith("/") or "\x00" in workspace:
        raise ValueError(f"workspace {workspace!r} must be a relative path")
    target = (base / workspace).resolve()
    if target != base and base not in target.parents:
        raise ValueError(f"workspace {workspace!r} leaves the worker's work directory")
    return target


def jupyter_command(
    *, port: int, bind_host: str, root_dir: Path, runtime: str = "", image: str = "", name: str = ""
) -> list[str]:
    """The command line that serves Jupyter on `bind_host:port` (the token comes from JUPYTER_TOKEN)."""
    options = ["--ServerApp.open_browser=False", "--ServerApp.port_retries=0", "--ServerApp.allow_remote_access=True"]
    if not runtime:
        return [
            sys.executable,
            "-m",
            "jupyter_server",
            f"--ServerApp.ip={bind_host}",
            f"--ServerApp.port={port}",
            f"--ServerApp.root_dir={root_dir}",
            *options,
            # Jupyter refuses to start as root unless told; a worker in a container often is root.
            *(["--ServerApp.allow_root=True"] if os.geteuid() == 0 else []),
        ]
    if runtime not in CONTAINER_RUNTIMES:
        raise ValueError(f"container runtime {runtime!r}: one of {', '.join(CONTAINER_RUNTIMES)}")
    if not image:
        raise ValueError("a container runtime needs an image")
    if image.startswith("-"):
        # The API refuses such an image, but a service queued before it did still comes here; it
        # must not become an option of the runtime (`--privileged`, `--volume=/:/host`).
        raise ValueError(f"image {image!r} begins with '-': {runtime} would read it as one of its options")
    return [
        runtime,
        "run",
        "--rm",
        "--init",  # signals reach Jupyter, and the container ends with the run's process group
        *(["--name", name] if name else []),
        "--env",
        "JUPYTER_TOKEN",  # the value from the run's environment, not from the command line
        "--publish",
        f"{bind_host}:{port}:{CONTAINER_PORT}",
        "--volume",
        f"{root_dir}:{CONTAINER_WORKSPACE}",
        "--workdir",
        CONTAINER_WORKSPACE,
        "--",  # the end of the runtime's options: what follows is the image and its command
        image,
        "jupyter",
        "server",
        "--ServerApp.ip=0.0.0.0",
        f"--ServerApp.port={CONTAINER_PORT}",
        f"--ServerApp.root_dir={CONTAINER_WORKSPACE}",
        *options,
    ]


def missing_service_support(runtime: str = "") -> str:
    """Why this machine cannot serve Jupyter the way `runtime` says; empty when it can."""
    if runtime:
        if shutil.which(runtime) is None:
            return f"the container runtime {runtime!r} is not on this worker's PATH"
        return ""
    if importlib.util.find_spec("jupyter_server") is None:
        return (
            f"this worker's Python ({sys.executable}) has no Jupyter server: install requirements/worker.txt "
            "(pip install jupyter-server), or start the worker with --container-runtime podman|docker"
        )
    return ""


@dataclass
class PreparedService:
    argv: list[str]
    env: dict[str, str]
    url: str
    token: str


@dataclass
class ServiceLauncher:
    """How this worker serves service runs: its address and, optionally, a container runtime."""

    host: str = "127.0.0.1"
    runtime: str = ""

    def prepare(self, spec: ServiceSpec, *, work_root: Path, env: dict[str, str]) -> PreparedService:
        if missing := missing_service_support(self.runtime):
            raise ValueError(missing)
        root = workspace_dir(work_root, spec.workspace)
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"cannot create the workspace {root}: {exc}") from None
        port = free_port(self.host)
        token = secrets.token_hex(24)
        argv = jupyter_command(
            port=port,
            bind_host=self.host,
            root_dir=root,
            runtime=self.runtime,
            image=spec.image,
            name=f"fetchml-jupyter-{spec.service_id}" if spec.service_id else "",
        )
        return PreparedService(
            argv=argv, env={**env, "JUPYTER_TOKEN": token}, url=f"http://{self.host}:{port}/", token=token
        )


def api_status(url: str, token: str) -> tuple[int, dict[str, Any]]:
    """GET <url>api/status with the token: (HTTP status or 0, body). Blocking: call it in a thread."""
    request = urllib.request.Request(url + "api/status", headers={"Authorization": f"token {token}"})
    try:
        with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_SECONDS) as response:
            body = json.loads(response.read() or b"{}")
            return response.status, body if isinstance(body, dict) else {}
    except urllib.error.HTTPError as exc:
        return exc.code, {}
    except (urllib.error.URLError, OSError, ValueError):
        return 0, {}


class JupyterWatch:
    """Reports `service_ready` once Jupyter answers with the token, then its activity."""

    def __init__(
        self,
        prepared: PreparedService,
        *,
        task_id: str,
        token: str,
        emit: Emit,
        activity_seconds: float | None = None,
    ) -> None:
        self._prepared = prepared
        self._task_id, self._token = task_id, token
        self._emit = emit
        self._activity_seconds = ACTIVITY_POLL_SECONDS if activity_seconds is None else activity_seconds
        self._watch: asyncio.Task[None] | None = None
        self.ready = False

    def start(self) -> None:
        self._watch = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)

    async def _run(self) -> None:
        url, secret = self._prepared.url, self._prepared.token
        while True:  # until it answers; the run's own supervision ends us if Jupyter dies
            status, _ = await asyncio.to_thread(api_status, url, secret)
            if status == 200:
                break
            await asyncio.sleep(READY_PROBE_SECONDS)
        self.ready = True
        logger.info("task %s: Jupyter is serving at %s", self._task_id, url)
        self._emit(protocol.service_ready(task_id=self._task_id, token=self._token, url=url, service_token=secret))
        reported = ""
        while True:
            await asyncio.sleep(self._activity_seconds)
            status, body = await asyncio.to_thread(api_status, url, secret)
            last = body.get("last_activity")
            if status == 200 and isinstance(last, str) and last != reported:
                reported = last
                self._emit(protocol.service_activity(task_id=self._task_id, token=self._token, last_activity=last))
