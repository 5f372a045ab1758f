"""One scheduler process, or one submitting process, of the PostgreSQL concurrency tests.

Usage: python -m scheduler.tests.dispatch_peer START_AT DEADLINE_SECONDS [submit USERNAME COUNT]
Waits until the wall clock reaches START_AT (so the copies start together),
then runs scheduler passes until no task is queued and prints how many passes
placed work; with `submit`, submits COUNT tasks as USERNAME instead (each
submission runs its own dispatch round while a worker is free) and prints how
many were placed at submission.
"""

import os
import sys
import time

import django


def main() -> int:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "fetchml.settings")
    django.setup()
    from scheduler.loop import SchedulerLoop
    from tasks.models import Task

    start_at, budget = float(sys.argv[1]), float(sys.argv[2])
    while time.time() < start_at:
        time.sleep(0.001)
    if sys.argv[3:4] == ["submit"]:
        return submit(sys.argv[4], int(sys.argv[5]))
    loop = SchedulerLoop()
    deadline = time.monotonic() + budget
    productive = 0
    while time.monotonic() < deadline:
        if loop.run_once():
            productive += 1
        elif not Task.objects.filter(status="queued").exists():
            break
        else:
            time.sleep(0.002)  # another copy holds the workers this instant: poll again
    print(productive)
    return 0


def submit(username: str, count: int) -> int:
    from django.contrib.auth import get_user_model

    from tasks.services import task_submit

    owner = get_user_model().objects.get(username=username)
    tasks = [task_submit(owner=owner, job_name=f"submitted-{i}", entrypoint="true", cpu=2) for i in range(count)]
    print(sum(task.status != "queued" for task in tasks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
