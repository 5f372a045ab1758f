"""One run of one task: its work directory and inputs, its child process group, its logs, outputs and outcome.

The child is started in a session of its own (``start_new_session``), so its process id is also
the id of a process group holding everything it starts. Cancel, timeout and stop signal that
whole group, and whatever is left in it once the main process has exited is killed, so no
grandchild outlives its run. A descendant that calls ``setsid`` itself leaves the group: on Linux
it is found by its environment and killed too (`orphans.end_escapees`).

Files: the snapshot is unpacked into the work directory and the datasets are linked in while
`preparing`; the full stdout and stderr are written to ``.fetchml/stdout.log`` and
``.fetchml/stderr.log`` in the work directory as they arrive; in `collecting` they and the output
directory are uploaded and committed before the final status is produced. A run ended by a cancel
or its timeout is collected too, once its group is gone: what it saved in its grace period (a
checkpoint) is kept. Only a forced shutdown or a `stop` skips that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from scheduler.agent import entrypoint, orphans, protocol
from scheduler.agent.artifacts import NOT_UPLOADING, RUN_FILES, Collected, StaleRun, UploadFailed, collect
from scheduler.agent.datasets import DatasetFetcher, parse_specs
from scheduler.agent.files import FileServices
from scheduler.agent.output import LineAssembler
from scheduler.agent.protocol import Assignment, CommandLineError, command_argv
from scheduler.agent.services import JupyterWatch, ServiceLauncher, parse_service
from scheduler.agent.sidecars import Companion, Sidecar, sidecars_for
from scheduler.agent.snapshots import unpack_snapshot

logger = logging.getLogger(__name__)

TAIL_LINES = 50
TAIL_CHARS = 8000
LOG_BATCH_LINES = 200
LOG_BATCH_BYTES = 128 * 1024
LOG_FLUSH_SECONDS = 0.25
# After the main process has gone, how long its pipes may stay open (a descendant that left the
# process group can hold them) before the run is reported without the rest of its output.
PIPE_DRAIN_SECONDS = 5.0
# How long the launcher may take to exec the command before the run is supervised as started.
EXEC_REPORT_SECONDS = 60.0
KILL_WAIT_SECONDS = 10.0
# How long a cancelled or timed-out run may take to store its files before its end is reported without them.
INTERRUPTED_COLLECT_SECONDS = 300.0
SERVICE_DRAINED = "worker drained: a draining worker stops its services"
# Said of a SIGKILL the agent did not send: the kernel's OOM killer sends one.
OOM_HINT = "a process killed this way may have run out of memory"
# The agent's environment passes to its tasks, but for what is the agent's or the server's alone: the
# worker key (with it a task could connect as a worker and be sent other users' runs and plugin
# secrets) and server secrets an agent started beside the server (`serve`) inherits.
WITHHELD_FROM_TASKS = frozenset(
    {
        "FETCHML_WORKER_API_KEY",
        "FETCHML_WORKER_API_KEY_FILE",
        "DJANGO_SECRET_KEY",
        "DJANGO_SECRET_KEY_FILE",
        "DATABASE_URL",
        "REDIS_URL",
        "FETCHML_AUDIT_SIGNING_KEY",
        "FETCHML_AUDIT_SIGNING_KEY_FILE",
    }
)
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
LOG_ARTIFACTS = {"stdout": "logs/stdout.log", "stderr": "logs/stderr.log"}
LOG_STREAMS = {1: "stdout", 2: "stderr"}
_INTERRUPTED = object()

Emit = Callable[[dict[str, Any]], None]


class PreparationError(Exception):
    """The run could not be started; the message is reported to the user."""


class _ChildProtocol(asyncio.SubprocessProtocol):
    """Turns the child's stdout/stderr into log lines (scheduler.agent.output) and notes when it
    exits and its pipes close."""

    def __init__(self, on_line: Callable[[str, str], None], on_data: Callable[[int, bytes], None]) -> None:
        loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[None] = loop.create_future()
        self.pipes_closed: asyncio.Future[None] = loop.create_future()
        self._on_data = on_data
        self._lines = {
            1: LineAssembler(lambda line: on_line("stdout", line)),
            2: LineAssembler(lambda line: on_line("stderr", line)),
        }
        self._open_pipes = {1, 2}

    def close_lines(self) -> None:
        """The pipes are given up (a descendant that left the group may hold them open): what a line
        assembler still holds, a last line without its newline, ends that stream's output."""
        for fd in sorted(self._open_pipes):
            self._lines[fd].close()
        self._open_pipes.clear()

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        self._on_data(fd, data)
        self._lines[fd].feed(data)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if fd not in self._open_pipes:
            return
        self._lines[fd].close()
        self._open_pipes.discard(fd)
        if not self._open_pipes and not self.pipes_closed.done():
            self.pipes_closed.set_result(None)

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)


def _holds_anything(directory: Path) -> bool:
    try:
        return any(directory.iterdir())
    except OSError:  # the task removed it
        return False


def _tail(lines: deque[str]) -> str:
    return "\n".join(lines)[-TAIL_CHARS:]


def _error_text(head: str, stderr: str = "", notes: list[str] | None = None) -> str:
    """A final status's `error`: `head` (how the run ended), the stderr tail, then `notes` (what is
    missing from the artifacts or the log files), each on lines of its own, within TAIL_CHARS. What
    does not fit is cut from the start of the stderr tail, its oldest output, so the explanation stays."""
    notes = [note for note in notes or [] if note]
    if stderr:
        room = TAIL_CHARS - sum(len(part) + 1 for part in (head, *notes) if part)
        stderr = stderr[-room:] if room > 0 else ""
    return "\n".join(part for part in (head, stderr, *notes) if part)[-TAIL_CHARS:]


def _signal_named(number: int) -> str:
    try:
        return f"signal {number} ({signal.Signals(number).name})"
    except ValueError:
        return f"signal {number}"


class Ending(NamedTuple):
    """How a run's process ended: its exit code in shell convention (128 + N for signal N) and a
    phrase for the error text, which names the signal when one ended it."""

    exit_code: int
    how: str
    signalled: bool

    def after(self, lead: str) -> str:
        """`lead` (what ended the run, or went wrong after it), then how the process ended."""
        return f"{lead}; {self.how}" if self.signalled else f"{lead} ({self.how})"


def _describe_exit(returncode: int, *, agent_sigkill: str | None = None, grace: float = 0.0) -> Ending:
    """`agent_sigkill`: the agent sent SIGKILL itself, "grace" once the `grace` seconds after its
    SIGTERM ran out, "forced" at once; a SIGKILL it did not send (the OOM killer's) gets OOM_HINT."""
    if returncode >= 0:
        return Ending(returncode, f"exited with code {returncode}", signalled=False)
    how = f"killed by {_signal_named(-returncode)}"
    if returncode == -signal.SIGKILL:
        if agent_sigkill == "grace":
            how = f"did not stop within its {grace:g} s grace after SIGTERM; {how}"
        elif agent_sigkill is None:
            how = f"{how}; {OOM_HINT}"
    return Ending(128 - returncode, how, signalled=True)


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is already empty
        os.killpg(pgid, sig)


class Run:
    """Executes one assignment; reports through `emit`; `execute()` returns the final status message."""

    def __init__(
        self,
        assignment: Assignment,
        *,
        work_root: Path,
        emit: Emit,
        base_env: Mapping[str, str] | None = None,
        files: FileServices | None = None,
        launcher: ServiceLauncher | None = None,
    ) -> None:
        self.assignment = assignment
        # Service runs and plugin sidecars (scheduler.agent.services / .sidecars).
        self._launcher = launcher or ServiceLauncher()
        self._companions: list[Companion] = []
        self._work_root = work_root
        self._files = files
        # Set when the run ends or is interrupted: transfers in threads stop at their next chunk.
        self._abort = threading.Event()
        self._datasets: DatasetFetcher | None = None
        self._log_files: dict[int, Any] = {}
        # Why a log file misses output (a full disk), by pipe: noted in the final status.
        self._incomplete_logs: dict[int, str] = {}
        self._emit = emit
        given = os.environ if base_env is None else base_env
        self._base_env = {name: value for name, value in given.items() if name not in WITHHELD_FROM_TASKS}
        self._stop_reason: str | None = None  # "cancel", "drain", "give_up", "stop" or "shutdown"
        self._given_up_grace = 0.0  # the grace of a `give_up`
        self._interrupt = asyncio.Event()
        self._kill_now = asyncio.Event()
        # Set when the agent SIGKILLs the process itself: "grace" (its grace ran out) or "forced".
        self._agent_sigkill: str | None = None
        self._silenced = False
        # The last progress state reported (heartbeats repeat it, in case that report was lost).
        self.progress = "preparing"
        self._tails: dict[str, deque[str]] = {"stdout": deque(maxlen=TAIL_LINES), "stderr": deque(maxlen=TAIL_LINES)}
        self._log_lines: list[dict[str, str]] = []
        self._log_bytes = 0
        self._log_seq = 0  # the place of the next line sent in the run's output
        # Flow control, the agent's to set: while held, the child's pipes are not read (it waits on its
        # own writes) and no `log` message goes out; the lines already read wait in `_log_lines`.
        self._output_released = asyncio.Event()
        self._output_released.set()
        self._transport: asyncio.SubprocessTransport | None = None
        self._child: _ChildProtocol | None = None
        # Why the work directory holds files stored nowhere else ("" once they were, or when there are
        # none): the agent keeps such a directory when the run is over (artifacts.RunDirs).
        self.unstored = ""

    @property
    def task_id(self) -> str:
        return self.assignment.task_id

    @property
    def token(self) -> str:
        return self.assignment.token

    @property
    def work_dir(self) -> Path:
        return self._work_root / self.assignment.task_id / str(self.assignment.attempt)

    @property
    def output_dir(self) -> Path:
        return self.work_dir / "output"

    # -- requests from the agent -------------------------------------------------------------

    def cancel(self) -> None:
        """SIGTERM the group, SIGKILL after the grace period, report `cancelled`. The owner's cancel
        also wins over a `give_up` under way: the run ends as cancelled, not to be retried."""
        if self._stop_reason in (None, "give_up"):
            self._stop_reason = "cancel"
            self._interrupt.set()

    def give_up(self, *, grace: float) -> None:
        """The agent is being stopped (its forced stop): end the run as a cancel would, with `grace`
        seconds (its own cancel_grace_seconds if shorter) between SIGTERM and SIGKILL, store what it
        wrote (a checkpoint), and report it `failed` (worker_lost), which the server retries."""
        if self._stop_reason is None:
            self._stop_reason = "give_up"
            self._given_up_grace = min(grace, self.assignment.cancel_grace_seconds)
            self._interrupt.set()

    def wind_down(self) -> None:
        """The agent is draining and this run is a service, which never ends by itself: end it as a
        cancel would (SIGTERM, the grace, SIGKILL) and report it `failed` (worker_lost), so that the
        drain completes and the run shows as ended by its worker, not by its owner's code."""
        if self._stop_reason is None:
            self._stop_reason = "drain"
            self._interrupt.set()

    def stop(self) -> None:
        """The token is stale: kill at once and report nothing more."""
        self._silenced = True
        self._stop_reason = "stop"
        self._interrupt.set()
        self._kill_now.set()
        self.release_output()

    def shutdown(self) -> None:
        """The agent is being forced down: kill at once and report `failed` (worker_lost)."""
        if self._stop_reason != "stop":
            self._stop_reason = "shutdown"
            self._interrupt.set()
            self._kill_now.set()
            self.release_output()  # its last lines go at once, with its end

    @property
    def output_held(self) -> bool:
        return not self._output_released.is_set()

    def hold_output(self) -> None:
        """The server has enough of this run's `log` messages unacknowledged: read no more of the
        child's output (it blocks on its writes once the pipes are full) and send no more lines.
        A run being killed at once (stop, forced shutdown) is never held: it must end quickly."""
        if not self.output_held and not self._kill_now.is_set():
            self._output_released.clear()
            self._read_pipes_as_paced()

    def release_output(self) -> None:
        """Send the lines read meanwhile and read the child's output again."""
        if self.output_held:
            self._output_released.set()
            self._send_lines(full_only=True)  # may be held again before they are all out
            self._read_pipes_as_paced()

    # -- the run ---------------------------------------------------------------------------

    async def execute(self) -> dict[str, Any] | None:
        """Prepare, start, supervise and collect; the final status message, or None when stopped."""
        self._status("preparing")
        try:
            return await self._execute()
        finally:
            self._abort.set()
            self._close_logs()
            if self._datasets is not None:
                self._datasets.release()

    async def _execute(self) -> dict[str, Any] | None:
        try:
            argv, env = self._prepare()
            if await self._interruptible(self._prepare_inputs()) is _INTERRUPTED:
                return self._final_interrupted(ending=None)
            if self.assignment.service is None:
                argv = self._entrypoint(argv)
            self._open_logs()
        except PreparationError as exc:
            return self._final("failed", failure_reason="preparation", error=str(exc))
        if self._stop_reason is not None:
            return self._final_interrupted(ending=None)
        loop = asyncio.get_running_loop()
        with orphans.ExecReport() as exec_report:
            try:
                # Tied to this agent: the run's process group is killed if the agent dies (orphans.py).
                command, passed_fds = orphans.tethered(argv, cwd=self.work_dir, env=env, exec_report=exec_report)
                transport, child = await loop.subprocess_exec(
                    lambda: _ChildProtocol(self._on_line, self._on_data),
                    *command,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    cwd=self.work_dir,
                    env=env,
                    start_new_session=True,
                    pass_fds=passed_fds,
                )
            except OSError as exc:
                bare = isinstance(exc, FileNotFoundError) and os.sep not in argv[0]
                hint = " (neither a file of the work directory nor a command on PATH)" if bare else ""
                error = f"cannot start {argv[0]!r}: {exc.strerror or exc}{hint}"
                return self._final("failed", failure_reason="preparation", error=error)
            try:
                exec_failure = await asyncio.wait_for(exec_report.failure(), EXEC_REPORT_SECONDS)
            except TimeoutError:
                # A launcher this slow to exec (a machine thrashing): supervised as started, so that
                # the run's timeout and a cancel apply; a failed exec would then end it by SIGPIPE.
                logger.warning("task %s: no word of its command's exec after %g s", self.task_id, EXEC_REPORT_SECONDS)
                exec_failure = None
            except BaseException:  # we are being cancelled ourselves: leave nothing behind
                _killpg(transport.get_pid(), signal.SIGKILL)
                transport.close()
                raise
        if exec_failure is not None:
            # The launcher could not exec the command: nothing of the user's ran. Its watchdog is
            # still in the group.
            _killpg(transport.get_pid(), signal.SIGKILL)
            try:
                await asyncio.wait({child.exited}, timeout=KILL_WAIT_SECONDS)
            finally:
                transport.close()
            error = f"cannot start {argv[0]!r}: {exec_failure.strerror}"
            return self._final("failed", failure_reason="preparation", error=error)
        self._transport, self._child = transport, child
        self._read_pipes_as_paced()  # the agent may have held the output back already
        child.exited.add_done_callback(lambda _: self._read_pipes_as_paced())
        self.unstored = "its files were not uploaded"
        flusher = asyncio.create_task(self._flush_periodically())
        self._start_companions(env)
        try:
            self._status("running")
            reason = await self._supervise(child, transport.get_pid())
        finally:
            flusher.cancel()
            await self._stop_companions()
            if not child.exited.done():  # we are being cancelled ourselves: leave nothing behind
                _killpg(transport.get_pid(), signal.SIGKILL)
            transport.close()
            # Pipes a descendant that left the group still holds are given up here: the last line
            # without a newline is still in a line assembler, and belongs in the log and the tail.
            child.close_lines()
        await self._send_remaining_lines()
        self._close_logs()
        returncode = transport.get_returncode()
        ending = _describe_exit(
            returncode if returncode is not None else -signal.SIGKILL,
            agent_sigkill=self._agent_sigkill,
            grace=self._grace(),
        )
        if reason is None:
            self._status("collecting")
            return await self._collect(ending)
        if reason in ("cancel", "give_up", "timeout") and not self._kill_now.is_set():
            # What it wrote in its grace period (a checkpoint) is stored as a self-exit's files are. The
            # run reports `running` meanwhile; a kill at once (kill_now) skips this, to be quick.
            return await self._collect(ending, interrupted=reason)
        if not _holds_anything(self.output_dir):
            # Ended uncollected (a forced shutdown, a stop): its lines went to the server as they
            # came, so only files it wrote would be lost with its directory.
            self.unstored = ""
        if reason == "timeout":
            return self._timed_out(ending)
        return self._final_interrupted(ending=ending)

    def _prepare(self) -> tuple[list[str], dict[str, str]]:
        a = self.assignment
        if not _SAFE_ID.match(a.task_id) or ".." in a.task_id:
            raise PreparationError(f"task id {a.task_id!r} cannot name a directory")
        if a.defect:
            raise PreparationError(f"this agent cannot run the assignment: {a.defect}")
        try:
            argv = command_argv(a.entrypoint, a.args)
        except CommandLineError as exc:
            raise PreparationError(f"no command line: {exc}") from None
        output_dir = self.output_dir
        try:
            if self.work_dir.exists():  # a fresh directory per attempt, even if an earlier try left one
                shutil.rmtree(self.work_dir)
            output_dir.mkdir(parents=True)
            (self.work_dir / RUN_FILES).mkdir()
        except OSError as exc:
            raise PreparationError(f"cannot create the work directory {self.work_dir}: {exc}") from None
        # `{output_dir}` in the task's (plugin) variables is the run's output directory (plugins/base.py).
        output = str(output_dir)
        env = {**self._base_env, **{key: value.replace("{output_dir}", output) for key, value in a.env.items()}}
        # Set after the task's env: GPU isolation and the run's identity are not the task's to choose.
        env.update(
            FETCHML_TASK_ID=a.task_id,
            FETCHML_WORK_DIR=str(self.work_dir),
            FETCHML_OUTPUT_DIR=str(output_dir),
            CUDA_VISIBLE_DEVICES=",".join(str(i) for i in a.gpu_indices),
            FETCHML_NODE_RANK=str(a.node.rank),
            FETCHML_NUM_NODES=str(a.node.count),
            MASTER_ADDR=a.node.master_addr,
            MASTER_PORT=str(a.node.master_port),
            WORLD_SIZE=str(a.node.count),
            RANK=str(a.node.rank),
        )
        if a.service is not None:
            try:
                service = self._launcher.prepare(parse_service(a.service), work_root=self._work_root, env=env)
            except ValueError as exc:
                raise PreparationError(f"cannot prepare the service: {exc}") from None
            self._companions.append(JupyterWatch(service, task_id=a.task_id, token=a.token, emit=self._emit))
            argv, env = service.argv, service.env
        return argv, env

    def _entrypoint(self, argv: list[str]) -> list[str]:
        try:
            return entrypoint.resolve(argv, work_dir=self.work_dir)
        except ValueError as exc:
            raise PreparationError(str(exc)) from None

    def _start_companions(self, env: dict[str, str]) -> None:
        """Plugin sidecars and the service watch start with the process (none of them can fail the run)."""
        a = self.assignment
        self._companions += sidecars_for(
            a.sidecars,
            task_id=a.task_id,
            token=a.token,
            work_dir=self.work_dir,
            output_dir=self.output_dir,
            env=env,
            emit=self._emit,
            host=self._launcher.host,
        )
        for companion in self._companions:
            companion.start()

    async def _stop_companions(self) -> None:
        companions, self._companions = self._companions, []
        await asyncio.gather(*(companion.stop() for companion in companions), return_exceptions=True)

    async def _interruptible(
        self, coroutine: Any, *, until: asyncio.Event | None = None, timeout: float | None = None
    ) -> Any:
        """Await `coroutine` unless cancel/stop/shutdown (or the event `until`) comes first, or
        `timeout` seconds pass: then abort it and return _INTERRUPTED."""
        work = asyncio.ensure_future(coroutine)
        interrupt = asyncio.create_task((until or self._interrupt).wait())
        try:
            await asyncio.wait({work, interrupt}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            interrupt.cancel()
            if not work.done():
                self._abort.set()
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
        return work.result() if not work.cancelled() else _INTERRUPTED

    async def _prepare_inputs(self) -> None:
        """Unpack the snapshot into the work directory, then fetch and link the datasets."""
        a = self.assignment
        try:
            specs = parse_specs(a.dataset_specs, a.datasets)
            if (a.snapshot_id or specs) and self._files is None:
                raise ValueError("this agent was started without access to the server's files")
            if a.snapshot_id and self._files is not None:
                await unpack_snapshot(self._files, a.snapshot_id, self.work_dir, abort=self._abort)
            if specs and self._files is not None:
                self._datasets = DatasetFetcher(self._files, task_id=a.task_id, abort=self._abort)
                for spec in specs:
                    await self._datasets.prepare(spec, self.work_dir)
        except ValueError as exc:
            raise PreparationError(str(exc)) from None

    def _open_logs(self) -> None:
        try:
            for fd, stream in LOG_STREAMS.items():
                self._log_files[fd] = (self.work_dir / RUN_FILES / f"{stream}.log").open("wb")
        except OSError as exc:
            self._close_logs()
            raise PreparationError(f"cannot create the log files: {exc}") from None

    def _close_logs(self) -> None:
        files, self._log_files = self._log_files, {}
        for fd, log_file in files.items():
            self._close_log(fd, log_file)

    def _close_log(self, fd: int, log_file: Any) -> None:
        # Closing flushes what is buffered, which fails again on a full disk (the file is closed all the same).
        try:
            log_file.close()
        except OSError as exc:
            self._log_file_failed(fd, exc)

    def _log_file_failed(self, fd: int, exc: OSError) -> None:
        """A full disk must not end the supervision of the run: its log file stays as it is, the
        server still gets every line, and the final status says the file is incomplete."""
        if fd in self._incomplete_logs:
            return
        name = f"{RUN_FILES}/{LOG_STREAMS[fd]}.log"
        logger.error("task %s: cannot write %s, which misses the output from here on: %s", self.task_id, name, exc)
        self._incomplete_logs[fd] = f"log file {name} is incomplete: {exc.strerror or exc}"

    def _on_data(self, fd: int, data: bytes) -> None:
        log_file = self._log_files.get(fd)
        if log_file is not None:
            try:
                log_file.write(data)
            except OSError as exc:
                self._log_file_failed(fd, exc)
                self._close_log(fd, self._log_files.pop(fd))

    async def _collect(self, ending: Ending, *, interrupted: str | None = None) -> dict[str, Any] | None:
        """Upload and commit the run's files, then the final status (reporting what was skipped).

        `interrupted` ("cancel", "give_up" or "timeout"): the run was ended so. Its files are stored all the
        same, for INTERRUPTED_COLLECT_SECONDS at most and cut short only by a forced shutdown or a
        `stop`; its end is reported as it would be without them, an upload that failed noted in `error`.
        """
        stdout = _tail(self._tails["stdout"])
        if interrupted is None:
            upload = self._interruptible(self._upload())
        else:
            upload = self._interruptible(self._upload(), until=self._kill_now, timeout=INTERRUPTED_COLLECT_SECONDS)
        try:
            collected = await upload
        except StaleRun as exc:
            logger.warning("task %s: the server refused its artifacts (%s); forgetting the run", self.task_id, exc)
            self._silenced = True
            return None
        except UploadFailed as exc:
            self.unstored = f"its upload failed: {exc}"
            if interrupted is not None:
                return self._interrupted_end(interrupted, ending, note=f"artifacts not stored: {exc}")
            # Not the task's fault: reported as an infrastructure failure, which the server retries.
            return self._final(
                "failed",
                exit_code=ending.exit_code,
                failure_reason="worker_lost",
                error=ending.after(str(exc)) if ending.signalled else f"{exc} (the process {ending.how})",
                stderr=True,
                output=stdout,
            )
        if collected is _INTERRUPTED:
            if interrupted is None or self._kill_now.is_set():
                return self._final_interrupted(ending=ending)
            note = f"artifacts not stored: not uploaded within {INTERRUPTED_COLLECT_SECONDS:g} s"
            self.unstored = note
            return self._interrupted_end(interrupted, ending, note=note)
        note = collected.note()
        extra: dict[str, Any] = {"skipped_artifacts": [s.as_dict() for s in collected.skipped]} if note else {}
        if interrupted is not None:
            return self._interrupted_end(interrupted, ending, note=note, **extra)
        if ending.exit_code == 0:
            return self._final("completed", exit_code=0, note=note, output=stdout, **extra)
        # A process that exited says why in its stderr tail; a signal is named before it.
        explained = ending.signalled or not _tail(self._tails["stderr"])
        return self._final(
            "failed",
            exit_code=ending.exit_code,
            failure_reason="exit_code",
            error=ending.how if explained else "",
            stderr=True,
            note=note,
            output=stdout,
            **extra,
        )

    def _interrupted_end(self, reason: str, ending: Ending, *, note: str, **extra: Any) -> dict[str, Any] | None:
        if reason == "timeout":
            return self._timed_out(ending, note=note, **extra)
        return self._final_interrupted(ending=ending, note=note, **extra)

    async def _upload(self) -> Collected:
        files, a = self._files, self.assignment
        # One path namespace per attempt and the last commit wins: in a multi-node run only rank 0
        # stores artifacts (docs/worker-protocol.md).
        if a.node.rank != 0:
            # By design its files are rank 0's to store; what it wrote itself stays here, not removed.
            wrote = _holds_anything(self.output_dir)
            self.unstored = f"rank {a.node.rank} wrote output files, which only rank 0 stores" if wrote else ""
            return Collected()
        if files is None or not files.upload_artifacts:
            self.unstored = NOT_UPLOADING
            return Collected()
        logs = {LOG_ARTIFACTS[stream]: self.work_dir / RUN_FILES / f"{stream}.log" for stream in ("stdout", "stderr")}
        collected = await collect(
            files,
            task_id=a.task_id,
            token=a.token,
            output_dir=self.output_dir,
            logs=logs,
            abort=self._abort,
        )
        self.unstored = ""
        return collected

    async def _supervise(self, child: _ChildProtocol, pgid: int) -> str | None:
        """Wait for exit, interrupt or timeout; end the group; None when the child exited by itself."""
        interrupt = asyncio.create_task(self._interrupt.wait())
        try:
            done, _ = await asyncio.wait(
                {child.exited, interrupt}, timeout=self.assignment.timeout_seconds, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            interrupt.cancel()
        if child.exited in done:
            reason = None
        else:
            reason = self._stop_reason if interrupt in done else "timeout"
            await self._terminate(child, pgid)
        # The main process is gone; anything it left in its group has no run to belong to.
        _killpg(pgid, signal.SIGKILL)
        await self._end_escapees(pgid)
        _, pending = await asyncio.wait({child.pipes_closed}, timeout=PIPE_DRAIN_SECONDS)
        if pending:
            logger.warning("task %s: output pipes still open after exit; closing them", self.task_id)
        return reason

    async def _end_escapees(self, pgid: int) -> None:
        """End what left the run's group (``setsid``) and still runs with its environment; its
        sidecars, in groups of their own, are stopped apart. In a thread: it waits out a grace."""
        sidecar_groups = {
            companion.process.pid
            for companion in self._companions
            if isinstance(companion, Sidecar) and companion.process is not None
        }
        await asyncio.to_thread(
            orphans.end_escapees, self.output_dir, task_id=self.task_id, run_group=pgid, spared_groups=sidecar_groups
        )

    async def _terminate(self, child: _ChildProtocol, pgid: int) -> None:
        if not self._kill_now.is_set():
            _killpg(pgid, signal.SIGTERM)
            kill_now = asyncio.create_task(self._kill_now.wait())
            try:
                await asyncio.wait(
                    {child.exited, kill_now},
                    timeout=self._grace(),
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                kill_now.cancel()
        if not child.exited.done():  # the SIGKILL that ends it is the agent's: its error says so
            self._agent_sigkill = "forced" if self._kill_now.is_set() else "grace"
        _killpg(pgid, signal.SIGKILL)
        _, pending = await asyncio.wait({child.exited}, timeout=KILL_WAIT_SECONDS)
        if pending:
            logger.error("task %s: process %s did not die after SIGKILL", self.task_id, pgid)

    def _grace(self) -> float:
        """Seconds between SIGTERM and SIGKILL: the task's, or a `give_up`'s shorter one."""
        return self._given_up_grace if self._stop_reason == "give_up" else self.assignment.cancel_grace_seconds

    # -- reporting -------------------------------------------------------------------------

    def _final_interrupted(self, *, ending: Ending | None, note: str = "", **extra: Any) -> dict[str, Any] | None:
        """The end of a run the agent ended; `ending` None: its process never started."""
        details: dict[str, Any] = {} if ending is None else {"exit_code": ending.exit_code}
        stdout = _tail(self._tails["stdout"])
        if stdout:
            details["output"] = stdout
        signalled = ending if ending is not None and ending.signalled else None  # then its signal is named
        if self._stop_reason == "stop":
            return None
        if self._stop_reason == "drain":
            error = signalled.after(SERVICE_DRAINED) if signalled else SERVICE_DRAINED
            return self._final("failed", failure_reason="worker_lost", error=error, **details)
        if self._stop_reason == "shutdown":
            error = signalled.after("worker shut down") if signalled else "worker shut down"
            return self._final("failed", failure_reason="worker_lost", error=error, stderr=True, **details)
        if self._stop_reason == "give_up":
            # A signal's ending says the rest itself ("did not stop within its 10 s grace after SIGTERM; ...").
            said = (
                f"worker shut down: the run was sent SIGTERM, then SIGKILL after {self._grace():g} s if still running"
            )
            error = signalled.after("worker shut down") if signalled else said
            return self._final(
                "failed", failure_reason="worker_lost", error=error, stderr=True, note=note, **details, **extra
            )
        return self._final("cancelled", error=signalled.how if signalled else "", note=note, **details, **extra)

    def _timed_out(self, ending: Ending, *, note: str = "", **extra: Any) -> dict[str, Any] | None:
        return self._final(
            "failed",
            exit_code=ending.exit_code,
            failure_reason="timeout",
            error=ending.after(f"timed out after {self.assignment.timeout_seconds:g} s"),
            stderr=True,
            note=note,
            output=_tail(self._tails["stdout"]),
            **extra,
        )

    def _final(
        self, status: str, *, error: str = "", stderr: bool = False, note: str = "", **details: Any
    ) -> dict[str, Any] | None:
        """The final status. Its `error`: `error` (what happened), the stderr tail when `stderr`, then
        `note` and what the log files miss (they are stored with the artifacts: say they are cut)."""
        if self._silenced:
            return None
        notes = [note, *(self._incomplete_logs[fd] for fd in sorted(self._incomplete_logs))]
        text = _error_text(error, _tail(self._tails["stderr"]) if stderr else "", notes)
        if text:
            details["error"] = text
        return protocol.status(task_id=self.task_id, token=self.token, status=status, **details)

    def _status(self, status: str) -> None:
        if not self._silenced:
            self.progress = status
            self._emit(protocol.status(task_id=self.task_id, token=self.token, status=status))

    def _on_line(self, stream: str, line: str) -> None:
        self._tails[stream].append(line)
        if self._silenced:
            return
        self._log_lines.append({"stream": stream, "line": line})
        self._log_bytes += len(line)
        if len(self._log_lines) >= LOG_BATCH_LINES or self._log_bytes >= LOG_BATCH_BYTES:
            self._send_lines(full_only=True)

    def _send_lines(self, *, full_only: bool = False) -> None:
        """Send the lines read, a `log` message of up to LOG_BATCH_LINES (or LOG_BATCH_BYTES) at a
        time, until the agent holds the output back; `full_only`: the last, short batch waits."""
        if self._silenced:
            self._log_lines, self._log_bytes = [], 0
        while self._log_lines and not self.output_held:
            count = size = 0
            for line in self._log_lines:
                count, size = count + 1, size + len(line["line"])
                if count >= LOG_BATCH_LINES or size >= LOG_BATCH_BYTES:
                    break
            else:
                if full_only:
                    return
            lines, self._log_lines = self._log_lines[:count], self._log_lines[count:]
            self._log_bytes -= size
            seq, self._log_seq = self._log_seq, self._log_seq + count
            self._emit(protocol.log(task_id=self.task_id, token=self.token, lines=lines, seq=seq))

    async def _send_remaining_lines(self) -> None:
        """At the run's end every line read goes out, each message still within the agent's window:
        acknowledgements release it, and so do a lost connection, a stop and a forced shutdown."""
        while True:
            self._send_lines()
            if not self._log_lines:
                return
            await self._output_released.wait()

    def _read_pipes_as_paced(self) -> None:
        """Read the child's pipes unless the output is held back. Once the child has exited they are
        read out regardless: what they hold is bounded, and its lines wait their turn in `_log_lines`."""
        transport, child = self._transport, self._child
        if transport is None or child is None or transport.is_closing():
            return
        paused = self.output_held and not child.exited.done()
        for fd in LOG_STREAMS:
            pipe = transport.get_pipe_transport(fd)
            if isinstance(pipe, asyncio.ReadTransport) and not pipe.is_closing():
                if paused:
                    pipe.pause_reading()
                else:
                    pipe.resume_reading()

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(LOG_FLUSH_SECONDS)
            self._send_lines()
