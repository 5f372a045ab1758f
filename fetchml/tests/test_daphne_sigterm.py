"""A daphne process (the production server) told to stop with SIGTERM while it answers requests
exits once their threads are done, instead of waiting forever on a request thread that
hands work back to the event loop daphne has already stopped."""

import contextlib
import json
import signal
import subprocess
import threading
import urllib.error
import urllib.request

import psycopg
import pytest
from django.db import connection
from django.utils.module_loading import import_string

from conftest import requires_postgres
from fetchml.testing import LiveServer, database_url_for
from fetchml.tests.factories import ApiKeyFactory
from scheduler.tests.live_system import wait_until, with_application_name

SERVER_NAME = "fetchml-sigterm-server"
STOP_SECONDS = 20
REQUESTS = 3  # in flight at once


def _submit(url: str, key: str) -> None:
    body = json.dumps({"job_name": "train", "entrypoint": "true"}).encode()
    request = urllib.request.Request(
        f"{url}/v1/tasks", data=body, headers={"X-API-Key": key, "Content-Type": "application/json"}
    )
    # The server may stop before it answers: what matters is that it stops.
    with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
        urllib.request.urlopen(request, timeout=STOP_SECONDS).read()


def _waiting_on_a_lock(database_url: str) -> bool:
    with psycopg.connect(database_url, autocommit=True) as probe:
        query = "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND wait_event_type = 'Lock'"
        return probe.execute(query, [SERVER_NAME]).fetchone()[0] >= REQUESTS


@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_a_sigterm_during_requests_stops_the_server_once_they_are_done(user) -> None:
    key = ApiKeyFactory.raw(user=user, role="user")
    database_url = database_url_for(connection)
    server = LiveServer(database_url=with_application_name(database_url, SERVER_NAME), stop_timeout=STOP_SECONDS)
    with server, psycopg.connect(database_url) as holder:
        holder.execute("LOCK TABLE tasks_task IN ACCESS EXCLUSIVE MODE")  # the submission waits on it
        requests = [threading.Thread(target=_submit, args=(server.url, key)) for _ in range(REQUESTS)]
        for request in requests:
            request.start()
        wait_until(lambda: _waiting_on_a_lock(database_url), what="the submissions to wait on the lock")

        process = server._process
        process.send_signal(signal.SIGTERM)
        holder.rollback()  # the requests' threads go on and end

        try:
            exit_code = process.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            pytest.fail(f"daphne still runs {STOP_SECONDS}s after SIGTERM:\n{server.output()}")
        for request in requests:
            request.join(timeout=STOP_SECONDS)

    assert exit_code == 0


def test_every_middleware_can_be_awaited_so_no_request_thread_waits_on_the_event_loop(settings) -> None:
    # One middleware that is only synchronous makes Django run the stack in a thread that hands
    # the request back to the event loop to reach the view: daphne stopped by SIGTERM meanwhile
    # then never exits (its exit waits for that thread, which waits for the stopped loop).
    only_sync = [path for path in settings.MIDDLEWARE if not getattr(import_string(path), "async_capable", False)]

    assert only_sync == []
