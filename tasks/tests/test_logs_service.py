"""tasks.logs: storing and reading log lines, and the event published for new lines."""

import asyncio

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.db import IntegrityError

from fetchml import events
from fetchml.errors import Invalid
from tasks.logs import MAX_LINE_CHARS, append_lines, log_lines
from tasks.models import TaskLogLine
from tasks.services import task_submit


@pytest.fixture
def task(user):
    return task_submit(owner=user, job_name="train")


def _lines(*texts: str, stream: str = "stdout") -> list[dict]:
    return [{"stream": stream, "line": text} for text in texts]


def test_append_lines_stores_each_line_in_order(task):
    stored = append_lines(task_id=task.id, attempt=1, lines=_lines("a", "b") + _lines("oops", stream="stderr"))

    assert stored == 3
    rows = list(TaskLogLine.objects.filter(task=task).order_by("id").values_list("stream", "line", "attempt"))
    assert rows == [("stdout", "a", 1), ("stdout", "b", 1), ("stderr", "oops", 1)]


def test_append_of_an_empty_batch_stores_nothing(task):
    assert append_lines(task_id=task.id, attempt=1, lines=[]) == 0
    assert not TaskLogLine.objects.exists()


@pytest.mark.parametrize(
    "bad",
    [{"stream": "stdin", "line": "x"}, {"stream": "stdout"}, {"stream": "stdout", "line": 3}, "just a string"],
)
def test_append_rejects_a_malformed_line_and_stores_none_of_the_batch(task, bad):
    with pytest.raises(Invalid):
        append_lines(task_id=task.id, attempt=1, lines=[*_lines("fine"), bad])
    assert not TaskLogLine.objects.exists()


def test_overlong_line_is_truncated(task):
    append_lines(task_id=task.id, attempt=1, lines=_lines("x" * (MAX_LINE_CHARS + 10)))
    assert len(TaskLogLine.objects.get(task=task).line) == MAX_LINE_CHARS


def test_log_lines_tail_returns_the_last_lines_in_order(task):
    append_lines(task_id=task.id, attempt=1, lines=_lines(*[str(n) for n in range(10)]))
    assert [line.line for line in log_lines(task=task, tail=3)] == ["7", "8", "9"]


def test_log_lines_after_id_returns_only_newer_lines(task):
    append_lines(task_id=task.id, attempt=1, lines=_lines("old"))
    last = TaskLogLine.objects.get(task=task).id
    append_lines(task_id=task.id, attempt=2, lines=_lines("new1", "new2"))
    assert [(line.line, line.attempt) for line in log_lines(task=task, after_id=last)] == [("new1", 2), ("new2", 2)]


def test_log_lines_limit_caps_the_result(task):
    append_lines(task_id=task.id, attempt=1, lines=_lines("a", "b", "c"))
    assert [line.line for line in log_lines(task=task, limit=2)] == ["a", "b"]


def test_log_lines_only_returns_lines_of_that_task(task, user):
    other = task_submit(owner=user, job_name="other")
    append_lines(task_id=other.id, attempt=1, lines=_lines("elsewhere"))
    assert log_lines(task=task) == []


@pytest.mark.parametrize("tail", [0, -1, 10_001])
def test_log_lines_rejects_tail_out_of_range(task, tail):
    with pytest.raises(Invalid):
        log_lines(task=task, tail=tail)


@pytest.mark.django_db(transaction=True)
def test_append_publishes_the_new_line_ids_to_the_task_group_after_commit(user):
    task = task_submit(owner=user, job_name="train")
    layer = get_channel_layer()

    async def listen_then_append() -> dict:
        channel = await layer.new_channel("test.")
        await layer.group_add(events.task_group(task.id), channel)
        try:
            await database_sync_to_async(append_lines)(task_id=task.id, attempt=1, lines=_lines("a", "b"))
            async with asyncio.timeout(5):
                return await layer.receive(channel)
        finally:
            await layer.group_discard(events.task_group(task.id), channel)

    message = async_to_sync(listen_then_append)()

    ids = list(TaskLogLine.objects.filter(task=task).order_by("id").values_list("id", flat=True))
    assert message == {"type": "task.log", "task_id": str(task.id), "attempt": 1, "ids": ids}


def test_lines_sent_with_their_place_are_stored_at_it(task):
    append_lines(task_id=task.id, attempt=1, node_id=1, first_seq=200, lines=_lines("a", "b"))

    rows = TaskLogLine.objects.filter(task=task).order_by("id").values_list("node_id", "seq", "line")
    assert list(rows) == [(1, 200, "a"), (1, 201, "b")]


def test_a_batch_sent_again_is_stored_once(task):
    assert append_lines(task_id=task.id, attempt=1, first_seq=0, lines=_lines("a", "b")) == 2

    assert append_lines(task_id=task.id, attempt=1, first_seq=0, lines=_lines("a", "b")) == 0
    assert list(TaskLogLine.objects.filter(task=task).values_list("line", flat=True)) == ["a", "b"]


def test_a_batch_overlapping_stored_lines_stores_only_the_missing_ones(task):
    append_lines(task_id=task.id, attempt=1, first_seq=0, lines=_lines("a", "b"))
    append_lines(task_id=task.id, attempt=1, first_seq=3, lines=_lines("d"))

    assert append_lines(task_id=task.id, attempt=1, first_seq=1, lines=_lines("b", "c", "d", "e")) == 2
    rows = TaskLogLine.objects.filter(task=task).order_by("seq").values_list("seq", "line")
    assert list(rows) == [(0, "a"), (1, "b"), (2, "c"), (3, "d"), (4, "e")]


def test_the_same_place_on_another_node_or_attempt_is_another_line(task):
    append_lines(task_id=task.id, attempt=1, node_id=0, first_seq=0, lines=_lines("rank 0"))
    append_lines(task_id=task.id, attempt=1, node_id=1, first_seq=0, lines=_lines("rank 1"))
    append_lines(task_id=task.id, attempt=2, node_id=0, first_seq=0, lines=_lines("retry"))

    assert sorted(TaskLogLine.objects.filter(task=task).values_list("line", flat=True)) == ["rank 0", "rank 1", "retry"]


def test_the_database_refuses_a_second_line_at_the_same_place(task):
    append_lines(task_id=task.id, attempt=1, first_seq=0, lines=_lines("a"))

    with pytest.raises(IntegrityError):
        TaskLogLine.objects.create(task=task, attempt=1, node_id=0, seq=0, stream="stdout", line="again")
