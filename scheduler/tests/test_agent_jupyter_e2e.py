"""End to end: a Jupyter service started over the API, served by a real Jupyter server that a real
`manage.py worker` launched, reachable with its token only, then stopped, its process gone and its
service slot free."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

from fetchml.testing import database_url_for
from fetchml.tests.factories import ApiKeyFactory, UserFactory
from scheduler.models import Worker
from scheduler.tests.live_system import LiveSystem, stop_process, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

JUPYTER_WAIT = 90.0


@contextlib.contextmanager
def service_worker(system: LiveSystem, *, key: str, work_root: Path) -> Iterator[subprocess.Popen]:
    """A real worker agent with one service slot (and no batch slot); always stopped on exit."""
    command = [sys.executable, str(settings.BASE_DIR / "manage.py"), "worker", "--server", system.url]
    command += ["--name", "jup-1", "--cpus", "2", "--memory-gb", "2", "--gpus", "0"]
    command += ["--batch-slots", "0", "--service-slots", "1", "--workdir", str(work_root), "--no-artifacts"]
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            command,
            cwd=settings.BASE_DIR,
            env={**system.env, "FETCHML_WORKER_API_KEY": key},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield process
        except BaseException:
            log.seek(0)
            print(log.read().decode(errors="replace"))  # shown by pytest for a failing test
            raise
        finally:
            stop_process(process)


def _status(url: str, headers: dict[str, str] | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _jupyter_pid(token: str) -> int | None:
    needle = f"JUPYTER_TOKEN={token}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    return int(entry.name)
    return None


def test_jupyter_service_starts_answers_with_its_token_and_stops(tmp_path: Path, user) -> None:
    owner_key = ApiKeyFactory.raw(user=user, role="user")
    agent_key = ApiKeyFactory.raw(user=UserFactory(username="jupyter-agent"), role="worker")
    with (
        LiveSystem(tmp_path=tmp_path, database_url=database_url_for(connection)) as system,
        service_worker(system, key=agent_key, work_root=tmp_path / "work"),
    ):
        status, created = system.request(
            "POST", "/v1/jupyter/services", key=owner_key, body={"name": "nb", "workspace": "lab"}
        )
        assert status == 201, created
        assert created["status"] == "starting"

        def running() -> dict | None:
            _, services = system.request("GET", "/v1/jupyter/services", key=owner_key)
            [service] = services
            assert service["status"] in ("starting", "running"), service
            return service if service["status"] == "running" else None

        service = wait_until(running, timeout=JUPYTER_WAIT, what="the Jupyter service to be running")
        url, token = service["url"], service["token"]
        assert _status(url + "api/status", {"Authorization": f"token {token}"}) == 200
        assert _status(url + "api/status") in (401, 403)
        assert (tmp_path / "work" / "workspaces" / "lab").is_dir()
        pid = _jupyter_pid(token)
        assert pid is not None
        assert Worker.objects.get(name="jup-1").used_service_slots == 1

        status, _ = system.request("DELETE", f"/v1/jupyter/services/{service['id']}", key=owner_key)
        assert status == 204

        def stopped() -> bool:
            _, [listed] = system.request("GET", "/v1/jupyter/services", key=owner_key)
            return listed["status"] == "stopped"

        wait_until(stopped, timeout=JUPYTER_WAIT, what="the Jupyter service to be stopped")
        wait_until(lambda: _jupyter_pid(token) is None or not os.path.exists(f"/proc/{pid}"), what="Jupyter to exit")
        assert Worker.objects.get(name="jup-1").used_service_slots == 0
        _, task = system.request("GET", f"/v1/tasks/{service['task_id']}", key=owner_key)
        assert task["status"] == "cancelled"
