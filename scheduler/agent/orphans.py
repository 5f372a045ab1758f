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
(``setsid``) escapes both; a sidecar or a container a run started is not in its group either.

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

import contextlib
import errno
import fcntl
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from scheduler.agent.artifacts import remove_unfinished

logger = logging.getLogger(__name__)

LOCK_NAME = ".agent.lock"  # in the work directory; a task id cannot start with a dot
OUTPUT_DIR_VARIABLE = b"FETCHML_OUTPUT_DIR="
TASK_ID_VARIABLE = b"FETCHML_TASK_ID="
SWEEP_GRACE_SECONDS = 5.0
KILL_WAIT_SECONDS = 5.0
POLL_SECONDS = 0.02
PROC = Path("/proc")

# argv: lifeline fd, agent pid, the command's executable, its LC_CTYPE ("-" for none, else "="
# and the value), then the command's argv. Python sets LC_CTYPE when it coerces the C locale
# (PEP 538): it is put back, so that the command gets the environment it was given.
LAUNCHER = """\
import os, signal, sys
lifeline, agent, program, ctype = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
argv = sys.argv[5:]
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
try:
    os.execv(program, argv)
except OSError as exc:
    sys.stderr.write(f"cannot start {argv[0]!r}: {exc}\\n")
    sys.stderr.flush()
    os._exit(127)
"""

_lifeline: tuple[int, int] | None = None
_lifeline_lock = threading.Lock()
_said: set[str] = set()


def _say_once(key: str, message: str, *args: object) -> None:
    if key not in _said:
        _said.add(key)
        logger.warning(message, *args)


def tethered(argv: list[str], *, cwd: Path, env: Mapping[str, str]) -> tuple[list[str], tuple[int, ...]]:
    """The command line that runs `argv` tied to this agent, and the descriptors to pass to it.

    The executable is looked up here as ``execvp`` would look it up in the child (`env`'s PATH,
    relative to `cwd`), so a command that cannot start raises the `OSError` starting it directly
    would raise."""
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
    command = [sys.executable, "-I", "-S", "-c", LAUNCHER, str(lifeline), str(os.getpid()), program, ctype, *argv]
    return command, (lifeline,)


def _lifeline_read_end() -> int:
    """This process's lifeline: its write end is never written nor closed, and not inherited
    (both ends are close-on-exec), so its readers see end of file only once this process is gone."""
    global _lifeline
    with _lifeline_lock:
        if _lifeline is None:
            _lifeline = os.pipe()
        return _lifeline[0]


def _executable(program: str, *, cwd: Path, env: Mapping[str, str]) -> str:
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
    code = errno.EACCES if denied else errno.ENOENT
    raise (PermissionError if denied else FileNotFoundError)(code, os.strerror(code), program)


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
    members = _signal(found, signal.SIGTERM)
    _wait_until(lambda: not any(map(_alive, members)), grace)
    # Looked for again: what was started meanwhile, and only processes as they are now.
    remaining = leftovers(work_root)
    still = [process for process in members if _alive(process)]
    if remaining or still:
        members = _signal(remaining, signal.SIGKILL) | _signal_groups({p.pgid for p in still}, signal.SIGKILL)
        if not _wait_until(lambda: not any(map(_alive, members)), KILL_WAIT_SECONDS):
            logger.error("processes left in %s did not die after SIGKILL", work_root)
    return found


def leftovers(work_root: Path) -> list[Leftover]:
    """Processes of this user, other than this one and its process group, whose environment puts
    their run's output directory inside `work_root`."""
    roots = {os.path.join(str(work_root), ""), os.path.join(os.path.realpath(work_root), "")}
    me, my_group = os.getpid(), os.getpgrp()
    found = []
    for pid in _own_pids():
        if pid == me:
            continue
        task_id = _task_of(pid, roots)
        process = _stat(pid) if task_id is not None else None
        if process is not None and task_id is not None and process.pgid != my_group:
            found.append(Leftover(process, task_id))
    return found


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


def _task_of(pid: int, roots: set[str]) -> str | None:
    """The run's task id (or "?") when `pid` belongs to a run under one of `roots`."""
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
    return task_id if any(output_dir.startswith(root) for root in roots) else None


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
