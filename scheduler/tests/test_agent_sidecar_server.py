"""Plugins in runs, server side: the `assign` carries plugin env and sidecars, `plugin_status` is
stored (fenced by the token), and a configuration change reaches connected workers as `config`."""

import sys

import pytest
from channels.db import database_sync_to_async
from django.test import override_settings

from plugins.base import OUTPUT_DIR, PORT, BasePlugin, ResolvedConfig
from plugins.schema import Setting
from scheduler.agent.protocol import MAX_PLUGIN_ERROR
from scheduler.dispatch import dispatch_round
from scheduler.tests.factories import UserFactory, queued_task
from scheduler.tests.ws import expect_nothing, receive, run, send, start_worker
from tasks.models import Task

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("channel_layer", "thread_connections")]

db = database_sync_to_async
PLUGIN_PATH = "scheduler.tests.test_agent_sidecar_server.HttpSidecarPlugin"


class HttpSidecarPlugin(BasePlugin):
    """A stand-in tracking server: Python's own HTTP server as the sidecar."""

    name = "httpside"
    version = "1.2.0"
    modes = frozenset({"sidecar"})
    settings_schema = {"api_key": Setting(str, secret=True, default="")}

    def task_env(self, config: ResolvedConfig, task) -> dict[str, str]:
        return {"HTTPSIDE_API_KEY": config.settings["api_key"], "HTTPSIDE_DIR": f"{OUTPUT_DIR}/httpside"}

    def sidecar_command(self, config: ResolvedConfig, task) -> list[str] | None:
        return [sys.executable, "-m", "http.server", PORT, "--bind", "127.0.0.1"]


@pytest.fixture(autouse=True)
def sidecar_plugin():
    with override_settings(FETCHML_PLUGINS=[PLUGIN_PATH]):
        yield


def _enable(admin_client_key, **settings) -> None:
    body = {"enabled": True, "mode": "sidecar", "settings": settings}
    response = admin_client_key.put("/v1/plugins/httpside/config", body, format="json")
    assert response.status_code == 200, response.content


async def _assigned(communicator, **fields) -> tuple[Task, dict]:
    task = await db(queued_task)(owner=await db(UserFactory)(), **fields)
    assert await db(dispatch_round)() == 1
    message = await receive(communicator)
    assert message["type"] == "assign", message
    return task, message


def test_assign_carries_the_plugin_env_and_sidecars(worker_key, admin_client_key):
    _enable(admin_client_key, api_key="s3cret")

    async def scenario():
        communicator, _ = await start_worker(worker_key)
        _, message = await _assigned(communicator, env={"MINE": "1"})
        await communicator.disconnect()
        return message

    message = run(scenario())
    assert message["env"] == {"HTTPSIDE_API_KEY": "s3cret", "HTTPSIDE_DIR": "{output_dir}/httpside", "MINE": "1"}
    [sidecar] = message["sidecars"]
    assert sidecar["name"] == "httpside"
    assert sidecar["command"][-4:] == ["http.server", "{port}", "--bind", "127.0.0.1"]
    assert (sidecar["version"], sidecar["health_path"]) == ("1.2.0", "/")


def test_assign_of_a_task_without_plugins_has_no_sidecars(worker_key):
    async def scenario():
        communicator, _ = await start_worker(worker_key)
        _, message = await _assigned(communicator)
        await communicator.disconnect()
        return message

    message = run(scenario())
    assert message["sidecars"] == []
    assert message["service"] is None


def test_plugin_status_report_is_stored_on_the_task(worker_key, admin_client_key):
    _enable(admin_client_key)

    async def scenario():
        communicator, _ = await start_worker(worker_key)
        task, assign = await _assigned(communicator)
        report = {"task_id": assign["task_id"], "token": assign["token"], "name": "httpside"}
        await send(
            communicator, {"type": "plugin_status", **report, "status": "healthy", "url": "http://10.0.0.7:4100"}
        )
        await expect_nothing(communicator)
        await communicator.disconnect()
        return await db(Task.objects.get)(id=task.id)

    task = run(scenario())
    assert task.plugin_status["httpside"]["status"] == "healthy"
    assert task.plugin_status["httpside"]["url"] == "http://10.0.0.7:4100"


def test_unhealthy_plugin_status_is_shown_with_its_reason_on_the_task(worker_key, admin_client_key):
    _enable(admin_client_key)
    reason = "'tensorboard' was not found on this worker (is it installed, and on the agent's PATH?)"

    async def scenario():
        communicator, _ = await start_worker(worker_key)
        task, assign = await _assigned(communicator)
        report = {"task_id": assign["task_id"], "token": assign["token"], "name": "httpside"}
        await send(communicator, {"type": "plugin_status", **report, "status": "unhealthy", "error": reason})
        await expect_nothing(communicator)
        await communicator.disconnect()
        return task

    task = run(scenario())
    shown = admin_client_key.get(f"/v1/tasks/{task.id}").json()["plugin_status"]["httpside"]
    assert (shown["status"], shown["url"], shown["error"]) == ("unhealthy", "", reason)


def test_plugin_status_with_an_overlong_reason_is_refused_and_the_connection_stays(worker_key, admin_client_key):
    _enable(admin_client_key)

    async def scenario():
        communicator, _ = await start_worker(worker_key)
        task, assign = await _assigned(communicator)
        report = {"task_id": assign["task_id"], "token": assign["token"], "name": "httpside", "status": "unhealthy"}
        await send(communicator, {"type": "plugin_status", **report, "error": "x" * (MAX_PLUGIN_ERROR + 1)})
        refused = await receive(communicator)
        await send(communicator, {"type": "heartbeat", "running": []})
        await expect_nothing(communicator)
        await communicator.disconnect()
        return refused, await db(Task.objects.get)(id=task.id)

    refused, task = run(scenario())
    assert (refused["type"], refused["ref_type"]) == ("error", "plugin_status")
    assert "error" in refused["message"]
    assert task.plugin_status == {}


def test_plugin_status_with_a_stale_token_gets_stop_and_is_not_stored(worker_key, admin_client_key):
    _enable(admin_client_key)

    async def scenario():
        communicator, _ = await start_worker(worker_key)
        task, assign = await _assigned(communicator)
        stale = "00000000-0000-4000-8000-000000000000"
        report = {"task_id": assign["task_id"], "token": stale, "name": "httpside", "status": "healthy"}
        await send(communicator, {"type": "plugin_status", **report})
        answer = await receive(communicator)
        await communicator.disconnect()
        return answer, await db(Task.objects.get)(id=task.id)

    answer, task = run(scenario())
    assert (answer["type"], answer["token"]) == ("stop", "00000000-0000-4000-8000-000000000000")
    assert task.plugin_status == {}


def test_plugin_status_the_service_refuses_is_an_error_and_the_connection_stays(worker_key):
    async def scenario():
        communicator, _ = await start_worker(worker_key)
        _, assign = await _assigned(communicator)
        report = {"task_id": assign["task_id"], "token": assign["token"], "name": "no-such-plugin"}
        await send(communicator, {"type": "plugin_status", **report, "status": "healthy"})
        refused = await receive(communicator)
        await send(communicator, {"type": "heartbeat", "running": []})
        await expect_nothing(communicator)
        await communicator.disconnect()
        return refused

    refused = run(scenario())
    assert (refused["type"], refused["code"], refused["ref_type"]) == ("error", "BAD_MESSAGE", "plugin_status")


def test_configuration_change_reaches_the_connected_worker_as_config(worker_key, admin_client_key):
    async def scenario():
        communicator, _ = await start_worker(worker_key)
        await db(_enable)(admin_client_key)
        message = await receive(communicator)
        await communicator.disconnect()
        return message

    message = run(scenario())
    assert (message["type"], message["version"]) == ("config", 1)
    [plugin] = message["plugins"]
    assert (plugin["name"], plugin["enabled"], plugin["mode"]) == ("httpside", True, "sidecar")
    assert "settings" not in plugin
