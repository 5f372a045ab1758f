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


@pytest.mark.parametrize("value", ["not-a-uuid", "", "0" * 31, str(uuid.uuid4()) + "0", 5, ["x"]])
def test_an_id_that_is_no_uuid_is_refused(value):
    refused = _ack(value, str(uuid.uuid4()))

    assert isinstance(refused, BadMessage)
    assert "field 'task_id': a UUID is required" in str(refused)


_RUN = {"task_id": str(uuid.uuid4()), "token": str(uuid.uuid4())}
_NAMED_VALUES = [
    ("status", {"type": "status", **_RUN}, "status"),
    ("status", {"type": "status", **_RUN, "status": "failed"}, "failure_reason"),
    ("plugin_status", {"type": "plugin_status", **_RUN, "name": "tensorboard"}, "status"),
]


@pytest.mark.parametrize("value", [[], ["running"], {}, {"running": 1}, 1, True])
@pytest.mark.parametrize(("kind", "message", "field"), _NAMED_VALUES)
def test_a_named_value_that_is_not_a_name_is_refused(kind, message, field, value):
    [refused] = parse_frame(json.dumps({"version": 1, **message, field: value}))

    assert isinstance(refused, BadMessage)
    assert (refused.ref_type, str(refused).split(":")[0]) == (kind, f"field '{field}'")


@pytest.mark.parametrize("value", [[], {}, 1, "sleeping"])
def test_a_heartbeat_run_whose_status_is_not_a_run_state_is_refused(value):
    beat = {"type": "heartbeat", "version": 1, "running": [{**_RUN, "status": value}]}

    [refused] = parse_frame(json.dumps(beat))

    assert isinstance(refused, BadMessage)
    assert str(refused).startswith("field 'running.status': one of")


def test_a_missing_id_is_said_to_be_required():
    refused = _ack(None, str(uuid.uuid4()))

    assert str(refused) == "field 'task_id': required"


def test_a_message_without_a_type_is_told_the_type_is_required():
    [refused] = parse_frame(json.dumps({"version": 1}))

    assert (str(refused), refused.code, refused.ref_type) == ("field 'type': required", "UNKNOWN_TYPE", "")
