"""A Jupyter service's image never reaches docker/podman as one of their options: an image that
begins with '-' is refused (the run fails in preparation, saying why), and the image is placed
after `--` on the runtime's command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from scheduler.agent.services import ServiceLauncher, ServiceSpec, jupyter_command
from scheduler.tests.agent_peer import Peer, assign, run_async, running_agent

OPTIONS_AS_IMAGES = ["--privileged", "-v/:/host", "--volume=/:/host", "-"]


@pytest.fixture
def fake_docker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A `docker` on PATH that leaves its arguments in a file when run; the file's path."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ran = tmp_path / "docker-ran"
    (bin_dir / "docker").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {ran}\nexit 0\n')
    (bin_dir / "docker").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    return ran


@pytest.mark.parametrize("runtime", ["podman", "docker"])
@pytest.mark.parametrize("image", OPTIONS_AS_IMAGES)
def test_container_command_refuses_an_image_that_begins_with_a_dash(tmp_path: Path, runtime: str, image: str) -> None:
    with pytest.raises(ValueError, match="would read it as one of its options"):
        jupyter_command(port=8123, bind_host="127.0.0.1", root_dir=tmp_path, runtime=runtime, image=image)


@pytest.mark.parametrize("runtime", ["podman", "docker"])
def test_the_image_follows_the_end_of_the_runtimes_options(tmp_path: Path, runtime: str) -> None:
    argv = jupyter_command(port=8123, bind_host="127.0.0.1", root_dir=tmp_path, runtime=runtime, image="img:1")
    image_at = argv.index("img:1")
    assert argv[image_at - 1] == "--"
    assert argv.index("--") == image_at - 1  # the only `--`: every option of the runtime comes before it


def test_prepare_refuses_an_image_that_begins_with_a_dash(tmp_path: Path, fake_docker: Path) -> None:
    spec = ServiceSpec(type="jupyter", service_id="s1", workspace="a", image="--privileged")
    with pytest.raises(ValueError, match="'--privileged' begins with '-'"):
        ServiceLauncher(runtime="docker").prepare(spec, work_root=tmp_path, env={})


def test_a_service_whose_image_is_an_option_fails_in_preparation_and_never_runs_the_runtime(
    tmp_path: Path, fake_docker: Path
) -> None:
    service = {"type": "jupyter", "service_id": "5b0c", "workspace": "", "image": "--privileged"}

    async def scenario() -> None:
        async with Peer() as peer, running_agent(peer.url, tmp_path / "work", container_runtime="docker"):
            message = assign("x", kind="service", service=service)
            await peer.send(message)
            final = await peer.final(message["token"])
            assert (final["status"], final["failure_reason"]) == ("failed", "preparation")
            assert "cannot prepare the service: image '--privileged' begins with '-'" in final["error"]

    run_async(scenario())
    assert not fake_docker.exists()
