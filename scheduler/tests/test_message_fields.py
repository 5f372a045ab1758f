"""How the server reads the fields of a worker's message (`scheduler.protocol.parse_frame`)."""

import json
import uuid

import pytest

from scheduler.protocol import BadMessage, parse_frame


def _ack(task_id: str, token: str) -> dict | BadMessage:
    [message] = parse_frame(json.dumps({"type": "ack", "version": 1, "task_id": task_id, "token": token}))
    return message


def test_ids_in_their_canonical_spelling_are_read_as_they_are():
    task_id, token = str(uuid.uuid4()), str(uuid.uuid4())

    assert _ack(task_id, token) == {"type": "ack", "task_id": task_id, "token": token}


@pytest.mark.parametrize("spelling", [str.upper, lambda text: "{" + text + "}", lambda text: text.replace("-", "")])
def test_ids_in_another_spelling_of_a_uuid_are_read_in_the_canonical_one(spelling):
    task_id, token = uuid.uuid4(), uuid.uuid4()

    message = _ack(spelling(str(task_id)), spelling(str(token)))

    assert (message["task_id"], message["token"]) == (str(task_id), str(token))


@pytest.mark.parametrize("value", ["not-a-uuid", "", "0" * 31, str(uuid.uuid4()) + "0"])
def test_an_id_that_is_no_uuid_is_refused(value):
    refused = _ack(value, str(uuid.uuid4()))

    assert isinstance(refused, BadMessage)
    assert "field 'task_id': a UUID is required" in str(refused)
