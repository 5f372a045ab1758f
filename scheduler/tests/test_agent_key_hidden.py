"""A run cannot take the worker key from its agent: `manage.py worker` as a real process, not root,
its key in $FETCHML_WORKER_API_KEY, runs a task that tries to read the agent's /proc/<pid>/environ
and /proc/<pid>/mem (scheduler/agent/secrecy.py); and `--api-key-file`.

Root reads any process's /proc entries (CAP_SYS_PTRACE), and this suite runs as root here and in CI:
the agent is run either as nobody (65534), when this interpreter, the repository and the venv are
open to that user, or as root stripped of all capabilities (an empty bounding set, so neither the
agent nor its runs gain any at exec), which the kernel checks as any other user of the same uid.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import io
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command

from scheduler.agent import secrecy
from scheduler.management.commands.worker import API_KEY_ENV, read_api_key
from scheduler.tests.agent_peer import MANAGE_PY, Peer, assign, python, run_async

NOBODY = 65534
PR_CAPBSET_DROP = 24
LAST_CAPABILITY = 63

linux_root = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.geteuid() != 0,
    reason="needs Linux (prctl, /proc) and root, to start the agent as another user or without capabilities",
)

# The task: the agent's pid is its argument; its parent should be the agent itself (the launcher
# execs the command in its own process, orphans.LAUNCHER). Prints what each read gave.
PROBE = """\
import os, sys
agent = int(sys.argv[1])
print("parent-is-agent", os.getppid() == agent)
print("own-env-has-key", "FETCHML_WORKER_API_KEY" in os.environ)
for pid in sorted({agent, os.getppid()}):
    for name in ("environ", "mem"):
        try:
            with open(f"/proc/{pid}/{name}", "rb") as f:
                data = f.read() if name == "environ" else b""
        except OSError as exc:
            print(pid, name, type(exc).__name__)
        else:
            print(pid, name, "read", [e for e in data.split(b"\\0") if e.startswith(b"FETCHML_WORKER_API_KEY=")])
"""


def _drop_all_capabilities() -> Callable[[], None]:
    """A preexec_fn emptying the capability bounding set: a root process execs without any."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork

    def drop() -> None:
        for capability in range(LAST_CAPABILITY + 1):
            prctl(PR_CAPBSET_DROP, capability, 0, 0, 0)  # EINVAL past the last one the kernel knows

    return drop


def _nobody_can_run_the_agent() -> str:
    """'' when nobody can run this interpreter with the agent's imports from the repository, else why not."""
    check = "import asyncio, django, websockets, scheduler.management.commands.worker"
    try:
        done = subprocess.run(
            [sys.executable, "-c", check],
            cwd=MANAGE_PY.parent,
            user=NOBODY,
            group=NOBODY,
            extra_groups=[],
            capture_output=True,
            timeout=60,
        )
    except OSError as exc:
        return f"nobody cannot run {sys.executable}: {exc}"
    if done.returncode != 0:
        last = (done.stderr.decode(errors="replace").strip().splitlines() or ["?"])[-1]
        return f"nobody cannot import the agent from {MANAGE_PY.parent}: {last}"
    return ""


@contextlib.contextmanager
def _nobody_work_dir() -> Any:
    """A directory nobody owns (pytest's tmp_path, under /tmp/pytest-of-root, is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="fetchml-key-hidden-"))
    try:
        os.chown(path, NOBODY, NOBODY)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.asynccontextmanager
async def _agent(
    peer: Peer, log: Path, work: Path, key: str, *extra: str, stdin: Any = asyncio.subprocess.DEVNULL, **how: Any
) -> AsyncIterator[asyncio.subprocess.Process]:
    env = {**os.environ, "FETCHML_LOG_LEVEL": "INFO", "HOME": str(work)}
    if key:
        env[API_KEY_ENV] = key
    else:
        env.pop(API_KEY_ENV, None)
    with log.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(MANAGE_PY),
            "worker",
            "--server",
            f"http://127.0.0.1:{peer.port}",
            "--name",
            "hidden-box",
            "--workdir",
            str(work),
            "--no-artifacts",
            "--gpus",
            "0",
            *extra,
            env=env,
            cwd=MANAGE_PY.parent,
            stdin=stdin,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr,
            **how,
        )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        await asyncio.wait_for(process.wait(), 15)


def _capabilities(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no CapEff in /proc/{pid}/status")


@linux_root
@pytest.mark.parametrize("as_whom", ["nobody", "root-without-capabilities"])
def test_a_run_cannot_read_the_key_from_its_agents_environment_or_memory(tmp_path: Path, as_whom: str) -> None:
    if as_whom == "nobody":
        why_not = _nobody_can_run_the_agent()
        if why_not:
            pytest.skip(why_not)
        work_dir: Any = _nobody_work_dir()
        how: dict[str, Any] = {"user": NOBODY, "group": NOBODY, "extra_groups": []}
    else:
        work_dir = contextlib.nullcontext(tmp_path)
        how = {"preexec_fn": _drop_all_capabilities()}
    key = f"fetchml_hidden_{uuid.uuid4().hex}"
    log = tmp_path / "worker.log"

    async def scenario() -> str:
        with work_dir as work:
            async with Peer(api_key=key) as peer, _agent(peer, log, work / "work", key, **how) as agent:
                await peer.connected()  # the key was read from the environment
                assert _capabilities(agent.pid) == 0
                message = assign(python(PROBE), args=str(agent.pid))
                await peer.send(message)
                final = await peer.final(message["token"])
                assert final["status"] == "completed", final
                return final.get("output", "")

    output = run_async(scenario())

    assert "parent-is-agent True" in output
    assert "own-env-has-key False" in output
    assert key not in output
    assert " read " not in output, output  # neither file could be opened
    for name in ("environ", "mem"):
        assert output.count(f" {name} PermissionError") == 1, output
    said = log.read_text()
    assert "environment and memory are hidden from its runs" in said
    assert key not in said


def test_a_real_agent_reads_its_key_from_standard_input(tmp_path: Path) -> None:
    key = f"fetchml_stdin_{uuid.uuid4().hex}"
    key_file = tmp_path / "worker.key"
    key_file.write_text(f"{key}\n")

    async def scenario() -> None:
        with key_file.open("rb") as stdin:
            async with (
                Peer(api_key=key) as peer,
                _agent(peer, tmp_path / "worker.log", tmp_path / "work", "", "--api-key-file", "-", stdin=stdin),
            ):
                await peer.connected()

    run_async(scenario())
    assert key not in (tmp_path / "worker.log").read_text()


def test_the_key_is_read_from_the_file_stripped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(API_KEY_ENV, "fetchml_from_env")
    key_file = tmp_path / "worker.key"
    key_file.write_text("  fetchml_from_file\n")

    assert read_api_key({"api_key": None, "api_key_file": str(key_file)}) == "fetchml_from_file"
    assert API_KEY_ENV not in os.environ  # dropped, even when the file gives the key


def test_the_key_file_dash_is_standard_input(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("fetchml_from_stdin\n"))

    assert read_api_key({"api_key": None, "api_key_file": "-"}) == "fetchml_from_stdin"


def test_the_key_from_the_environment_leaves_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(API_KEY_ENV, "fetchml_from_env\n")

    assert read_api_key({"api_key": None, "api_key_file": None}) == "fetchml_from_env"
    assert API_KEY_ENV not in os.environ


@pytest.mark.parametrize(
    ("make", "said"),
    [
        pytest.param(lambda path: None, "cannot read the API key file {path}: No such file or directory", id="missing"),
        pytest.param(lambda path: path.write_text(" \n"), "the API key file {path} is empty", id="empty"),
        pytest.param(lambda path: path.mkdir(), "cannot read the API key file {path}: Is a directory", id="directory"),
    ],
)
def test_an_api_key_file_that_gives_no_key_is_a_command_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make: Callable[[Path], Any], said: str
) -> None:
    monkeypatch.setenv(API_KEY_ENV, "fetchml_from_env")  # not a fallback for a file that fails
    path = tmp_path / "worker.key"
    make(path)

    with pytest.raises(CommandError) as refused:
        call_command("worker", "--server", "http://127.0.0.1:9", "--api-key-file", str(path))

    assert str(refused.value) == said.format(path=path)


def test_api_key_and_api_key_file_cannot_both_be_given(tmp_path: Path) -> None:
    with pytest.raises(CommandError, match="not allowed with argument"):
        call_command("worker", "--server", "http://127.0.0.1:9", "--api-key", "k", "--api-key-file", str(tmp_path))


def test_elsewhere_than_linux_hiding_is_a_no_op_said_in_the_log(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(secrecy.sys, "platform", "darwin")

    with caplog.at_level(logging.INFO, logger="scheduler.agent.secrecy"):
        assert secrecy.hide_from_runs() is False

    assert [record.getMessage() for record in caplog.records] == [
        "no prctl on this platform: this agent's environment is not hidden from its runs"
    ]
