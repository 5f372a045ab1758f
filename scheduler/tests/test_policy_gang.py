"""Multi-node (gang) jobs: all nodes in one round or none, rendezvous details per node, one failing node ends all."""

import asyncio

import pytest
from asgiref.sync import async_to_sync

from fetchml import events
from scheduler.assigns import MASTER_PORT_BASE, MASTER_PORT_SPAN, assign_messages, master_port_for
from scheduler.dispatch import dispatch_round
from scheduler.models import NodeAssignment, Worker
from scheduler.services import assignment_status
from scheduler.tests.factories import assignments_of, queued_task, worker
from tasks.states import TaskStatus

pytestmark = pytest.mark.django_db
RECEIVE_SECONDS = 5


async def _receive_each(layer, channel: str, count: int) -> list[dict]:
    # One event loop for all reads: the Redis layer's receive buffer belongs to a loop.
    async with asyncio.timeout(RECEIVE_SECONDS):
        return [await layer.receive(channel) for _ in range(count)]


def _finish(assignment: NodeAssignment) -> None:
    assignment_status(
        worker_id=assignment.worker_id,
        task_id=str(assignment.task_id),
        token=str(assignment.token),
        status=TaskStatus.COMPLETED,
        exit_code=0,
    )


def test_three_node_job_waits_on_two_free_nodes_and_starts_when_the_third_frees():
    for i in range(3):
        worker(name=f"node-{i}", hostname=f"10.0.0.{i}", gpu_count=2)
    blocker = queued_task(gpu=2)
    assert dispatch_round() == 1  # the blocker takes one whole node
    gang = queued_task(node_count=3, gpu=2)

    assert dispatch_round() == 0
    gang.refresh_from_db()
    assert gang.status == TaskStatus.QUEUED
    assert not NodeAssignment.objects.filter(task=gang).exists()

    [held] = assignments_of(blocker)
    assignment_status(
        worker_id=held.worker_id, task_id=str(blocker.id), token=str(held.token), status=TaskStatus.RUNNING
    )
    _finish(held)

    assert dispatch_round() == 1
    placed = assignments_of(gang)
    assert [a.node_id for a in placed] == [0, 1, 2]
    assert len({a.worker_id for a in placed}) == 3


def test_every_node_gets_its_rank_the_node_count_and_rank_zeros_address():
    boxes = [worker(name=f"node-{i}", hostname=f"10.0.0.{i}", gpu_count=1) for i in range(3)]
    gang = queued_task(node_count=3, gpu=1)
    dispatch_round()
    hosts = {box.id: box.hostname for box in boxes}
    placed = assignments_of(gang)

    nodes = [assign_messages(assignment_ids=[a.id], worker_id=a.worker_id)[0]["node"] for a in placed]

    rank0_host = hosts[placed[0].worker_id]
    assert [(n["rank"], n["count"], n["master_addr"]) for n in nodes] == [(r, 3, rank0_host) for r in range(3)]
    assert {n["master_port"] for n in nodes} == {nodes[0]["master_port"]}


def _master_port_sent(assignment: NodeAssignment) -> int:
    return assign_messages(assignment_ids=[assignment.id], worker_id=assignment.worker_id)[0]["node"]["master_port"]


def test_two_multi_node_tasks_get_their_own_rendezvous_port_the_same_on_every_node_and_every_resend():
    for i in range(4):
        worker(name=f"node-{i}", hostname=f"10.0.0.{i}", gpu_count=1)
    gangs = [queued_task(node_count=2, gpu=1) for _ in range(2)]
    dispatch_round()

    ports = []
    for gang in gangs:
        placed = assignments_of(gang)
        sent = [assign_messages(assignment_ids=[a.id], worker_id=a.worker_id)[0]["node"]["master_port"] for a in placed]
        again = [
            assign_messages(assignment_ids=[a.id], worker_id=a.worker_id)[0]["node"]["master_port"] for a in placed
        ]
        assert len(set(sent + again)) == 1
        ports.append(sent[0])
    assert ports == [master_port_for(gang.id) for gang in gangs]
    assert all(MASTER_PORT_BASE <= port < MASTER_PORT_BASE + MASTER_PORT_SPAN for port in ports)


@pytest.mark.django_db(transaction=True)
def test_one_failing_node_has_the_other_nodes_cancelled_with_their_grace(channel_layer):
    for i in range(3):
        worker(name=f"node-{i}", gpu_count=1)
    gang = queued_task(node_count=3, gpu=1, max_retries=0)
    dispatch_round()
    first, *others = assignments_of(gang)
    assignment_status(worker_id=first.worker_id, task_id=str(gang.id), token=str(first.token), status="running")
    listener = async_to_sync(channel_layer.new_channel)()
    for sibling in others:
        async_to_sync(channel_layer.group_add)(events.worker_group(sibling.worker_id), listener)

    assignment_status(
        worker_id=first.worker_id, task_id=str(gang.id), token=str(first.token), status="failed", exit_code=3
    )

    cancels = async_to_sync(_receive_each)(channel_layer, listener, len(others))
    assert {(cancel["type"], cancel["token"]) for cancel in cancels} == {
        ("worker.cancel", str(s.token)) for s in others
    }
    assert {cancel["reason"] for cancel in cancels} == {f"node {first.node_id} failed"}


@pytest.mark.django_db(transaction=True)
def test_the_owners_clients_are_told_when_a_failed_node_starts_the_gang_ending(channel_layer):
    for i in range(2):
        worker(name=f"node-{i}", gpu_count=1)
    gang = queued_task(node_count=2, gpu=1, max_retries=0)
    dispatch_round()
    first, _ = assignments_of(gang)
    assignment_status(worker_id=first.worker_id, task_id=str(gang.id), token=str(first.token), status="running")
    listener = async_to_sync(channel_layer.new_channel)()
    async_to_sync(channel_layer.group_add)(events.user_group(gang.owner_id), listener)

    assignment_status(
        worker_id=first.worker_id, task_id=str(gang.id), token=str(first.token), status="failed", exit_code=3
    )

    [told] = async_to_sync(_receive_each)(channel_layer, listener, 1)
    assert (told["event"], told["task_id"], told["status"]) == ("task_update", str(gang.id), TaskStatus.RUNNING)


def test_a_gang_with_a_failed_node_fails_with_that_nodes_outcome_once_the_others_have_ended():
    for i in range(3):
        worker(name=f"node-{i}", gpu_count=1)
    gang = queued_task(node_count=3, gpu=1, max_retries=0)
    dispatch_round()
    first, second, third = assignments_of(gang)
    _report(first, "running")
    assignment_status(
        worker_id=first.worker_id, task_id=str(gang.id), token=str(first.token), status="failed", exit_code=3
    )
    _report(second, "cancelled")
    gang.refresh_from_db()
    assert (gang.status, gang.failure_reason) == (TaskStatus.RUNNING, "exit_code")

    _report(third, "completed")

    gang.refresh_from_db()
    assert (gang.status, gang.failure_reason, gang.exit_code) == (TaskStatus.FAILED, "exit_code", 3)
    assert not Worker.objects.filter(used_gpus__gt=0).exists()


def _report(assignment: NodeAssignment, status: str) -> None:
    assignment_status(
        worker_id=assignment.worker_id, task_id=str(assignment.task_id), token=str(assignment.token), status=status
    )


def test_a_gang_is_running_while_one_node_collects_and_the_others_still_run():
    for i in range(2):
        worker(name=f"node-{i}")
    gang = queued_task(node_count=2)
    dispatch_round()
    first, second = assignments_of(gang)
    _report(first, "running")
    _report(second, "running")

    _report(first, "collecting")
    _report(second, "running")  # a report the node sends again (a heartbeat's) is still its own

    gang.refresh_from_db()
    assert gang.status == TaskStatus.RUNNING
    _finish(first)
    _finish(second)
    gang.refresh_from_db()
    assert gang.status == TaskStatus.COMPLETED
