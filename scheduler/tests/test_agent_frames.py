"""How messages are put into frames (`scheduler.agent.protocol.frames` and `frames_of_encoded`, used by the agent and
the server)."""

import json

import pytest

from scheduler.agent import protocol
from scheduler.agent.protocol import MAX_BATCH, MAX_BATCH_CHARACTERS, encode_all, frames, frames_of_encoded


def _logs(count: int, line_length: int) -> list[dict]:
    line = {"stream": "stdout", "line": "x" * line_length}
    return [protocol.log(task_id=f"t{i}", token=f"k{i}", lines=[line], seq=0) for i in range(count)]


def _carried(text: str) -> list[dict]:
    frame = json.loads(text)
    return frame["messages"] if frame["type"] == "batch" else [frame]


def test_without_batches_each_message_has_a_frame_of_its_own():
    messages = _logs(3, 10)

    assert frames(messages, batches=False) == [(protocol.encode(message), 1) for message in messages]


def test_messages_that_fit_travel_in_one_batch_frame_in_order():
    messages = _logs(5, 10)

    [(text, count)] = frames(messages, batches=True)

    assert count == 5
    assert json.loads(text) == {"type": "batch", "version": 1, "messages": messages}


def test_a_lone_message_is_not_wrapped_in_a_batch():
    [message] = _logs(1, 10)

    assert frames([message], batches=True) == [(protocol.encode(message), 1)]


def test_batch_frames_stay_under_the_character_limit_and_keep_the_order():
    messages = _logs(10, MAX_BATCH_CHARACTERS // 4)

    grouped = frames(messages, batches=True)

    assert len(grouped) > 1
    assert all(len(text) <= MAX_BATCH_CHARACTERS + 100 for text, count in grouped if count > 1)
    assert [message for text, _ in grouped for message in _carried(text)] == messages
    assert sum(count for _, count in grouped) == 10


def test_a_message_larger_than_the_limit_travels_alone():
    small, large = _logs(1, 10)[0], _logs(1, MAX_BATCH_CHARACTERS * 2)[0]

    grouped = frames([small, large, small], batches=True)

    assert [count for _, count in grouped] == [1, 1, 1]
    assert json.loads(grouped[1][0]) == large


def test_a_batch_frame_holds_at_most_max_batch_messages():
    grouped = frames(_logs(MAX_BATCH + 1, 1), batches=True)

    assert [count for _, count in grouped] == [MAX_BATCH, 1]


@pytest.mark.parametrize(
    ("count", "line_length", "batches"),
    [
        (1, 10, True),
        (5, 10, True),
        (5, 10, False),
        (10, MAX_BATCH_CHARACTERS // 4, True),
        (MAX_BATCH + 1, 1, True),
    ],
)
def test_messages_given_encoded_travel_in_the_frames_they_would_as_messages(count, line_length, batches):
    messages = _logs(count, line_length)

    grouped = frames_of_encoded(encode_all(messages), count, batches=batches)

    assert [(json.loads(text), carried) for text, carried in grouped] == [
        (json.loads(text), carried) for text, carried in frames(messages, batches=batches)
    ]


def test_messages_given_encoded_that_fit_one_frame_are_wrapped_as_they_are():
    messages = _logs(3, 10)
    listed = encode_all(messages)

    [(text, count)] = frames_of_encoded(listed, 3, batches=True)

    assert count == 3
    assert text == '{"type":"batch","version":1,"messages":' + listed + "}"
