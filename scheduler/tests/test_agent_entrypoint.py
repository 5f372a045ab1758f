"""An entrypoint naming a script of the snapshot (`train.py`, `run.sh`) runs that script."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from django.db import connection

from artifacts.tests.factories import live_run, tar_gz, worker_key_pair
from fetchml.testing import LiveServer, database_url_for
from scheduler.agent import orphans
from scheduler.agent.entrypoint import resolve
from scheduler.tests.agent_peer import Peer, assign, run_async, running_agent
from scheduler.tests.test_agent_files_live import agent_options, assignment_message, upload
from tasks.states import TaskStatus


def _file(work_dir: Path, name: str, *, executable: bool = False) -> None:
    path = work_dir / name
    path.write_text("")
    path.chmod(0o755 if executable else 0o644)


def test_a_python_script_of_the_work_directory_runs_with_python3(tmp_path: Path) -> None:
    _file(tmp_path, "train.py")

    assert resolve(["train.py", "--epochs", "3"], work_dir=tmp_path) == ["python3", "train.py", "--epochs", "3"]


def test_a_shell_script_of_the_work_directory_runs_with_sh(tmp_path: Path) -> None:
    _file(tmp_path, "run.sh")

    assert resolve(["run.sh"], work_dir=tmp_path) == ["sh", "run.sh"]


def test_an_executable_file_of_the_work_directory_runs_itself(tmp_path: Path) -> None:
    _file(tmp_path, "train.py", executable=True)

    assert resolve(["train.py"], work_dir=tmp_path) == [os.path.join(".", "train.py")]


def test_a_word_naming_no_file_of_the_work_directory_is_a_command(tmp_path: Path) -> None:
    assert resolve(["python3", "train.py"], work_dir=tmp_path) == ["python3", "train.py"]


def test_a_path_is_left_as_given(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    _file(tmp_path / "bin", "train.py")

    assert resolve(["bin/train.py"], work_dir=tmp_path) == ["bin/train.py"]


def test_a_file_that_is_neither_executable_nor_a_known_script_is_refused_naming_the_way_out(tmp_path: Path) -> None:
    _file(tmp_path, "train")

    with pytest.raises(ValueError, match=r"not executable.*python3 train"):
        resolve(["train"], work_dir=tmp_path)


SCRIPT = b"""import sys
print("trained", *sys.argv[1:])
"""


@pytest.mark.django_db(transaction=True)
def test_the_entrypoint_train_py_runs_the_snapshots_script(tmp_path: Path, user, owner_key) -> None:
    worker = worker_key_pair()
    with LiveServer(database_url=database_url_for(connection), env={"FETCHML_STORAGE_DIR": str(tmp_path)}) as live:
        snapshot = upload(live, "/v1/snapshots", owner_key, tar_gz({"train.py": SCRIPT}))
        run = live_run(key=worker[0], owner=user, status=TaskStatus.RUNNING, snapshot_id=snapshot["id"])

        async def scenario() -> dict[str, Any]:
            async with (
                Peer(api_key=worker[1]) as peer,
                running_agent(peer.url, tmp_path / "w", **agent_options(live, worker[1])),
            ):
                message = assignment_message(run, "train.py", args="--epochs 3")
                await peer.send(message)
                return await peer.final(message["token"])

        final = run_async(scenario())

    assert (final["status"], final["output"]) == ("completed", "trained --epochs 3"), final


def test_an_entrypoint_path_naming_a_directory_fails_saying_it_is_one(tmp_path: Path) -> None:
    directory = tmp_path / "data"
    directory.mkdir()

    async def scenario() -> dict[str, Any]:
        async with Peer() as peer, running_agent(peer.url, tmp_path / "work"):
            message = assign(str(directory))
            await peer.send(message)
            return await peer.final(message["token"])

    final = run_async(scenario())

    assert (final["status"], final["failure_reason"]) == ("failed", "preparation")
    assert final["error"] == f"cannot start {str(directory)!r}: Is a directory"


def test_a_command_naming_a_directory_of_the_work_directory_is_said_to_be_one(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()

    with pytest.raises(IsADirectoryError):
        orphans.tethered(["data"], cwd=tmp_path, env={"PATH": str(tmp_path / "bin")})
