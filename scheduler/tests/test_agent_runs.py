"""The agent runs real child processes for a real WebSocket peer: outcomes, logs, env, cancel, timeout."""

from __future__ import annotations

import logging
import os
import shlex
import time
from pathlib import Path

from scheduler.tests.agent_peer import Peer, assign, gated, process_gone, python, run_async, running_agent, until


def test_successful_run_reports_lifecycle_logs_and_stdout_tail(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Peer() as peer, running_agent(peer.url, tmp_path):
            message = assign(python("import sys\nfor i in range(450): print('line', i)\nprint('bye', file=sys.stderr)"))
            await peer.send(message)
            token = message["token"]
            final = await peer.final(token)

            assert final["status"] == "completed"
            assert final["exit_code"] == 0
            assert final["output"].endswith("line 448\nline 449")
            kinds = [m.get("status", m["type"]) for m in peer.about(token) if m["type"] in {"ack", "status"}]
            assert kinds == ["ack", "preparing", "running", "collecting", "completed"]
            batches = [m["lines"] for m in peer.about(token) if m["type"] == "log"]
            assert all(len(batch) <= 200 for batch in batches)
            assert peer.log_lines(token) == [f"line {i}" for i in range(450)]
            assert peer.log_lines(token, "stderr") == ["bye"]

    run_async(scenario())


def test_log_lines_arrive_while_the_task_is_still_running(tmp_path: Path) -> None:
    gate = tmp_path / "gate"

    async def scenario() -> None:
        async with Peer() as peer, running_agent(peer.url, tmp_path / "work"):
            code = f"import os, time\nprint('started')\nwhile not os.path.exists({str(gate)!r}): time.sleep(0.01)"
            message = assign(python(code))
            await peer.send(message)
            batch = await peer.next(lambda m: m["type"] == "log")
            assert batch["lines"] == [{"stream": "stdout", "line": "started"}]
            assert not any(m.get("status") in {"completed", "failed"} for m in peer.about(message["token"]))
            gate.touch()
            assert (await peer.final(message["token"]))["status"] == "completed"

    run_async(scenario())


def test_non_zero_exit_fails_with_exit_code_and_stderr_tail(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Peer() as peer, running_agent(peer.url, tmp_path):
            code = "import sys\nprint('partial result')\nprint('Traceback: boom', file=sys.stderr)\nsys.exit(3)"
            message = assign(python(code))
            await peer.send(message)
            final = await peer.final(message["token"])

            assert final["status"] == "failed"
            assert final["failure_reason"] == "exit_code"
            assert final["exit_code"] == 3
            assert final["error"] == "Traceback: boom"
            assert final["output"] == "partial result"

    run_async(scenario())


def test_command_that_cannot_start_fails_as_preparation(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Peer() as peer, running_agent(peer.url, tmp_path):
            message = assign("no-such-program-fetchml", args="--flag")
            await peer.send(message)
            final = await peer.final(message["token"])

            assert final["status"] == "failed"
            assert final["failure_reason"] == "preparation"
            assert "no-such-program-fetchml" in final["error"]
            assert "No such file" in final["error"]
            assert "neither a file of the work directory nor a command on PATH" in final["error"]
            assert "running" not in [m.get("status") for m in peer.about(message["token"])]

    run_async(scenario())


def test_unbalanced_quotes_in_the_command_line_fail_as_preparation(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Peer() as peer, running_agent(peer.url, tmp_path):
            message = assign("python", args="-c 'print(1)")
            await peer.send(message)
            final = await peer.final(message["token"])
            assert (final["status"], final["failure_reason"]) == ("failed", "preparation")
            assert "quotation" in final["error"]

    run_async(scenario())


def test_empty_command_line_fails_as_preparation(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Peer() as peer, running_agent(peer.url, tmp_path):
            message = assign("")
            await peer.send(message)
            final = await peer.final(message["token"])
            assert (final["status"], final["failure_reason"]) == ("failed", "preparation")
            assert "no command to run" in final["error"]

    run_async(scenario())


def test_assign_with_a_field_the_agent_cannot_read_fails_as_preparation(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Peer() as peer, running_agent(peer.url, tmp_path):
            message = assign("true", env={"EPOCHS": 10})
            await peer.send(message)
            final = await peer.final(message["token"])
            assert (final["status"], final["failure_reason"]) == ("failed", "preparation")
            assert "cannot run the assignment: field 'env'" in final["error"]
            assert "running" not in [m.get("status") for m in peer.about(message["token"])]

    run_async(scenario())


def test_command_line_is_split_without_a_shell(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Peer() as peer, running_agent(peer.url, tmp_path):
            message = assign(python("import sys; print(sys.argv[1:])"), args="'two words' $HOME ';' `x`")
            await peer.send(message)
            final = await peer.final(message["token"])
            assert final["output"] == "['two words', '$HOME', ';', '`x`']"

    run_async(scenario())


def test_a_run_never_sees_the_agents_key_nor_server_secrets_but_gets_the_rest_of_its_environment(
    tmp_path: Path,
) -> None:
    agent_env = {
        "PATH": os.environ["PATH"],
        "FETCHML_WORKER_API_KEY": "fetchml_abc_secret",
        "DJANGO_SECRET_KEY": "server-secret",
        "DATABASE_URL": "postgres://fetchml:pw@db/fetchml",
        "HF_HOME": "/data/hf",
    }
    code = "import os\nfor name in sorted(os.environ): print(name)"

    async def scenario() -> str:
        async with Peer() as peer, running_agent(peer.url, tmp_path, base_env=agent_env):
            message = assign(python(code))
            await peer.send(message)
            return (await peer.final(message["token"]))["output"]

    seen = run_async(scenario()).splitlines()
    assert {"PATH", "HF_HOME", "FETCHML_TASK_ID"} <= set(seen)
    assert not {"FETCHML_WORKER_API_KEY", "DJANGO_SECRET_KEY", "DATABASE_URL"} & set(seen)


def test_run_gets_its_env_gpu_node_vars_and_a_fresh_work_directory(tmp_path: Path) -> None:
    names = [
        "FETCHML_TASK_ID",
        "FETCHML_OUTPUT_DIR",
        "FETCHML_WORK_DIR",
        "CUDA_VISIBLE_DEVICES",
        "FETCHML_NODE_RANK",
        "FETCHML_NUM_NODES",
        "MASTER_ADDR",
        "MASTER_PORT",
        "WORLD_SIZE",
        "RANK",
        "WANDB_MODE",
    ]
    code = f"import os\nfor n in {names!r}: print(n + '=' + os.environ[n])\nprint('cwd=' + os.getcwd())"
    stale = tmp_path / "task-7" / "2" / "leftover.txt"
    stale.parent.mkdir(parents=True)
    stale.write_text("from an earlier try")

    async def scenario() -> None:
        async with Peer() as peer, running_agent(peer.url, tmp_path):
            message = assign(
                python(code),
                task_id="task-7",
                attempt=2,
                env={"WANDB_MODE": "offline", "CUDA_VISIBLE_DEVICES": "0,1,2,3"},
                resources={"cpu": 1, "memory_gb": 1, "gpus": 2, "gpu_indices": [1, 3]},
                node={"rank": 1, "count": 2, "master_addr": "10.0.0.7", "master_port": 29501},
            )
            await peer.send(message)
            final = await peer.final(message["token"])
            env = dict(line.split("=", 1) for line in final["output"].splitlines())

            work = tmp_path / "task-7" / "2"
            assert env["FETCHML_TASK_ID"] == "task-7"
            assert env["FETCHML_WORK_DIR"] == str(work)
            assert env["FETCHML_OUTPUT_DIR"] == str(work / "output")
            assert env["cwd"] == str(work)
            assert env["CUDA_VISIBLE_DEVICES"] == "1,3"
            assert (env["FETCHML_NODE_RANK"], env["FETCHML_NUM_NODES"]) == ("1", "2")
            assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("10.0.0.7", "29501")
            assert (env["WORLD_SIZE"], env["RANK"]) == ("2", "1")
            assert env["WANDB_MODE"] == "offline"
            assert (work / "output").is_dir()
            assert not stale.exists()

    run_async(scenario())


def test_run_without_gpus_sees_no_gpus(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with (
            Peer() as peer,
            running_agent(peer.url, tmp_path, base_env={**os.environ, "CUDA_VISIBLE_DEVICES": "0"}),
        ):
            message = assign(python("import os; print(repr(os.environ['CUDA_VISIBLE_DEVICES']))"))
            await peer.send(message)
            assert (await peer.final(message["token"]))["output"] == "''"

    run_async(scenario())


def test_duplicate_assign_is_acked_again_but_runs_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Peer() as peer, running_agent(peer.url, tmp_path):
            gate = tmp_path / "gate"
            message = assign(python(f"import os, time\nwhile not os.path.exists({str(gate)!r}): time.sleep(0.01)"))
            token = message["token"]
            await peer.send(message)
            await peer.status(token, "running")
            await peer.send(message)
            await peer.next(lambda m: m["type"] == "ack" and m["token"] == token)
            gate.touch()
            await peer.final(token)

            statuses = [m["status"] for m in peer.about(token) if m["type"] == "status"]
            assert statuses == ["preparing", "running", "collecting", "completed"]
            assert [m["type"] for m in peer.about(token)].count("ack") == 2

    run_async(scenario())


def test_an_assign_sent_again_after_its_run_was_settled_starts_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "starts"

    async def scenario() -> None:
        async with Peer() as peer, running_agent(peer.url, tmp_path, keep_run_dirs=5) as agent:
            message = assign(python(f"open({str(marker)!r}, 'a').write('start\\n')\nopen('model.ckpt', 'w')"))
            token = message["token"]
            await peer.send(message)
            await peer.final(token)
            await until(lambda: agent.held_runs() == [], what="the run to be settled and forgotten")
            [run_dir] = [path.parent for path in tmp_path.rglob("model.ckpt")]

            await peer.send(message)  # a re-send that raced the run's final status
            later = assign(python("print('later')"))
            await peer.send(later)
            await peer.final(later["token"])

            assert marker.read_text() == "start\n"
            assert [m["type"] for m in peer.about(token)].count("ack") == 1
            assert (run_dir / "model.ckpt").exists()

    run_async(scenario())


def test_a_draining_agent_acks_a_run_it_holds_again_when_its_assign_is_sent_again(tmp_path: Path) -> None:
    gate = tmp_path / "gate"

    async def scenario() -> None:
        async with Peer() as peer, running_agent(peer.url, tmp_path) as agent:
            message = assign(gated(gate))
            token = message["token"]
            await peer.send(message)
            await peer.status(token, "running")
            agent.drain()
            await peer.next(lambda m: m["type"] == "draining")

            await peer.send(message)  # the server never got the first ack
            await peer.next(lambda m: m["type"] == "ack" and m["token"] == token)  # the first was read before `running`
            gate.touch()
            await peer.final(token)

            assert [m["type"] for m in peer.about(token)].count("ack") == 2

    run_async(scenario())


def test_cancel_sends_sigterm_then_sigkill_after_the_grace_period(tmp_path: Path) -> None:
    code = (
        "import signal, sys, time\n"
        "def term(*_): print('got SIGTERM, ignoring it', flush=True)\n"
        "signal.signal(signal.SIGTERM, term)\n"
        "print('ready', flush=True)\n"
        "while True: time.sleep(0.05)"
    )

    async def scenario() -> None:
        async with Peer() as peer, running_agent(peer.url, tmp_path):
            message = assign(python(code), cancel_grace_seconds=0.5)
            token = message["token"]
            await peer.send(message)
            await peer.next(lambda m: m["type"] == "log" and m["token"] == token)
            started = time.monotonic()
            await peer.send({"type": "cancel", "task_id": message["task_id"], "token": token, "reason": "by alice"})
            final = await peer.final(token)

            assert time.monotonic() - started >= 0.5
            assert final["status"] == "cancelled"
            assert final["exit_code"] == 128 + 9
            assert "got SIGTERM, ignoring it" in peer.log_lines(token)
            assert "collecting" not in [m.get("status") for m in peer.about(token)]

    run_async(scenario())


def test_cancel_of_a_well_behaved_task_does_not_wait_for_the_grace_period(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Peer() as peer, running_agent(peer.url, tmp_path):
            message = assign(python("import time\nprint('ready')\ntime.sleep(60)"), cancel_grace_seconds=30)
            token = message["token"]
            await peer.send(message)
            await peer.next(lambda m: m["type"] == "log" and m["token"] == token)
            await peer.send({"type": "cancel", "task_id": message["task_id"], "token": token})
            final = await peer.final(token, timeout=10)
            assert (final["status"], final["exit_code"]) == ("cancelled", 128 + 15)

    run_async(scenario())


def test_cancel_kills_grandchildren_that_ignore_sigterm(tmp_path: Path) -> None:
    grandchild = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(300)"
    script = f"{python(grandchild)} & echo $!; wait"

    async def scenario() -> None:
        async with Peer() as peer, running_agent(peer.url, tmp_path):
            message = assign("/bin/sh", args=f"-c {shlex.quote(script)}", cancel_grace_seconds=0.3)
            token = message["token"]
            await peer.send(message)
            batch = await peer.next(lambda m: m["type"] == "log" and m["token"] == token)
            pid = int(batch["lines"][0]["line"])
            assert not process_gone(pid)
            await peer.send({"type": "cancel", "task_id": message["task_id"], "token": token})
            assert (await peer.final(token))["status"] == "cancelled"
            await until(lambda: process_gone(pid), what=f"grandchild {pid} to die")

    run_async(scenario())


def test_processes_left_behind_by_a_finished_task_are_killed(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Peer() as peer, running_agent(peer.url, tmp_path):
            message = assign("/bin/sh", args="-c 'sleep 300 & echo $!'")
            await peer.send(message)
            final = await peer.final(message["token"])
            assert final["status"] == "completed"
            pid = int(final["output"])
            await until(lambda: process_gone(pid), what=f"left-behind process {pid} to die")

    run_async(scenario())


def test_timeout_terminates_the_group_and_fails_with_timeout(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Peer() as peer, running_agent(peer.url, tmp_path):
            message = assign("/bin/sh", args="-c 'echo working; sleep 30'", timeout_seconds=0.5, cancel_grace_seconds=2)
            await peer.send(message)
            final = await peer.final(message["token"])

            assert final["status"] == "failed"
            assert final["failure_reason"] == "timeout"
            assert final["exit_code"] == 128 + 15
            assert final["error"].startswith("timed out after 0.5 s")

    run_async(scenario())


def test_stops_repeated_for_a_run_are_logged_once(tmp_path: Path, caplog) -> None:
    async def scenario() -> None:
        async with Peer() as peer, running_agent(peer.url, tmp_path) as agent:
            message = assign(gated(tmp_path / "gate"))
            await peer.send(message)
            await peer.status(message["token"], "running")
            stop = {"type": "stop", "task_id": message["task_id"], "token": message["token"], "reason": "stale token"}
            for _ in range(3):
                await peer.send(stop)
            await until(lambda: agent.held_runs() == [], what="the run to be forgotten")
            await peer.send({"type": "drain"})  # the marker: handled after the stops
            await until(lambda: agent.draining, what="the drain")

    caplog.set_level(logging.INFO, logger="scheduler.agent.client")
    run_async(scenario())
    assert caplog.text.count("stopping task") == 1


def test_stop_kills_at_once_and_says_nothing_more_about_the_run(tmp_path: Path) -> None:
    code = "import os, signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint(os.getpid())\ntime.sleep(300)"

    async def scenario() -> None:
        async with Peer(heartbeat_seconds=0.1) as peer, running_agent(peer.url, tmp_path) as agent:
            message = assign(python(code), cancel_grace_seconds=60)
            token = message["token"]
            await peer.send(message)
            batch = await peer.next(lambda m: m["type"] == "log" and m["token"] == token)
            pid = int(batch["lines"][0]["line"])
            await peer.send({"type": "stop", "task_id": message["task_id"], "token": token, "reason": "stale token"})
            await until(lambda: process_gone(pid), timeout=5, what="the stopped run to die")
            said_before = len(peer.about(token))

            later = assign(python("print('next')"))
            await peer.send(later)
            await peer.final(later["token"])
            await peer.next(lambda m: m["type"] == "heartbeat", timeout=10)

            assert len(peer.about(token)) == said_before
            assert agent.held_runs() == []

    run_async(scenario(), timeout=30)
