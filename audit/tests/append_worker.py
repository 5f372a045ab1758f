"""A separate process appending to the audit chain, for the concurrency test.

`python -m audit.tests.append_worker COUNT LABEL` with DATABASE_URL naming the
test database: connects, says "ready", waits for a line on stdin (so every
worker starts at once), then appends COUNT events, one transaction each.
"""

import os
import sys


def main() -> None:
    count, label = int(sys.argv[1]), sys.argv[2]
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "fetchml.settings")
    import django

    django.setup()
    from django.db import connection, transaction

    from audit.services import record

    connection.ensure_connection()
    print("ready", flush=True)
    sys.stdin.readline()
    for i in range(count):
        with transaction.atomic():
            record(event_type="file_access", user=label, resource=f"file:{label}/{i}", action="read")
    print("done", flush=True)


if __name__ == "__main__":
    main()
