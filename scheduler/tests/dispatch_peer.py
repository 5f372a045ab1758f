"""One scheduler process of the PostgreSQL concurrency test.

Usage: python -m scheduler.tests.dispatch_peer START_AT DEADLINE_SECONDS
Waits until the wall clock reaches START_AT (so the copies start together),
then runs scheduler passes until no task is queued; prints how many passes
placed work.
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


if __name__ == "__main__":
    sys.exit(main())
