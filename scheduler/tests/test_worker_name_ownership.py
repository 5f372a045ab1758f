"""A worker name belongs to the account whose key registered it: a stranger's key cannot take it
over (and with it the runs sent to that worker), another key of the same account can."""

import asyncio
from pathlib import Path

import pytest
from channels.db import database_sync_to_async

from audit.models import AuditEvent
from fetchml.models import ApiKey
from fetchml.tests.factories import ApiKeyFactory, expire_key, revoke_key
from scheduler.agent.client import EXIT_REFUSED, Agent
from scheduler.dispatch import dispatch_round
from scheduler.models import NodeAssignment, Worker
from scheduler.tests.agent_peer import Peer, agent_config, run_async
from scheduler.tests.factories import UserFactory, queued_task
from scheduler.tests.ws import closed_with, connect, expect_nothing, receive, run, send, start_worker

pytestmark = pytest.mark.django_db(transaction=True)

db = database_sync_to_async
OWNED = (4423, "this worker name is registered to another account's key")


def _fleet_key(username: str) -> tuple[ApiKey, str]:
    return ApiKeyFactory.pair(user=UserFactory(username=username), role="worker")


async def _hello_closed_with(raw_key: str, name: str) -> tuple[int, str]:
    communicator = await connect(raw_key)
    await send(communicator, {"type": "hello", "name": name, "capabilities": {}})
    return await closed_with(communicator)


def test_a_key_of_another_account_is_refused_the_name_with_4423():
    owner_key, owner_raw = _fleet_key("fleet-a")
    _, stranger_raw = _fleet_key("fleet-b")

    async def scenario():
        first, _ = await start_worker(owner_raw, name="gpu-b")
        await first.disconnect()
        return await _hello_closed_with(stranger_raw, "gpu-b")

    assert run(scenario()) == OWNED
    assert Worker.objects.get(name="gpu-b").api_key_id == owner_key.id


def test_a_stranger_is_not_sent_the_unacknowledged_runs_of_the_worker():
    _, owner_raw = _fleet_key("fleet-a")
    _, stranger_raw = _fleet_key("fleet-b")

    async def scenario():
        owner, _ = await start_worker(owner_raw, name="gpu-b")
        task = await db(queued_task)(env={"HF_TOKEN": "hf_secret"})
        await db(dispatch_round)()
        assign = await receive(owner)
        await owner.disconnect()  # before its ack, as in a network blip
        stranger = await connect(stranger_raw)
        await send(stranger, {"type": "hello", "name": "gpu-b", "capabilities": {}})
        first = await stranger.receive_output(timeout=5)
        return task, assign, first

    task, assign, first = run(scenario())

    assert assign["type"] == "assign" and assign["task_id"] == str(task.id)
    assert first == {"type": "websocket.close", "code": OWNED[0], "reason": OWNED[1]}
    assert NodeAssignment.objects.get(task_id=task.id).acked_at is None


def test_another_key_of_the_same_account_takes_the_name_over_and_is_audited():
    first_key, first_raw = _fleet_key("fleet-a")
    second_key, second_raw = ApiKeyFactory.pair(user=first_key.user, role="worker")

    async def scenario():
        first, welcome1 = await start_worker(first_raw, name="gpu-b")
        await first.disconnect()
        second, welcome2 = await start_worker(second_raw, name="gpu-b")
        await expect_nothing(second)
        await second.disconnect()
        return welcome1["worker_id"], welcome2["worker_id"]

    first_id, second_id = run(scenario())

    assert first_id == second_id
    assert Worker.objects.get(name="gpu-b").api_key_id == second_key.id
    event = AuditEvent.objects.get(event_type="worker_changed", action="key_changed")
    assert (event.resource, event.metadata) == (
        "worker:gpu-b",
        {"from_key": first_key.prefix, "to_key": second_key.prefix},
    )


@pytest.mark.parametrize("retire", [revoke_key, expire_key], ids=["revoked", "expired"])
def test_any_worker_key_may_take_the_name_once_its_key_is_unusable(retire):
    owner_key, owner_raw = _fleet_key("fleet-a")
    stranger_key, stranger_raw = _fleet_key("fleet-b")

    async def scenario():
        first, _ = await start_worker(owner_raw, name="gpu-b")
        await first.disconnect()
        await db(retire)(owner_key)
        second, welcome = await start_worker(stranger_raw, name="gpu-b")
        await second.disconnect()
        return welcome

    assert run(scenario())["type"] == "welcome"
    assert Worker.objects.get(name="gpu-b").api_key_id == stranger_key.id


def test_an_agent_refused_the_name_stops_and_says_why(tmp_path: Path, caplog) -> None:
    async def scenario() -> tuple[int, int]:
        async with Peer(refuse_hello=OWNED) as peer:
            status = await asyncio.wait_for(Agent(agent_config(peer.url, tmp_path)).run(), 10)
            return status, len(peer.hellos)

    assert run_async(scenario()) == (EXIT_REFUSED, 1)
    assert "the worker name 'test-box' is registered to another account's API key" in caplog.text
    assert "(close code 4423" in caplog.text
