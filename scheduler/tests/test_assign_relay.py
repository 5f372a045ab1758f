"""A dispatch round builds the `assign` messages itself; they cross the channel layer sealed."""

import json
import logging

import pytest
from asgiref.sync import async_to_sync
from django.db import connection
from django.test.utils import CaptureQueriesContext, override_settings

from fetchml import events
from fetchml.auth import Actor
from fetchml.models import ApiKey
from fetchml.sealing import Unsealable
from fetchml.tests.factories import UserFactory
from plugins.services import plugin_configure
from scheduler.assigns import assign_messages, assign_notice
from scheduler.dispatch import dispatch_round
from scheduler.loop import SchedulerLoop
from scheduler.models import NodeAssignment
from scheduler.tests.factories import queued_task, worker
from scheduler.tests.ws import run, start_worker

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("channel_layer", "thread_connections")]

SECRET = "wandb-key-0123456789"


def _listen(layer, worker_id) -> str:
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(events.worker_group(worker_id), channel)
    return channel


def _configure_wandb() -> None:
    admin = Actor(user=UserFactory(is_staff=True), role=ApiKey.Role.ADMIN)
    plugin_configure(name="wandb", actor=admin, enabled=True, mode="remote", settings={"api_key": SECRET})


def test_a_rounds_assigns_cross_the_channel_layer_sealed(channel_layer):
    _configure_wandb()
    box = worker()
    channel = _listen(channel_layer, box.id)
    queued_task()

    assert dispatch_round() == 1

    notice = async_to_sync(channel_layer.receive)(channel)
    assert SECRET not in json.dumps(notice)
    [assign] = events.assigns_of(notice)
    assert assign["env"]["WANDB_API_KEY"] == SECRET


def test_an_assign_notice_sealed_under_another_secret_key_cannot_be_opened(channel_layer):
    with override_settings(SECRET_KEY="another-deployment-" + "x" * 40):
        _, notice = assign_notice("w", [{"type": "assign"}])

    with pytest.raises(Unsealable):
        events.assigns_of(notice)


def test_a_rounds_assigns_equal_those_built_from_the_database(channel_layer):
    _configure_wandb()
    first = worker(name="box-a", hostname="10.0.0.1")
    second = worker(name="box-b", hostname="10.0.0.2")
    channels = {box.id: _listen(channel_layer, box.id) for box in (first, second)}
    queued_task(node_count=2, env={"A": "1"}, entrypoint="python train.py", args="--epochs 3", timeout_seconds=60)

    assert dispatch_round() == 1

    for worker_id, channel in channels.items():
        relayed = events.assigns_of(async_to_sync(channel_layer.receive)(channel))
        ids = list(NodeAssignment.objects.filter(worker_id=worker_id).values_list("id", flat=True))
        assert relayed == assign_messages(assignment_ids=ids, worker_id=worker_id)
        assert relayed[0]["node"]["master_addr"] == "10.0.0.1"


def _round_queries(tasks: int) -> int:
    worker(batch_slots=tasks)
    for _ in range(tasks):
        queued_task()
    with CaptureQueriesContext(connection) as queries:
        assert dispatch_round() == tasks
    return len(queries)


def test_building_a_rounds_assigns_costs_the_same_queries_however_many_tasks():
    _round_queries(1)  # the first round also creates the audit chain's head
    assert _round_queries(8) == _round_queries(2)


@override_settings(FETCHML_ASSIGN_RESEND_SECONDS=0.0)
def test_unacknowledged_assigns_are_sent_again_sealed(channel_layer):
    _configure_wandb()
    box = worker()
    task = queued_task()
    dispatch_round()
    channel = _listen(channel_layer, box.id)

    assert SchedulerLoop()._resend_unacked() == 1

    notice = async_to_sync(channel_layer.receive)(channel)
    assert SECRET not in json.dumps(notice)
    [assign] = events.assigns_of(notice)
    assert (assign["task_id"], assign["env"]["WANDB_API_KEY"]) == (str(task.id), SECRET)


def test_worker_connection_relays_the_assigns_of_a_notice(worker_key, channel_layer):
    async def scenario():
        communicator, welcome = await start_worker(worker_key)
        messages = [{"type": "assign", "version": 1, "task_id": "t-1", "token": "k-1"}]
        await channel_layer.group_send(*_notice(welcome["worker_id"], messages))
        relayed = json.loads(await communicator.receive_from(timeout=5))
        await communicator.disconnect()
        return relayed

    assert run(scenario()) == {"type": "assign", "version": 1, "task_id": "t-1", "token": "k-1"}


def test_worker_connection_relays_the_assigns_of_a_notice_in_one_batch_frame(worker_key, channel_layer):
    messages = [{"type": "assign", "version": 1, "task_id": f"t-{i}", "token": f"k-{i}"} for i in range(3)]

    async def scenario():
        communicator, welcome = await start_worker(worker_key, features=["batch"])
        await channel_layer.group_send(*_notice(welcome["worker_id"], messages))
        relayed = json.loads(await communicator.receive_from(timeout=5))
        await communicator.disconnect()
        return relayed

    assert run(scenario()) == {"type": "batch", "version": 1, "messages": messages}


def test_worker_connection_relays_a_notice_one_frame_per_assign_to_an_agent_without_batches(worker_key, channel_layer):
    messages = [{"type": "assign", "version": 1, "task_id": f"t-{i}", "token": f"k-{i}"} for i in range(3)]

    async def scenario():
        communicator, welcome = await start_worker(worker_key)
        await channel_layer.group_send(*_notice(welcome["worker_id"], messages))
        relayed = [json.loads(await communicator.receive_from(timeout=5)) for _ in messages]
        await communicator.disconnect()
        return relayed

    assert run(scenario()) == messages


def test_notice_that_cannot_be_unsealed_is_logged_and_the_connection_keeps_working(worker_key, channel_layer, caplog):
    async def scenario():
        communicator, welcome = await start_worker(worker_key)
        with override_settings(SECRET_KEY="another-deployment-" + "x" * 40):
            foreign = _notice(welcome["worker_id"], [{"type": "assign", "task_id": "t-0"}])
        await channel_layer.group_send(*foreign)
        await channel_layer.group_send(*_notice(welcome["worker_id"], [{"type": "assign", "task_id": "t-1"}]))
        relayed = json.loads(await communicator.receive_from(timeout=5))
        await communicator.disconnect()
        return relayed

    with caplog.at_level(logging.ERROR, logger="fetchml.scheduler.ws"):
        assert run(scenario())["task_id"] == "t-1"
    assert any("could not be unsealed" in record.getMessage() for record in caplog.records)


def _notice(worker_id, messages) -> tuple[str, dict]:
    [group], message = assign_notice(worker_id, messages)
    return group, message
