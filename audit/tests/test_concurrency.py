"""Several processes appending at once leave one linear chain."""

import subprocess
import sys

import pytest

from audit.models import AuditEvent
from audit.tests.processes import REPO_ROOT, child_env
from audit.verification import verify_chain
from fetchml.testing import first_line

PROCESSES = 5
EVENTS_EACH = 10


def _run_workers() -> None:
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "audit.tests.append_worker", str(EVENTS_EACH), f"worker{n}"],
            cwd=REPO_ROOT,
            env=child_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(PROCESSES)
    ]
    try:
        for worker in workers:  # every worker is connected before any starts
            said = first_line(worker.stdout, timeout=60, what="an appending worker").strip()
            assert said == "ready", worker.stderr.read() if worker.poll() is not None else said
        for worker in workers:
            worker.stdin.write("go\n")
            worker.stdin.flush()
        for worker in workers:
            out, err = worker.communicate(timeout=120)
            assert worker.returncode == 0, err
            assert out.strip() == "done"
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()


def _assert_one_linear_chain() -> None:
    events = list(AuditEvent.objects.order_by("sequence_num"))
    assert [e.sequence_num for e in events] == list(range(1, PROCESSES * EVENTS_EACH + 1))
    assert len({e.prev_hash for e in events}) == len(events)  # no two events claim the same parent
    for n in range(PROCESSES):
        mine = [e.resource for e in events if e.user_id == f"worker{n}"]
        assert mine == [f"file:worker{n}/{i}" for i in range(EVENTS_EACH)]
    result = verify_chain()
    assert (result.valid, result.total_events) == (True, PROCESSES * EVENTS_EACH)


@pytest.mark.django_db(transaction=True)
def test_fifty_concurrent_appends_from_separate_processes_leave_one_linear_chain() -> None:
    """Runs on both databases; on PostgreSQL it is the SELECT ... FOR UPDATE of the head that holds."""
    _run_workers()
    _assert_one_linear_chain()
