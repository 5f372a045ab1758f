"""Under ASGI an HTTP request's database connections end with the request.

Django's ASGI handler runs each request's synchronous code in a thread of its own (asgiref's
ThreadSensitiveContext), which ends with the request. A persistent connection (CONN_MAX_AGE)
left in it is never used again, yet stays open on the database server until the garbage
collector frees it: measured on daphne, every request opened a PostgreSQL connection and ten
of twenty stayed open, so a busy server would run into `max_connections`. They are closed when
the request finishes instead. The WebSocket consumers' and the scheduler's connections live in
long-lived threads, send no `request_finished`, and stay persistent.
"""

from typing import Any

from asgiref.sync import SyncToAsync
from django.db import connections


def close_request_thread_connections(**kwargs: Any) -> None:
    """`request_finished` receiver: in a request's own thread, close its connections."""
    if SyncToAsync.thread_sensitive_context.get(None) is None:
        return  # not a request of Django's ASGI handler (a test client's, on the test's connection)
    connections.close_all()
