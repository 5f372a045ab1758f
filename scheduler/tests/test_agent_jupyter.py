"""Service runs on the agent: a real Jupyter server behind a generated token, its readiness report,
its stop with the run; the container command line; workspace confinement."""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from scheduler.agent import services
from scheduler.agent.services import ServiceLauncher, ServiceSpec, jupyter_command, parse_service, workspace_dir
from scheduler.tests.agent_peer import Peer, assign, process_gone, run_async, running_agent, until

JUPYTER_WAIT = 60.0


def _service(workspace: str = "", **fields) -> dict:
    return {"type": "jupyter", "service_id": "5b0c", "workspace": workspace, "image": "", **fields}


def _get(url: str, headers: dict[str, str] | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _pid_listening_as(token: str) -> int:
    """The Jupyter process of this run: the one whose environment holds its token."""
    needle = f"JUPYTER_TOKEN={token}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    return int(entry.name)
            except OSError:
                continue
    raise AssertionError("no Jupyter process carries the token")


def test_jupyter_serves_with_the_token_then_stops_with_its_run(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Peer() as peer, running_agent(peer.url, tmp_path / "work"):
            message = assign("jupyter server", kind="service", service=_service("notebooks"), timeout_seconds=0)
            await peer.send(message)
            ready = await peer.next(lambda m: m["type"] == "service_ready", timeout=JUPYTER_WAIT)
            assert ready["token"] == message["token"]
            url, token = ready["url"], ready["service_token"]
            assert url.startswith("http://127.0.0.1:") and len(token) >= 32

            assert _get(url + "api/status", {"Authorization": f"token {token}"}) == 200
            assert _get(url + "api/status") in (401, 403)
            assert _get(url + "api/status", {"Authorization": "token wrong"}) in (401, 403)
            assert (tmp_path / "work" / "workspaces" / "notebooks").is_dir()
            pid = _pid_listening_as(token)
            assert token.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()

            await peer.send({"type": "cancel", "task_id": message["task_id"], "token": message["token"]})
            assert (await peer.final(message["token"], timeout=JUPYTER_WAIT))["status"] == "cancelled"
            await until(lambda: process_gone(pid), what="Jupyter to be gone")

    run_async(scenario(), timeout=120)


@pytest.mark.parametrize("kind", ["service_ready", "service_activity"])
def test_jupyter_standing_reports_are_said_again_while_it_serves(tmp_path: Path, monkeypatch, kind: str) -> None:
    monkeypatch.setattr(services, "ACTIVITY_POLL_SECONDS", 0.2)

    async def scenario() -> None:
        peer = Peer(heartbeat_seconds=0.2)
        async with peer, running_agent(peer.url, tmp_path / "work", standing_report_seconds=0.3):
            message = assign("jupyter server", kind="service", service=_service(), timeout_seconds=0)
            await peer.send(message)
            report = await peer.next(lambda m: m["type"] == kind, timeout=JUPYTER_WAIT)
            # Unchanged (the agent's own status polls are not activity), yet said again: one the server
            # failed to apply would leave the service starting, or make its idle stop come early.
            assert await peer.next(lambda m: m["type"] == kind) == report
            await peer.send({"type": "cancel", "task_id": message["task_id"], "token": message["token"]})
            assert (await peer.final(message["token"], timeout=JUPYTER_WAIT))["status"] == "cancelled"

    run_async(scenario(), timeout=120)


def test_service_with_a_workspace_leaving_the_work_directory_fails_in_preparation(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Peer() as peer, running_agent(peer.url, tmp_path / "work"):
            message = assign("jupyter server", kind="service", service=_service("../../etc"))
            await peer.send(message)
            final = await peer.final(message["token"])
            assert (final["status"], final["failure_reason"]) == ("failed", "preparation")
            assert "leaves the worker's work directory" in final["error"]

    run_async(scenario())


def test_unknown_service_type_fails_in_preparation(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Peer() as peer, running_agent(peer.url, tmp_path):
            message = assign("x", kind="service", service={"type": "rstudio"})
            await peer.send(message)
            final = await peer.final(message["token"])
            assert (final["status"], final["failure_reason"]) == ("failed", "preparation")

    run_async(scenario())


def test_local_command_runs_this_environments_jupyter_server(tmp_path: Path) -> None:
    argv = jupyter_command(port=8123, bind_host="10.0.0.7", root_dir=tmp_path)
    assert argv[:3] == [sys.executable, "-m", "jupyter_server"]
    assert {"--ServerApp.ip=10.0.0.7", "--ServerApp.port=8123", f"--ServerApp.root_dir={tmp_path}"} <= set(argv)


@pytest.mark.parametrize("runtime", ["podman", "docker"])
def test_container_command_publishes_the_port_mounts_the_workspace_and_passes_the_token_by_env(
    tmp_path: Path, runtime: str
) -> None:
    argv = jupyter_command(
        port=8123, bind_host="10.0.0.7", root_dir=tmp_path, runtime=runtime, image="jupyter/pytorch:latest", name="n1"
    )
    assert argv[:4] == [runtime, "run", "--rm", "--init"]
    assert argv[argv.index("--publish") + 1] == "10.0.0.7:8123:8888"
    assert argv[argv.index("--volume") + 1] == f"{tmp_path}:/home/jovyan/work"
    assert argv[argv.index("--env") + 1] == "JUPYTER_TOKEN"  # the name only: the value never reaches argv
    assert argv[argv.index("--name") + 1] == "n1"
    image_at = argv.index("jupyter/pytorch:latest")
    assert argv[image_at + 1 : image_at + 3] == ["jupyter", "server"]
    assert "--ServerApp.ip=0.0.0.0" in argv[image_at:]


def test_container_runtime_must_be_podman_or_docker(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="container runtime"):
        jupyter_command(port=1, bind_host="h", root_dir=tmp_path, runtime="sh", image="x")


@pytest.fixture
def no_jupyter_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "jupyter_server", None)  # find_spec() then answers None: not importable


@pytest.fixture
def fake_docker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "docker").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))


@pytest.mark.usefixtures("no_jupyter_server")
def test_service_on_a_worker_without_jupyter_fails_in_preparation_saying_what_to_install(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Peer() as peer, running_agent(peer.url, tmp_path):
            message = assign("x", kind="service", service=_service())
            await peer.send(message)
            final = await peer.final(message["token"])
            assert (final["status"], final["failure_reason"]) == ("failed", "preparation")
            assert "has no Jupyter server: install requirements/worker.txt" in final["error"]

    run_async(scenario())


def test_prepare_refuses_a_container_runtime_missing_from_path(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    spec = ServiceSpec(type="jupyter", service_id="s1", workspace="a", image="img")
    with pytest.raises(ValueError, match="the container runtime 'podman' is not on this worker's PATH"):
        ServiceLauncher(runtime="podman").prepare(spec, work_root=tmp_path, env={})


@pytest.mark.usefixtures("fake_docker")
def test_prepare_puts_a_fresh_token_in_the_environment_only(tmp_path: Path) -> None:
    launcher = ServiceLauncher(host="127.0.0.1", runtime="docker")
    spec = ServiceSpec(type="jupyter", service_id="s1", workspace="a", image="img")
    first = launcher.prepare(spec, work_root=tmp_path, env={"PATH": "/bin"})
    second = launcher.prepare(spec, work_root=tmp_path, env={"PATH": "/bin"})
    assert first.env["JUPYTER_TOKEN"] == first.token != second.token
    assert first.token not in " ".join(first.argv)
    assert first.url.startswith("http://127.0.0.1:")


@pytest.mark.parametrize("workspace", ["/etc", "../x", "a/../../x"])
def test_workspace_cannot_leave_the_work_directory(tmp_path: Path, workspace: str) -> None:
    with pytest.raises(ValueError):
        workspace_dir(tmp_path, workspace)


def test_workspace_is_under_the_workspaces_directory(tmp_path: Path) -> None:
    assert workspace_dir(tmp_path, "a/b") == (tmp_path / "workspaces" / "a" / "b").resolve()
    assert workspace_dir(tmp_path, "") == (tmp_path / "workspaces").resolve()


def test_service_spec_of_another_type_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown service type"):
        parse_service({"type": "vscode"})
