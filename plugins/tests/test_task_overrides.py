"""A task's plugin_configs apply only within what the admin allows."""

import pytest

from fetchml.errors import Invalid
from plugins.overrides import validate_task_plugin_configs
from plugins.selectors import plugin_env_for_task, plugin_sidecars_for_task
from plugins.tests.factories import TaskFactory
from tasks.models import Task

pytestmark = pytest.mark.django_db

WANDB = {"enabled": True, "mode": "remote", "settings": {"api_key": "admin-key", "project": "shared"}}


@pytest.fixture
def wandb_enabled(admin_client_key) -> None:
    assert admin_client_key.put("/v1/plugins/wandb/config", WANDB, format="json").status_code == 200


def override(**settings) -> dict:
    return {"wandb": {"enabled": True, "mode": "sidecar", "settings": settings}}


def test_task_may_turn_an_enabled_plugin_off(wandb_enabled):
    assert plugin_env_for_task(TaskFactory(plugin_configs={"wandb": {"enabled": False}})) == {}
    assert plugin_env_for_task(TaskFactory(plugin_configs={"wandb": {"mode": "disabled"}})) == {}


def test_task_cannot_enable_a_plugin_the_admin_disabled(db):
    task = TaskFactory(plugin_configs={"tensorboard": {"enabled": True, "mode": "sidecar", "settings": {}}})
    assert plugin_env_for_task(task) == {}
    assert plugin_sidecars_for_task(task) == []


def test_task_may_choose_an_overridable_setting_among_its_choices(wandb_enabled):
    env = plugin_env_for_task(TaskFactory(plugin_configs=override(run_mode="offline", project="mine")))
    assert (env["WANDB_MODE"], env["WANDB_PROJECT"]) == ("offline", "mine")


def test_task_cannot_override_secrets_or_urls(wandb_enabled):
    task = TaskFactory(plugin_configs=override(api_key="stolen", base_url="http://evil.example"))
    env = plugin_env_for_task(task)
    assert env["WANDB_API_KEY"] == "admin-key"
    assert env["WANDB_BASE_URL"] == "https://api.wandb.ai"


def test_task_value_outside_the_choices_is_ignored(wandb_enabled):
    env = plugin_env_for_task(TaskFactory(plugin_configs=override(run_mode="turbo")))
    assert env["WANDB_MODE"] == "online"


def test_task_mode_does_not_change_the_admin_mode(admin_client_key):
    admin_client_key.put("/v1/plugins/mlflow/config", {"enabled": True, "mode": "sidecar"}, format="json")
    task = TaskFactory(plugin_configs={"mlflow": {"enabled": True, "mode": "remote", "settings": {}}})
    assert [s["name"] for s in plugin_sidecars_for_task(task)] == ["mlflow"]


def test_submission_check_names_every_refused_field(wandb_enabled):
    configs = {
        **override(api_key="x", run_mode="turbo"),
        "tensorboard": {"enabled": True, "image": "mine:latest", "settings": {}},
        "ghost": {"enabled": True},
    }
    with pytest.raises(Invalid) as error:
        validate_task_plugin_configs(configs)
    assert sorted(d["field"] for d in error.value.details) == [
        "plugin_configs.ghost",
        "plugin_configs.tensorboard",
        "plugin_configs.tensorboard.image",
        "plugin_configs.wandb.settings.api_key",
        "plugin_configs.wandb.settings.run_mode",
    ]


def test_submission_check_accepts_allowed_overrides(wandb_enabled):
    validate_task_plugin_configs({**override(run_mode="offline"), "mlflow": {"enabled": False}})


def test_refused_override_is_logged_by_name_never_by_value(wandb_enabled, caplog):
    plugin_env_for_task(TaskFactory(plugin_configs=override(api_key="stolen-value")))
    assert "settings.api_key" in caplog.text
    assert "stolen-value" not in caplog.text and "admin-key" not in caplog.text


def test_submission_naming_a_disabled_plugin_is_refused_naming_it(db):
    with pytest.raises(Invalid) as error:
        validate_task_plugin_configs({"mlflow": {"settings": {}}})
    assert [d["field"] for d in error.value.details] == ["plugin_configs.mlflow"]
    assert "disabled by the administrator" in error.value.details[0]["message"]


def test_submission_may_turn_off_a_disabled_plugin(db):
    validate_task_plugin_configs({"mlflow": {"enabled": False}, "tensorboard": {"mode": "disabled"}})


def test_submission_naming_a_plugin_disabled_after_it_was_enabled_is_refused(wandb_enabled, admin_client_key):
    admin_client_key.delete("/v1/plugins/wandb/config")
    with pytest.raises(Invalid):
        validate_task_plugin_configs(override(run_mode="offline"))


def test_task_submission_naming_a_disabled_plugin_is_422_naming_it(user_client):
    body = {"job_name": "j", "entrypoint": "python train.py", "plugin_configs": {"mlflow": {"enabled": True}}}

    response = user_client.post("/v1/tasks", body, format="json")

    assert response.status_code == 422, response.content
    assert response.json()["code"] == "VALIDATION_ERROR"
    assert [d["field"] for d in response.json()["details"]] == ["plugin_configs.mlflow"]
    assert not Task.objects.exists()
