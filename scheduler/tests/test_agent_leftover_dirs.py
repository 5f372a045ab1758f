"""An agent starting alone in a work directory removes the run directories an earlier agent left
when it stopped without finishing their runs, and keeps those kept on purpose: files stored
nowhere else, and the `--keep-run-dirs` most recent."""

from __future__ import annotations

import asyncio
import logging
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import connection

from fetchml.testing import database_url_for
from scheduler.agent import orphans
from scheduler.tests.agent_peer import (
    Peer,
    assign,
    gated,
    process_gone,
    python,
    run_async,
    running_agent,
    until,
    worker_process,
)
from scheduler.tests.live_system import LiveSystem, python_command, wait_until

PRINTS_PID_AND_WAITS = "import os, time\nprint(os.getpid())\ntime.sleep(300)"
NOT_A_COMMAND = "fetchml-no-such-command"  # fails its run at start: nothing unstored, so not kept for its files


def work_dir_of(root: Path, message: dict[str, Any]) -> Path:
    return root / message["task_id"] / str(message["attempt"])


async def left_running(root: Path) -> dict[str, Any]:
    """A run an agent in `root` had going when it stopped: its assign."""
    message = assign(python(PRINTS_PID_AND_WAITS))
    async with Peer() as peer, running_agent(peer.url, root):
        await peer.send(message)
        await peer.status(message["token"], "running")
    return message


async def finished(root: Path, *messages: dict[str, Any], **options: Any) -> None:
    """An agent in `root` runs `messages` one after the other, each to its acknowledged end."""
    async with Peer() as peer, running_agent(peer.url, root, **options) as agent:
        for message in messages:
            await peer.send(message)
            await peer.final(message["token"])
            await until(lambda: agent.held_runs() == [], what="the end to be acknowledged")


def test_the_directory_of_a_run_left_by_a_stopped_agent_is_removed_when_the_next_agent_starts(tmp_path: Path) -> None:
    root = tmp_path / "work"
    work_dir = work_dir_of(root, run_async(left_running(root)))
    assert (work_dir / ".fetchml" / "stdout.log").exists()

    with orphans.claimed(root):
        assert not work_dir.parent.exists()


def test_the_removal_of_a_left_run_directory_is_logged_with_its_path_and_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "work"
    message = run_async(left_running(root))
    caplog.set_level(logging.WARNING, logger="scheduler.agent")

    with orphans.claimed(root):
        pass

    removals = [r for r in caplog.records if r.getMessage().startswith("removing the work directory")]
    assert [r.levelno for r in removals] == [logging.WARNING], caplog.text
    said = removals[0].getMessage()
    assert str(work_dir_of(root, message)) in said
    assert f"task {message['task_id']}" in said
    assert "the server has re-queued or ended that run" in said


def test_a_directory_kept_because_its_files_were_not_uploaded_survives_the_next_agents_start(tmp_path: Path) -> None:
    root = tmp_path / "work"
    message = assign(python("print('done')"))
    run_async(finished(root, message))  # this agent does not upload (--no-artifacts)
    work_dir = work_dir_of(root, message)
    assert (work_dir / ".fetchml" / "kept").read_text() == "this worker does not upload artifacts"

    with orphans.claimed(root):
        assert (work_dir / ".fetchml" / "stdout.log").read_text() == "done\n"


def test_a_directory_with_files_stored_nowhere_else_survives_an_agent_that_stopped_before_its_end_was_acknowledged(
    tmp_path: Path,
) -> None:
    root = tmp_path / "work"
    message = assign(python("print('done')"))

    async def scenario() -> None:
        async with Peer(ack_finals=False) as peer, running_agent(peer.url, root):
            await peer.send(message)
            await peer.final(message["token"])

    run_async(scenario())

    with orphans.claimed(root):
        assert (work_dir_of(root, message) / ".fetchml" / "stdout.log").read_text() == "done\n"


async def killed_by_a_forced_shutdown(tmp_path: Path, code: str, done: str) -> dict[str, Any]:
    """A run (`code`, then waiting, deaf to SIGTERM) a real agent killed at once when told SIGTERM
    three times (the second gives it a grace, the third kills it storing nothing), once the file
    `done` of its work directory is there: its assign."""
    deaf = f"import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('deaf', flush=True)\n{code}"
    message = assign(gated(tmp_path / "never", deaf))
    log = tmp_path / "worker.log"

    async with Peer() as peer, worker_process(peer, tmp_path, "--gpus", "0") as worker:

        def ready() -> bool:
            deaf_now = "deaf" in peer.log_lines(message["token"])  # said once it ignores SIGTERM
            return deaf_now and (work_dir_of(tmp_path / "work", message) / done).exists()

        await peer.send(message)
        await peer.status(message["token"], "running")
        await until(ready, what=f"the run's {done}, once it ignores SIGTERM")
        worker.send_signal(signal.SIGTERM)
        await until(lambda: "SIGTERM: draining" in log.read_text(), what="the drain")
        worker.send_signal(signal.SIGTERM)
        await until(lambda: "shutting down: killing" in log.read_text(), what="the forced stop")
        worker.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(worker.wait(), 15) == 0
        assert (await peer.final(message["token"]))["failure_reason"] == "worker_lost"
    return message


def test_the_directory_of_a_run_a_forced_shutdown_killed_is_removed_when_the_next_agent_starts(tmp_path: Path) -> None:
    message = run_async(killed_by_a_forced_shutdown(tmp_path, "print('working')", ".fetchml/stdout.log"))
    work_dir = work_dir_of(tmp_path / "work", message)
    assert not (work_dir / ".fetchml" / "kept").exists()

    with orphans.claimed(tmp_path / "work"):
        assert not work_dir.parent.exists()


def test_the_directory_of_a_run_a_forced_shutdown_killed_after_it_wrote_files_is_kept(tmp_path: Path) -> None:
    code = "import os, pathlib\npathlib.Path(os.environ['FETCHML_OUTPUT_DIR'], 'ckpt').write_text('1')"
    message = run_async(killed_by_a_forced_shutdown(tmp_path, code, "output/ckpt"))
    work_dir = work_dir_of(tmp_path / "work", message)

    with orphans.claimed(tmp_path / "work"):
        assert (work_dir / "output" / "ckpt").read_text() == "1"


def test_the_most_recent_directories_kept_as_asked_survive_the_next_agents_start(tmp_path: Path) -> None:
    root = tmp_path / "work"
    message = assign(NOT_A_COMMAND)
    run_async(finished(root, message, keep_run_dirs=1))
    work_dir = work_dir_of(root, message)
    assert work_dir.is_dir()

    with orphans.claimed(root):
        assert work_dir.is_dir()


def test_a_restarted_agent_counts_the_most_recent_directories_its_predecessor_kept_as_its_own(tmp_path: Path) -> None:
    root = tmp_path / "work"
    older, newer = assign(NOT_A_COMMAND), assign(NOT_A_COMMAND)
    run_async(finished(root, older, keep_run_dirs=1))

    run_async(finished(root, newer, keep_run_dirs=1))

    assert not work_dir_of(root, older).parent.exists()
    assert work_dir_of(root, newer).is_dir()


def test_an_agent_of_another_name_leaves_the_most_recent_directories_it_did_not_keep_alone(tmp_path: Path) -> None:
    root = tmp_path / "work"
    theirs, mine = assign(NOT_A_COMMAND), assign(NOT_A_COMMAND)
    run_async(finished(root, theirs, keep_run_dirs=1, name="other-box"))

    run_async(finished(root, mine, keep_run_dirs=1))

    assert work_dir_of(root, theirs).is_dir()
    assert work_dir_of(root, mine).is_dir()


def test_an_agent_starting_beside_a_live_agent_removes_none_of_its_run_directories(tmp_path: Path) -> None:
    root = tmp_path / "work"
    message = assign(python(PRINTS_PID_AND_WAITS))

    async def scenario() -> None:
        async with Peer() as peer, running_agent(peer.url, root):
            await peer.send(message)
            line = await peer.next(lambda m: m["type"] == "log" and m["token"] == message["token"])
            with orphans.claimed(root):
                assert (work_dir_of(root, message) / ".fetchml").is_dir()
                assert not process_gone(int(line["lines"][0]["line"]))

    with orphans.claimed(root):  # the live agent's hold on the work directory
        run_async(scenario())


def run_dir_lookalike(path: Path) -> Path:
    (path / ".fetchml").mkdir(parents=True)
    (path / ".fetchml" / "stdout.log").write_text("kept\n")
    return path


def test_the_start_up_cleanup_touches_nothing_but_run_directories(tmp_path: Path) -> None:
    root = tmp_path / "work"
    outside = run_dir_lookalike(tmp_path / "elsewhere" / "1")
    task_id = uuid.uuid4().hex
    spared = [
        run_dir_lookalike(root / "workspaces" / "notebooks" / "1"),  # a Jupyter workspace
        run_dir_lookalike(root / ".cache" / "blobs" / "1"),
        run_dir_lookalike(root / "not-a-task-id" / "1"),
        run_dir_lookalike(root / task_id / "latest"),
        root / str(uuid.uuid4()) / "1",  # no .fetchml: not a run's
    ]
    spared[-1].mkdir(parents=True)
    (root / str(uuid.uuid4())).symlink_to(outside.parent)  # a link out of the work directory
    left = run_dir_lookalike(root / task_id / "1")

    with orphans.claimed(root):
        assert not left.exists()
        assert all(path.is_dir() for path in spared)
        assert (outside / ".fetchml" / "stdout.log").exists()


# --- end to end: a killed agent, restarted ------------------------------------------------------


@pytest.fixture
def system(tmp_path: Path) -> Iterator[LiveSystem]:
    with LiveSystem(tmp_path=tmp_path, database_url=database_url_for(connection)) as live:
        yield live
    orphans.sweep(tmp_path, grace=0)  # what a failing test left running


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_a_restarted_agent_removes_the_directory_of_the_run_its_killed_predecessor_had_going(
    system: LiveSystem, tmp_path: Path, owner_key: str, agent_key: str
) -> None:
    marker = tmp_path / "started"
    code = f"import pathlib, time\npathlib.Path({str(marker)!r}).touch()\ntime.sleep(300)"
    agent = system.start_worker("a", key=agent_key)
    task = system.submit(owner_key, entrypoint=python_command(code))
    wait_until(marker.exists, what="the run to start")
    work_dir = tmp_path / "work-a" / task["id"] / "1"
    assert work_dir.is_dir()
    agent.process.kill()  # kill -9 of the agent
    agent.process.wait()

    restarted = system.start_worker("a", key=agent_key, wait=False)
    wait_until(lambda: " as a (worker " in restarted.output(), what="the restarted agent to be welcomed")

    assert not work_dir.exists()
    assert f"removing the work directory {work_dir}: " in restarted.output()
