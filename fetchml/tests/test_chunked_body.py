"""A body sent without Content-Length (chunked) is read whole, through a live daphne."""

import http.client
import json
from collections.abc import Iterator

import pytest
from django.db import connection

from fetchml.testing import LiveServer, database_url_for
from tasks.models import Task

pytestmark = pytest.mark.django_db(transaction=True)


def _post_in_chunks(server: LiveServer, path: str, key: str, chunks: list[bytes]) -> tuple[int, dict]:
    client = http.client.HTTPConnection(server.host, server.port, timeout=15)
    try:
        headers = {"X-API-Key": key, "Content-Type": "application/json", "Transfer-Encoding": "chunked"}
        client.request("POST", path, body=iter(chunks), headers=headers, encode_chunked=True)
        response = client.getresponse()
        return response.status, json.loads(response.read())
    finally:
        client.close()


@pytest.fixture
def server() -> Iterator[LiveServer]:
    # The smallest request limit the setting allows, so that a body can pass it in chunks.
    with LiveServer(database_url=database_url_for(connection), env={"FETCHML_MAX_REQUEST_BYTES": "1024"}) as live:
        yield live


def test_a_chunked_json_body_is_parsed_whole(server, user_client):
    text = json.dumps({"job_name": "chunked", "entrypoint": "true"}).encode()

    status, body = _post_in_chunks(server, "/v1/tasks", user_client.raw_key, [text[:10], text[10:25], text[25:]])

    assert status == 201, body
    assert Task.objects.filter(id=body["id"], job_name="chunked").exists()


def test_a_chunked_body_over_the_limit_is_refused_413(server, user_client):
    text = json.dumps({"job_name": "chunked", "entrypoint": "true", "args": "x" * 2000}).encode()

    status, body = _post_in_chunks(server, "/v1/tasks", user_client.raw_key, [text[:500], text[500:]])

    assert (status, body["code"]) == (413, "BAD_REQUEST")
    assert not Task.objects.exists()
