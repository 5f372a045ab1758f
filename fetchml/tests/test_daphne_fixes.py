"""What daphne puts on the wire: status lines with their reason phrases, close codes with their reasons."""

import http.client

import pytest
from django.db import connection

from fetchml.testing import LiveServer, database_url_for

pytestmark = pytest.mark.django_db(transaction=True)


def test_rate_limited_answer_through_daphne_reads_429_too_many_requests():
    with LiveServer(
        database_url=database_url_for(connection), env={"FETCHML_RATE_LIMIT_AUTH_FAILURES": "1/m"}
    ) as server:
        client = http.client.HTTPConnection(server.host, server.port, timeout=15)
        try:
            answers = []
            for _ in range(2):
                client.request("GET", "/v1/queue", headers={"X-API-Key": "fml_wrong"})
                response = client.getresponse()
                response.read()
                answers.append((response.status, response.reason))
        finally:
            client.close()

    assert answers == [(401, "Unauthorized"), (429, "Too Many Requests")]
