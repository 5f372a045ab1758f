"""A PUT applies at once: the next task's env, and a message to every worker connection."""

import asyncio

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from plugins.models import PluginConfig
from plugins.selectors import plugin_env_for_task, plugin_sidecars_for_task
from plugins.services import WORKERS_GROUP
from plugins.tests.factories import TaskFactory

pytestmark = pytest.mark.django_db

MLFLOW_REMOTE = {"enabled": True, "mode": "remote", "settings": {"tracking_uri": "http://mlflow-a:5000"}}


async def _join_workers_group() -> str:
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add(WORKERS_GROUP, channel)
    return channel


async def _receive(channel: str) -> dict:
    return await asyncio.wait_for(get_channel_layer().receive(channel), timeout=5)


async def _leave(channel: str) -> None:
    await get_channel_layer().group_discard(WORKERS_GROUP, channel)


def test_new_task_gets_the_new_config_at_once(admin_client_key):
    admin_client_key.put("/v1/plugins/mlflow/config", MLFLOW_REMOTE, format="json")
    assert plugin_env_for_task(TaskFactory())["MLFLOW_TRACKING_URI"] == "http://mlflow-a:5000"
    body = {"settings": {"tracking_uri": "http://mlflow-b:5000"}}
    admin_client_key.put("/v1/plugins/mlflow/config", body, format="json")
    assert plugin_env_for_task(TaskFactory())["MLFLOW_TRACKING_URI"] == "http://mlflow-b:5000"


def test_disabled_plugin_adds_nothing_to_a_new_task(admin_client_key):
    admin_client_key.put("/v1/plugins/mlflow/config", MLFLOW_REMOTE, format="json")
    admin_client_key.delete("/v1/plugins/mlflow/config")
    assert plugin_env_for_task(TaskFactory()) == {}


def test_put_sends_worker_plugins_message_to_the_workers_group(admin_client_key, django_capture_on_commit_callbacks):
    channel = async_to_sync(_join_workers_group)()
    try:
        with django_capture_on_commit_callbacks(execute=True):
            response = admin_client_key.put("/v1/plugins/mlflow/config", MLFLOW_REMOTE, format="json")
        assert response.status_code == 200
        message = async_to_sync(_receive)(channel)
    finally:
        async_to_sync(_leave)(channel)
    assert message["type"] == "worker.plugins"
    assert message["restart_required"] is True
    [plugin] = message["plugins"]
    assert (plugin["name"], plugin["enabled"], plugin["mode"], plugin["version"]) == ("mlflow", True, "remote", "1.0.0")
    assert "settings" not in plugin


def test_worker_message_is_sent_only_after_commit(admin_client_key, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        admin_client_key.put("/v1/plugins/mlflow/config", MLFLOW_REMOTE, format="json")
    assert len(callbacks) == 1


def test_rejected_put_sends_no_worker_message(admin_client_key, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        admin_client_key.put("/v1/plugins/mlflow/config", {"mode": "cloud"}, format="json")
    assert callbacks == []


def test_sidecar_mode_gives_the_task_its_sidecar(admin_client_key):
    admin_client_key.put("/v1/plugins/tensorboard/config", {"enabled": True, "mode": "sidecar"}, format="json")
    task = TaskFactory()
    assert plugin_env_for_task(task) == {"TENSORBOARD_LOGDIR": "{output_dir}/tb"}
    [sidecar] = plugin_sidecars_for_task(task)
    assert sidecar["name"] == "tensorboard"
    assert sidecar["command"][:3] == ["tensorboard", "--logdir", "{output_dir}/tb"]
    assert "{port}" in sidecar["command"]
    assert sidecar["image"] == "tensorflow/tensorflow:2.16.1"


def test_remote_mode_starts_no_sidecar(admin_client_key):
    admin_client_key.put("/v1/plugins/mlflow/config", MLFLOW_REMOTE, format="json")
    assert plugin_sidecars_for_task(TaskFactory()) == []


def test_wandb_env_carries_the_api_key_for_the_task(admin_client_key):
    body = {"enabled": True, "mode": "remote", "settings": {"api_key": "k-123", "project": "vision"}}
    admin_client_key.put("/v1/plugins/wandb/config", body, format="json")
    env = plugin_env_for_task(TaskFactory())
    assert env["WANDB_API_KEY"] == "k-123"
    assert env["WANDB_BASE_URL"] == "https://api.wandb.ai"
    assert (env["WANDB_MODE"], env["WANDB_PROJECT"]) == ("online", "vision")


def test_delete_sends_the_worker_plugins_message_put_sends(admin_client_key, django_capture_on_commit_callbacks):
    PluginConfig.objects.create(name="mlflow", enabled=True, mode="remote", settings=MLFLOW_REMOTE["settings"])
    channel = async_to_sync(_join_workers_group)()
    try:
        with django_capture_on_commit_callbacks(execute=True):
            assert admin_client_key.delete("/v1/plugins/mlflow/config").status_code == 204
        message = async_to_sync(_receive)(channel)
    finally:
        async_to_sync(_leave)(channel)
    assert message["type"] == "worker.plugins"
    [plugin] = message["plugins"]
    assert (plugin["name"], plugin["enabled"], plugin["mode"]) == ("mlflow", False, "disabled")


def test_delete_that_changes_nothing_sends_no_worker_message(admin_client_key, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        assert admin_client_key.delete("/v1/plugins/mlflow/config").status_code == 204
    assert callbacks == []


def test_a_task_of_the_mlflow_sidecar_may_use_its_file_store_on_mlflow_3(admin_client_key):
    admin_client_key.put("/v1/plugins/mlflow/config", {"enabled": True, "mode": "sidecar"}, format="json")

    env = plugin_env_for_task(TaskFactory())

    assert env["MLFLOW_TRACKING_URI"].startswith("file://")
    assert env["MLFLOW_ALLOW_FILE_STORE"] == "true"
