"""A body sent without Content-Length (chunked) is read whole, through the real ASGI handler."""

import asyncio
import json

import pytest
from asgiref.testing import ApplicationCommunicator
from django.core.asgi import get_asgi_application

from tasks.models import Task

pytestmark = pytest.mark.django_db(transaction=True)


async def _post_in_chunks(path: str, key: str, chunks: list[bytes]) -> tuple[int, dict]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [
            (b"host", b"testserver"),
            (b"x-api-key", key.encode()),
            (b"content-type", b"application/json"),
            (b"transfer-encoding", b"chunked"),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    communicator = ApplicationCommunicator(get_asgi_application(), scope)
    for index, chunk in enumerate(chunks):
        await communicator.send_input({"type": "http.request", "body": chunk, "more_body": index < len(chunks) - 1})
    start = await communicator.receive_output(10)
    body = b""
    while True:
        message = await communicator.receive_output(10)
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await communicator.wait(10)
    return start["status"], json.loads(body)


def test_a_chunked_json_body_is_parsed_whole(user_client):
    text = json.dumps({"job_name": "chunked", "entrypoint": "true"}).encode()

    status, body = asyncio.run(_post_in_chunks("/v1/tasks", user_client.raw_key, [text[:10], text[10:25], text[25:]]))

    assert status == 201, body
    assert Task.objects.filter(id=body["id"], job_name="chunked").exists()


def test_a_chunked_body_over_the_limit_is_refused_413(user_client, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 100
    text = json.dumps({"job_name": "chunked", "entrypoint": "true", "args": "x" * 200}).encode()

    status, body = asyncio.run(_post_in_chunks("/v1/tasks", user_client.raw_key, [text[:50], text[50:]]))

    assert (status, body["code"]) == (413, "BAD_REQUEST")
