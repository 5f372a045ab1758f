"""On daphne, an HTTP request's database connection is closed when the request finishes, not left
open in the request's ended thread until the garbage collector frees it."""

import http.client

import pytest
from django.db import connection

from conftest import requires_postgres
from fetchml.testing import LiveServer, database_url_for

pytestmark = [pytest.mark.django_db(transaction=True), requires_postgres]

REQUESTS = 20


def _server_connections(own_pid: int) -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> %s", [own_pid]
        )
        return cursor.fetchone()[0]


def test_requests_leave_no_database_connections_open_behind_them(user_client):
    with LiveServer(database_url=database_url_for(connection)) as server:
        client = http.client.HTTPConnection(server.host, server.port, timeout=15)
        try:
            for _ in range(REQUESTS):
                client.request("GET", "/v1/tasks", headers={"X-API-Key": user_client.raw_key})
                response = client.getresponse()
                response.read()
                assert response.status == 200
        finally:
            client.close()
        connection.ensure_connection()
        left_open = _server_connections(connection.connection.info.backend_pid)

    assert left_open <= 1, f"{left_open} connections of the server stayed open after {REQUESTS} requests"
