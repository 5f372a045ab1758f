"""The `assign` message carries everything the agent needs to prepare and run the task."""

import pytest

from scheduler.assigns import assign_messages
from scheduler.dispatch import dispatch_round
from scheduler.tests.factories import assignments_of, queued_task, worker

pytestmark = pytest.mark.django_db


def _assign_of(task) -> dict:
    assert dispatch_round() == 1
    [assignment] = assignments_of(task)
    [message] = assign_messages(assignment_ids=[assignment.id], worker_id=assignment.worker_id)
    return message


def test_assign_message_names_the_tasks_datasets_snapshot_and_command():
    worker()
    specs = [{"name": "imagenet", "checksum": "sha256:" + "ab" * 32}]
    task = queued_task(
        entrypoint="python train.py",
        args="--epochs 3",
        snapshot_id="c0ffee" * 10 + "abcd",
        datasets=["cifar10"],
        dataset_specs=specs,
    )

    message = _assign_of(task)

    assert message["type"] == "assign"
    # Every dataset goes as a spec (server ones pinned to their digest at submission: none recorded here).
    assert message["datasets"] == []
    assert message["dataset_specs"] == [{"name": "cifar10"}, *specs]
    assert message["snapshot_id"] == task.snapshot_id
    assert (message["entrypoint"], message["args"]) == ("python train.py", "--epochs 3")


def test_assign_message_carries_the_fencing_token_of_the_assignment():
    worker()
    task = queued_task()

    message = _assign_of(task)

    [assignment] = assignments_of(task)
    assert message["token"] == str(assignment.token)
    assert message["attempt"] == assignment.attempt


def test_an_acknowledged_assignment_is_not_assigned_again():
    box = worker()
    task = queued_task()
    dispatch_round()
    [assignment] = assignments_of(task)
    assignment.status = assignment.Status.ACKED
    assignment.save(update_fields=["status"])

    assert assign_messages(assignment_ids=[assignment.id], worker_id=box.id) == []


def test_building_an_assign_message_takes_two_queries(django_assert_num_queries):
    worker()
    task = queued_task()
    dispatch_round()
    [assignment] = assignments_of(task)

    # The assignment with its task and worker, then the plugin configurations.
    with django_assert_num_queries(2):
        assign_messages(assignment_ids=[assignment.id], worker_id=assignment.worker_id)


def test_building_a_rounds_assign_messages_takes_two_queries_however_many(django_assert_num_queries):
    box = worker(batch_slots=8)
    for _ in range(8):
        queued_task()
    assert dispatch_round() == 8
    ids = [assignment.id for assignment in box.assignments.all()]

    with django_assert_num_queries(2):
        messages = assign_messages(assignment_ids=ids, worker_id=box.id)

    assert len(messages) == 8
