"""Service runs, server side: the `assign` of a Jupyter task carries its service, and the worker's
`service_ready` / `service_activity` reports are applied (fenced by the token)."""

import pytest
from channels.db import database_sync_to_async
from django.utils import timezone

from fetchml.auth import Actor
from jupyter.models import JupyterService
from jupyter.sealing import unseal
from jupyter.services import jupyter_start
from scheduler.dispatch import dispatch_round
from scheduler.tests.factories import UserFactory
from scheduler.tests.ws import expect_nothing, receive, run, send, start_worker

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("channel_layer", "thread_connections", "queued_until_a_round"),
]

db = database_sync_to_async
STALE = "00000000-0000-4000-8000-000000000000"


@db
def _start_service() -> JupyterService:
    owner = UserFactory(username="alice")
    return jupyter_start(actor=Actor(user=owner, role="user"), name="nb", workspace="proj", image="img:1")


async def _assigned(communicator) -> tuple[JupyterService, dict]:
    service = await _start_service()
    assert await db(dispatch_round)() == 1
    message = await receive(communicator)
    assert message["type"] == "assign", message
    return service, message


def test_assign_of_a_jupyter_task_carries_its_service(worker_key):
    async def scenario():
        communicator, _ = await start_worker(worker_key)
        service, message = await _assigned(communicator)
        await communicator.disconnect()
        return service, message

    service, message = run(scenario())
    assert message["kind"] == "service"
    expected = {"type": "jupyter", "service_id": str(service.id), "workspace": "proj", "image": "img:1"}
    assert message["service"] == expected


def test_service_ready_makes_the_service_running_with_its_sealed_token(worker_key):
    async def scenario():
        communicator, _ = await start_worker(worker_key)
        service, assign = await _assigned(communicator)
        ready = {"task_id": assign["task_id"], "token": assign["token"], "url": "http://10.0.0.7:8123/"}
        await send(communicator, {"type": "service_ready", **ready, "service_token": "tok-1"})
        await expect_nothing(communicator)
        await communicator.disconnect()
        return await db(JupyterService.objects.get)(id=service.id)

    service = run(scenario())
    assert (service.status, service.url, unseal(service.token_sealed)) == ("running", "http://10.0.0.7:8123/", "tok-1")


def test_service_ready_with_a_stale_token_gets_stop_and_changes_nothing(worker_key):
    async def scenario():
        communicator, _ = await start_worker(worker_key)
        service, assign = await _assigned(communicator)
        ready = {"task_id": assign["task_id"], "token": STALE, "url": "http://10.0.0.7:8123/"}
        await send(communicator, {"type": "service_ready", **ready, "service_token": "tok-1"})
        answer = await receive(communicator)
        await communicator.disconnect()
        return answer, await db(JupyterService.objects.get)(id=service.id)

    answer, service = run(scenario())
    assert (answer["type"], answer["token"]) == ("stop", STALE)
    assert (service.status, service.token_sealed) == ("starting", "")


def test_service_ready_with_a_bad_url_is_an_error(worker_key):
    async def scenario():
        communicator, _ = await start_worker(worker_key)
        _, assign = await _assigned(communicator)
        ready = {"task_id": assign["task_id"], "token": assign["token"], "url": "file:///etc/passwd"}
        await send(communicator, {"type": "service_ready", **ready, "service_token": "tok-1"})
        answer = await receive(communicator)
        await communicator.disconnect()
        return answer

    answer = run(scenario())
    assert (answer["type"], answer["ref_type"]) == ("error", "service_ready")


def test_service_activity_moves_last_activity_forward(worker_key):
    async def scenario():
        communicator, _ = await start_worker(worker_key)
        service, assign = await _assigned(communicator)
        run_ids = {"task_id": assign["task_id"], "token": assign["token"]}
        await send(communicator, {"type": "service_ready", **run_ids, "url": "http://h:1/", "service_token": "t"})
        refusals = []
        for bad in ("not a time", "2026-13-45T00:00:00Z", "2026-01-02T03:04:05"):
            await send(communicator, {"type": "service_activity", **run_ids, "last_activity": bad})
            refusals.append(await receive(communicator))  # the ready, before them, is applied by now
        ready = await db(JupyterService.objects.get)(id=service.id)
        activity = timezone.now()
        assert activity > ready.last_activity_at
        await send(communicator, {"type": "service_activity", **run_ids, "last_activity": activity.isoformat()})
        await send(communicator, {"type": "service_activity", **run_ids, "last_activity": "not a time"})
        await receive(communicator)  # the activity before it is applied by now
        await communicator.disconnect()
        return refusals, await db(JupyterService.objects.get)(id=service.id), activity

    refusals, service, activity = run(scenario())
    assert service.last_activity_at == activity
    refused = ("error", "BAD_MESSAGE", "service_activity")
    assert [(r["type"], r["code"], r["ref_type"]) for r in refusals] == [refused] * 3
