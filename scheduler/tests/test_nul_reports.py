"""A NUL character in what a worker reports: stored with U+FFFD in its place, never refused by the database.

PostgreSQL text columns cannot hold a NUL; a task printing one would otherwise leave every report
of its run failing (run these on PostgreSQL to see it).
"""

import pytest
from channels.db import database_sync_to_async

from scheduler.dispatch import dispatch_round
from scheduler.models import Worker
from scheduler.tests.factories import UserFactory, queued_task
from scheduler.tests.ws import receive, run, send, start_worker
from tasks.models import Task, TaskLogLine

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("channel_layer", "thread_connections")]

db = database_sync_to_async


async def _assigned(communicator) -> tuple[Task, dict]:
    task = await db(queued_task)(owner=await db(UserFactory)(username="alice"))
    assert await db(dispatch_round)() == 1
    message = await receive(communicator)
    assert message["type"] == "assign", message
    return task, {"task_id": message["task_id"], "token": message["token"]}


def test_log_lines_with_a_nul_are_stored_with_a_replacement_character(worker_key):
    async def scenario() -> tuple[Task, dict]:
        communicator, _ = await start_worker(worker_key, features=["log_ack"])
        task, ref = await _assigned(communicator)
        lines = [{"stream": "stdout", "line": text} for text in ("before", "has\u0000nul", "after")]
        await send(communicator, {"type": "log", **ref, "seq": 0, "lines": lines})
        answer = await receive(communicator)
        await communicator.disconnect()
        return task, answer

    task, answer = run(scenario())

    assert answer["type"] == "log_ack", answer
    stored = TaskLogLine.objects.filter(task=task).order_by("seq").values_list("line", flat=True)
    assert list(stored) == ["before", "has\ufffdnul", "after"]


def test_a_final_status_with_a_nul_in_its_output_and_error_ends_the_task(worker_key):
    async def scenario() -> tuple[Task, dict]:
        communicator, _ = await start_worker(worker_key)
        task, ref = await _assigned(communicator)
        await send(communicator, {"type": "status", **ref, "status": "running"})
        await send(
            communicator,
            {
                "type": "status",
                **ref,
                "status": "failed",
                "exit_code": 1,
                "failure_reason": "exit_code",
                "error": "bad\u0000byte",
                "output": "before\nhas\u0000nul\nafter",
            },
        )
        answer = await receive(communicator)
        await communicator.disconnect()
        return task, answer

    task, answer = run(scenario())

    assert (answer["type"], answer["accepted"]) == ("status_ack", True), answer
    task.refresh_from_db()
    assert (task.status, task.error, task.output) == ("failed", "bad\ufffdbyte", "before\nhas\ufffdnul\nafter")


def test_a_final_status_and_a_log_line_with_a_lone_surrogate_are_stored_replaced(worker_key):
    # JSON may escape half of a surrogate pair (\\ud800); no UTF-8 column can hold it.
    async def scenario() -> tuple[Task, list[dict]]:
        communicator, _ = await start_worker(worker_key, features=["log_ack"])
        task, ref = await _assigned(communicator)
        await send(communicator, {"type": "log", **ref, "seq": 0, "lines": [{"stream": "stderr", "line": "a\ud800b"}]})
        first = await receive(communicator)
        final = {"type": "status", **ref, "status": "failed", "exit_code": 1, "failure_reason": "exit_code"}
        await send(communicator, {**final, "error": "x\udfffy"})
        answers = [first, await receive(communicator)]
        await communicator.disconnect()
        return task, answers

    task, answers = run(scenario())

    assert [answer["type"] for answer in answers] == ["log_ack", "status_ack"], answers
    task.refresh_from_db()
    assert (task.status, task.error) == ("failed", "x\ufffdy")
    assert list(TaskLogLine.objects.filter(task=task).values_list("line", flat=True)) == ["a\ufffdb"]


def test_a_nul_in_a_hello_is_stored_replaced(worker_key):
    async def scenario() -> None:
        communicator, _ = await start_worker(worker_key, gpu_type="A\u0000100")
        await communicator.disconnect()

    run(scenario())

    assert Worker.objects.get().gpu_type == "A\ufffd100"
