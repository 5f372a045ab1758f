"""No run outlives its agent: runs are tied to the agent's life, and an agent starting in a work
directory first ends what an earlier agent there left running.

An agent that dies without a word (SIGKILL, a crash) loses its runs: after the lease the server
re-queues them as `worker_lost` and starts them elsewhere. Left running, they would do their work
twice, in step with their second copies. Two layers prevent that.

Tethered runs (`tethered`). A run's command is started through a small launcher (`LAUNCHER`,
this interpreter with ``-I -S``) that, in the run's own process and before it execs the command:

* asks Linux to SIGKILL it when the agent dies (``PR_SET_PDEATHSIG``). The process sets this on
  itself after the exec of the launcher, so no ``preexec_fn`` runs between fork and exec in an
  agent that has threads. It survives the exec of the command. It is tied to the agent's thread
  that forked (asyncio's event loop thread), which lives as long as the agent;
* leaves a watchdog in the run's process group: a process blocked reading the agent's lifeline, a
  pipe whose write end only the agent holds. However the agent ends, the read returns end of file
  and the watchdog SIGKILLs the whole group, grandchildren included, itself with it. It is
  detached from the command (not its child), ignores SIGTERM and SIGINT (so that a cancel's grace
  period is covered too) and dies with the group when the run ends (the runner kills what is left
  in the group once the main process has exited).

Elsewhere than Linux the watchdog alone does it. A descendant that leaves the process group
(``setsid``) escapes both; a container a run started is not in its group either. A run's plugin
sidecars, in groups of their own, are started through the same launcher: each is tethered too.

Escapees (`end_escapees`). When a run has ended and its process group was killed, the runner
ends what left the group while the agent lives: on Linux, every process of this user whose
environment has the run's own ``FETCHML_OUTPUT_DIR``, but for the run's sidecars (stopped apart),
is sent SIGTERM, then SIGKILL after a short grace, each logged. A descendant that also changed
that variable, and a container, still escape. Elsewhere (no /proc) escapees outlive their run.

Exec failures (`ExecReport`). The launcher's exec of the command can fail (a ``#!`` naming a
missing interpreter, a file that is no program): it tells the agent why on a pipe it closes by
that exec, so that the run reports it could not start instead of the launcher's exit status.

Swept leftovers (`claimed`, `sweep`). Before an agent says hello it ends the processes still
running from an earlier agent in its work directory: on Linux, every process of this user whose
environment has ``FETCHML_OUTPUT_DIR`` (set by the runner, after the task's own variables) inside
the work directory. The environment is read from the live process, so a reused process id is
never taken for a run. Each one's process group is sent SIGTERM, then SIGKILL after a short grace.
Several agents may share a work directory (the default is one per user): each holds a shared
lock on it for its life, and only an agent that finds no other one holding it sweeps.

Left directories. The same agent, still alone in the work directory, then removes the run
directories those runs left (`artifacts.remove_unfinished`): all but those an agent kept on
purpose, which carry a marker.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from scheduler.agent.artifacts import remove_unfinished

logger = logging.getLogger(__name__)

LOCK_NAME = ".agent.lock"  # in the work directory; a task id cannot start with a dot
OUTPUT_DIR_VARIABLE = b"FETCHML_OUTPUT_DIR="
TASK_ID_VARIABLE = b"FETCHML_TASK_ID="
SWEEP_GRACE_SECONDS = 5.0
# A run has ended: what escaped its process group gets a short grace, which delays its report.
ESCAPEE_GRACE_SECONDS = 2.0
KILL_WAIT_SECONDS = 5.0
POLL_SECONDS = 0.02
PROC = Path("/proc")

# argv: lifeline fd, exec report fd ("-" for none), agent pid, the command's executable, its
# LC_CTYPE ("-" for none, else "=" and the value), then the command's argv. Python sets LC_CTYPE
# when it coerces the C locale (PEP 538): it is put back, so that the command gets the environment
# it was given. A failed exec is told on the exec report (`ExecReport`): "<errno> <strerror>".
LAUNCHER = """\
import os, signal, sys
lifeline, agent, program, ctype = int(sys.argv[1]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
report = None if sys.argv[2] == "-" else int(sys.argv[2])
argv = sys.argv[6:]
if ctype == "-":
    os.environ.pop("LC_CTYPE", None)
else:
    os.environ["LC_CTYPE"] = ctype[1:]
if sys.platform.startswith("linux"):
    import ctypes
    if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0) != 0:  # PR_SET_PDEATHSIG
        sys.stderr.write("fetchml: this run may outlive its agent: prctl failed\\n")
if os.getppid() != agent:
    os._exit(1)  # the agent died before this process was tied to it
try:
    middle = os.fork()
except OSError as exc:
    sys.stderr.write(f"fetchml: this run has no watchdog: {exc}\\n")
else:
    if middle == 0:
        try:
            if report is not None:
                os.close(report)  # the agent reads it to end of file: only the command may hold it
            if os.fork() == 0:
                for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    signal.signal(number, signal.SIG_IGN)
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(null, fd)
                os.chdir("/")
                while os.read(lifeline, 1):
                    pass
                os.killpg(0, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(middle, 0)
os.close(lifeline)
if report is not None:
    os.set_inheritable(report, False)  # closed by a successful exec: the agent reads end of file
try:
    os.execv(program, argv)
except OSError as exc:
    if report is None:
        sys.stderr.write(f"cannot start {argv[0]!r}: {exc}\\n")
        sys.stderr.flush()
    else:
        os.write(report, f"{exc.errno} {exc.strerror}".encode())
    os._exit(127)
"""

_lifeline: tuple[int, int] | None = None
_lifeline_lock = threading.Lock()
_said: set[str] = set()


def _say_once(key: str, message: str, *args: object) -> None:
    if key not in _said:
        _said.add(key)
        logger.warning(message, *args)


def tethered(
    argv: list[str], *, cwd: Path, env: Mapping[str, str], exec_report: ExecReport | None = None
) -> tuple[list[str], tuple[int, ...]]:
    """The command line that runs `argv` tied to this agent, and the descriptors to pass to it.

    The executable is looked up here as ``execvp`` would look it up in the child (`env`'s PATH,
    relative to `cwd`), so a command that cannot start raises the `OSError` starting it directly
    would raise. Its exec can still fail in the launcher (a ``#!`` naming a missing interpreter):
    that is told on `exec_report`, when given, instead of being the command's exit status 127."""
    program = _executable(argv[0], cwd=cwd, env=env)
    if not sys.executable:
        _say_once("no-python", "no Python interpreter to launch runs with: runs may outlive this agent")
        return [program, *argv[1:]], ()
    if not sys.platform.startswith("linux"):
        _say_once(
            "no-pdeathsig", "no parent-death signal on %s: a watchdog alone ends runs with this agent", sys.platform
        )
    ctype = "-" if "LC_CTYPE" not in env else "=" + env["LC_CTYPE"]
    lifeline = _lifeline_read_end()
    passed = (lifeline,) if exec_report is None else (lifeline, exec_report.write_end)
    report = "-" if exec_report is None else str(exec_report.write_end)
    command = [sys.executable, "-I", "-S", "-c", LAUNCHER, str(lifeline), report, str(os.getpid()), program, ctype]
    return [*command, *argv], passed


class ExecReport:
    """A pipe on which the launcher tells why the exec of a run's command failed.

    Its write end is passed to the launcher, which makes it close-on-exec just before the exec:
    the agent reads end of file with nothing when the exec happened (or the launcher ended before
    trying), "<errno> <strerror>" when it failed. Both ends are this process's to close: `close`
    (or the ``with`` block's end) closes whatever is still open."""

    def __init__(self) -> None:
        self.read_end, self.write_end = os.pipe()  # close-on-exec, so no other child inherits them

    def __enter__(self) -> ExecReport:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        for name in ("read_end", "write_end"):
            fd = getattr(self, name)
            if fd >= 0:
                setattr(self, name, -1)
                os.close(fd)

    async def failure(self) -> OSError | None:
        """Once the child holding the write end has started: why its exec failed, or None when it
        happened. Reads without blocking the event loop."""
        os.close(self.write_end)  # only the child's copy is left: its exec or its end closes it
        self.write_end = -1
        os.set_blocking(self.read_end, False)
        loop = asyncio.get_running_loop()
        said = bytearray()
        ended: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            try:
                data = os.read(self.read_end, 4096)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            said.extend(data)
            if not data and not ended.done():
                ended.set_result(None)

        loop.add_reader(self.read_end, readable)
        try:
            await ended
        finally:
            loop.remove_reader(self.read_end)
        if not said:
            return None
        number, _, strerror = said.decode("utf-8", "replace").partition(" ")
        return OSError(int(number) if number.isdigit() else errno.EIO, strerror or "exec failed")


def _lifeline_read_end() -> int:
    """This process's lifeline: its write end is never written nor closed, and not inherited
    (both ends are close-on-exec), so its readers see end of file only once this process is gone."""
    global _lifeline
    with _lifeline_lock:
        if _lifeline is None:
            _lifeline = os.pipe()
        return _lifeline[0]


def _executable(program: str, *, cwd: Path, env: Mapping[str, str]) -> str:
    """Where `program` is, as ``execvp`` would find it; else the error that says why it cannot run:
    a file that is not executable, a directory (a bare word naming one of `cwd` included: the user
    meant that), or nothing found."""
    if os.sep in program:
        candidates = [os.path.join(cwd, program)]
    else:
        candidates = [os.path.join(cwd, directory, program) for directory in os.get_exec_path(dict(env))]
    denied = False
    for candidate in candidates:
        if os.path.isfile(candidate):
            if os.access(candidate, os.X_OK):
                return os.path.abspath(candidate)
            denied = True
    if denied:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), program)
    if any(map(os.path.isdir, [*candidates, os.path.join(cwd, program)])):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), program)
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)


# -- the sweep -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Process:
    pid: int
    pgid: int
    started: int  # clock ticks after boot: with the pid, it names one process for good


@dataclass(frozen=True)
class Leftover:
    process: Process
    task_id: str


def wait_for_other_agents(work_root: Path, *, keep_waiting: Callable[[], bool], every: float = 1.0) -> bool:
    """Wait until no other agent uses `work_root` (an agent left running by a `serve` that was
    killed, finishing and reporting its runs before it exits), looking every `every` seconds while
    `keep_waiting()`; whether none does now."""
    work_root.mkdir(parents=True, exist_ok=True)
    fd = os.open(work_root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    told = False
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not keep_waiting():
                    return False
                if not told:
                    logger.warning(
                        "another agent still runs in %s (left by an earlier serve, finishing and reporting its "
                        "runs): this one starts once it has exited",
                        work_root,
                    )
                    told = True
                time.sleep(every)
            else:
                return True  # released when `fd` closes, for `claimed` to take
    finally:
        os.close(fd)


@contextlib.contextmanager
def claimed(work_root: Path) -> Iterator[None]:
    """Use `work_root` for as long as the block runs; first, unless another live agent uses it,
    end the runs an earlier agent left running there (`sweep`) and remove their directories."""
    work_root.mkdir(parents=True, exist_ok=True)
    fd = os.open(work_root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("another agent is running in %s: its runs are left alone", work_root)
        except OSError as exc:
            logger.warning("cannot lock %s (%s): runs an earlier agent left there are not looked for", work_root, exc)
        else:
            sweep(work_root)
            remove_unfinished(work_root)  # its runs' processes are gone: their directories go too
        with contextlib.suppress(OSError):  # waits while another agent sweeps
            fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def sweep(work_root: Path, *, grace: float = SWEEP_GRACE_SECONDS) -> list[Leftover]:
    """SIGTERM, then after `grace` SIGKILL, the process group of every process left running from a
    run in `work_root`; returns once they are gone (or after a bounded wait), with what it found."""
    if not (PROC / "self" / "environ").exists():
        logger.info("cannot look for runs left in %s on this platform (no /proc)", work_root)
        return []
    found = leftovers(work_root)
    if not found:
        return []
    for leftover in found:
        logger.warning(
            "killing task %s (pid %s, process group %s): left running in %s by an earlier agent",
            leftover.task_id,
            leftover.process.pid,
            leftover.process.pgid,
            work_root,
        )
    if not _end(found, lambda: leftovers(work_root), grace=grace):
        logger.error("processes left in %s did not die after SIGKILL", work_root)
    return found


def end_escapees(
    output_dir: Path,
    *,
    task_id: str,
    run_group: int,
    spared_groups: Collection[int],
    grace: float = ESCAPEE_GRACE_SECONDS,
) -> list[Leftover]:
    """SIGTERM, then after `grace` SIGKILL, the processes still running from the run whose output
    directory is `output_dir` once its process group `run_group` was killed: those that left the
    group. The groups `spared_groups` (the run's sidecars, stopped apart) are left alone. Blocks
    until they are gone (or a bounded wait): call it in a thread. Returns what it found."""
    if not (PROC / "self" / "environ").exists():
        return []  # no /proc: escapees outlive their run (module docstring)
    names = {str(output_dir), os.path.realpath(output_dir)}
    excluded = {run_group, *spared_groups}

    def escapees() -> list[Leftover]:
        return [leftover for leftover in _runs(names.__contains__) if leftover.process.pgid not in excluded]

    found = escapees()
    for leftover in found:
        logger.warning(
            "task %s: killing process %s (process group %s): it left the run's process group and outlived the run",
            task_id,
            leftover.process.pid,
            leftover.process.pgid,
        )
    if found and not _end(found, escapees, grace=grace):
        logger.error("task %s: processes that left its process group did not die after SIGKILL", task_id)
    return found


def leftovers(work_root: Path) -> list[Leftover]:
    """Processes of this user, other than this one and its process group, whose environment puts
    their run's output directory inside `work_root`."""
    roots = {os.path.join(str(work_root), ""), os.path.join(os.path.realpath(work_root), "")}
    return _runs(lambda output_dir: any(output_dir.startswith(root) for root in roots))


def _runs(output_dir_matches: Callable[[str], bool]) -> list[Leftover]:
    """Processes of this user, other than this one and its process group, whose environment has
    a run's output directory that `output_dir_matches`."""
    me, my_group = os.getpid(), os.getpgrp()
    found = []
    for pid in _own_pids():
        run = _run_of(pid) if pid != me else None
        if run is None or not output_dir_matches(run[0]):
            continue
        process = _stat(pid)
        if process is not None and process.pgid != my_group:
            found.append(Leftover(process, run[1]))
    return found


def _end(found: list[Leftover], look_again: Callable[[], list[Leftover]], *, grace: float) -> bool:
    """SIGTERM `found` (`_signal`), SIGKILL after `grace` what `look_again` finds then and what is
    still alive; False when they did not all die after the SIGKILL."""
    members = _signal(found, signal.SIGTERM)
    _wait_until(lambda: not any(map(_alive, members)), grace)
    # Looked for again: what was started meanwhile, and only processes as they are now.
    remaining = look_again()
    still = [process for process in members if _alive(process)]
    if remaining or still:
        members = _signal(remaining, signal.SIGKILL) | _signal_groups({p.pgid for p in still}, signal.SIGKILL)
        return _wait_until(lambda: not any(map(_alive, members)), KILL_WAIT_SECONDS)
    return True


def _signal(found: Iterable[Leftover], signum: signal.Signals) -> set[Process]:
    """Signal the groups of `found`, or only the processes themselves in a group led by a process
    that is not a run's (left there by hand, say); the processes signalled."""
    found = list(found)
    pids = {leftover.process.pid for leftover in found}
    whole = {leftover.process.pgid for leftover in found}
    whole = {pgid for pgid in whole if pgid in pids or _stat(pgid) is None}
    alone = [leftover.process for leftover in found if leftover.process.pgid not in whole]
    for process in alone:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(process.pid, signum)
    return set(alone) | _signal_groups(whole, signum)


def _signal_groups(pgids: set[int], signum: signal.Signals) -> set[Process]:
    members = {process for process in map(_stat, _own_pids()) if process is not None and process.pgid in pgids}
    for pgid in pgids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signum)
    return members


def _own_pids() -> list[int]:
    uid = os.getuid()
    pids = []
    for entry in os.scandir(PROC):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if entry.stat().st_uid == uid:
                    pids.append(int(entry.name))
    return pids


def _run_of(pid: int) -> tuple[str, str] | None:
    """The output directory and task id (or "?") of the run `pid` belongs to; None for a process
    that is no run's."""
    try:
        environ = (PROC / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:  # gone, or not readable (another user's, a setuid program)
        return None
    output_dir, task_id = "", "?"
    for entry in environ:
        if entry.startswith(OUTPUT_DIR_VARIABLE):
            output_dir = os.fsdecode(entry[len(OUTPUT_DIR_VARIABLE) :])
        elif entry.startswith(TASK_ID_VARIABLE):
            task_id = os.fsdecode(entry[len(TASK_ID_VARIABLE) :])
    return (output_dir, task_id) if output_dir else None


def _stat(pid: int) -> Process | None:
    """`pid` as it is now; None once it has exited (a zombie waiting for its reaper included)."""
    try:
        fields = (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in {"Z", "X"}:
        return None
    return Process(pid=pid, pgid=int(fields[2]), started=int(fields[19]))


def _alive(process: Process) -> bool:
    now = _stat(process.pid)
    return now is not None and now.started == process.started


def _wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    """Poll `condition` (other processes' state, which has no event to wait on) for `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_SECONDS)
    return True
