"""An agent left running by a killed `serve`: the next serve's local agent waits for it to finish and
exit before it connects, and the left agent gives its runs up once it has had no server for long."""

import asyncio
import contextlib
import itertools
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from scheduler.agent import orphans
from scheduler.management.commands.worker import give_up_when_alone

HOLDS_THE_WORK_DIR = """\
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_SH)
print("held", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def _another_agent_in(work_root: Path) -> Iterator[subprocess.Popen]:
    """A process holding `work_root` as an agent does, until the block ends or it is told to exit
    (its stdin closed)."""
    work_root.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDS_THE_WORK_DIR, str(work_root / orphans.LOCK_NAME)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        yield holder
    finally:
        if not holder.stdin.closed:
            holder.stdin.close()
        holder.wait(timeout=10)
        holder.stdout.close()


def test_an_agent_waits_while_another_uses_its_work_directory_and_starts_once_it_exits(tmp_path: Path):
    looks = []
    with _another_agent_in(tmp_path / "work") as other:

        def keep_waiting() -> bool:
            looks.append(1)
            if len(looks) == 3:
                other.stdin.close()  # the other agent exits
                other.wait(timeout=10)
            return True

        assert orphans.wait_for_other_agents(tmp_path / "work", keep_waiting=keep_waiting, every=0.01)
    assert len(looks) == 3


def test_an_agent_whose_parent_goes_while_it_waits_does_not_start(tmp_path: Path):
    with _another_agent_in(tmp_path / "work"):
        assert not orphans.wait_for_other_agents(tmp_path / "work", keep_waiting=lambda: False, every=0.01)


def test_an_agent_with_no_other_in_its_work_directory_starts_at_once(tmp_path: Path):
    assert orphans.wait_for_other_agents(tmp_path / "work", keep_waiting=lambda: False)


class _Agent:
    """Connected or not, reading after reading, as `connected` is looked at; records a shutdown."""

    def __init__(self, connected: list[bool]) -> None:
        self.states = connected
        self.reads = 0
        self.stopped = False

    @property
    def connected(self) -> bool:
        self.reads += 1
        return self.states[self.reads - 1] if self.reads <= len(self.states) else False

    def shutdown(self) -> None:
        self.stopped = True


def _left_alone(agent: _Agent, *, after: int) -> None:
    """Run `give_up_when_alone` on a clock that moves one second a reading."""
    clock = itertools.count()
    asyncio.run(asyncio.wait_for(give_up_when_alone(agent, after=after, every=0, clock=lambda: next(clock)), 10))


def test_a_left_agent_without_a_server_for_long_gives_its_runs_up():
    agent = _Agent([True, False])

    _left_alone(agent, after=3)

    assert agent.stopped
    assert agent.reads == 5  # alone from the second reading, given up three seconds later


def test_a_server_heard_again_starts_the_wait_over():
    agent = _Agent([False, False, True, False])

    _left_alone(agent, after=3)

    assert agent.stopped
    assert agent.reads == 7  # alone again from the fourth reading, not from the first
