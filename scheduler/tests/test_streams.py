"""The job stream picks its own job's changes out of its owner's batched task changes."""

import uuid

import pytest
from asgiref.sync import sync_to_async

from fetchml.testing import SSEParser, run_async
from scheduler.api.streams import JobStream
from tasks.services import task_submit

pytestmark = pytest.mark.django_db(transaction=True)


def _change(task_id: str, status: str) -> dict:
    return {"type": "task.event", "event": "task_update", "task_id": task_id, "status": status, "priority": 5}


@run_async
async def test_job_stream_picks_its_own_changes_from_a_batch_of_its_owners_changes(user):
    task = await sync_to_async(task_submit)(owner=user, job_name="mine")
    mine, other = str(task.id), str(uuid.uuid4())
    stream = JobStream(task=task)
    [_ async for _ in stream.start()]
    batch = {
        "type": "task.events",
        "events": [
            _change(other, "running"),
            _change(mine, "running"),
            _change(other, "failed"),
            _change(mine, "completed"),
        ],
    }

    frames = b"".join([frame async for frame in stream.on_message(batch)])

    received = [(item.event, item.data["status"]) for item in SSEParser().feed(frames)]
    assert received == [("status", "running"), ("status", "completed"), ("end", "completed")]
    assert stream.finished
