"""Third-party plugins by dotted path in FETCHML_PLUGINS."""

import re

import pytest
from django.core.checks import run_checks
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from plugins.registry import get_plugins
from plugins.selectors import plugin_env_for_task, plugin_sidecars_for_task
from plugins.tests.conftest import SAMPLE
from plugins.tests.factories import TaskFactory


@override_settings(FETCHML_PLUGINS=[SAMPLE])
def test_third_party_plugin_is_registered_after_the_builtins():
    assert list(get_plugins()) == ["tensorboard", "mlflow", "wandb", "sample"]


@override_settings(FETCHML_PLUGINS=[SAMPLE])
@pytest.mark.django_db
def test_third_party_plugin_is_served_and_configurable(admin_client_key):
    assert admin_client_key.get("/v1/plugins/sample").json()["version"] == "0.3.1"
    body = {"enabled": True, "mode": "remote", "settings": {"url": "http://tracker:9000", "token": "t0k"}}
    response = admin_client_key.put("/v1/plugins/sample/config", body, format="json")
    assert response.status_code == 200
    assert response.json()["config"]["settings"]["token"] == "********"
    task = TaskFactory(plugin_configs={"sample": {"settings": {"level": "debug"}}})
    assert plugin_env_for_task(task) == {
        "SAMPLE_LEVEL": "debug",
        "SAMPLE_DIR": "{output_dir}/sample",
        "SAMPLE_URL": "http://tracker:9000",
    }


@override_settings(FETCHML_PLUGINS=[SAMPLE])
@pytest.mark.django_db
def test_third_party_sidecar_command_carries_the_port_placeholder(admin_client_key):
    admin_client_key.put("/v1/plugins/sample/config", {"enabled": True, "mode": "sidecar"}, format="json")
    [sidecar] = plugin_sidecars_for_task(TaskFactory())
    assert sidecar["command"] == ["sample-server", "--port", "{port}", "--batch", "10"]


@override_settings(FETCHML_PLUGINS=["plugins.tests.sample_plugin.Missing"])
def test_path_that_does_not_import_is_improperly_configured():
    with pytest.raises(ImproperlyConfigured, match=re.escape("cannot import 'plugins.tests.sample_plugin.Missing'")):
        get_plugins()


@override_settings(FETCHML_PLUGINS=["plugins.tests.sample_plugin.NotAPlugin"])
def test_class_that_is_not_a_plugin_is_improperly_configured():
    with pytest.raises(ImproperlyConfigured, match=re.escape("not a subclass of plugins.base.BasePlugin")):
        get_plugins()


@override_settings(FETCHML_PLUGINS=["plugins.builtin.wandb.WandbPlugin"])
def test_two_plugins_with_one_name_are_improperly_configured():
    with pytest.raises(ImproperlyConfigured, match="two plugins are named 'wandb'"):
        get_plugins()


@override_settings(FETCHML_PLUGINS=["no.such.module.Plugin"])
def test_bad_path_is_a_system_check_error():
    errors = [m for m in run_checks() if m.id == "plugins.E001"]
    assert len(errors) == 1
    assert "no.such.module.Plugin" in errors[0].msg


def test_good_configuration_passes_the_system_check():
    assert [m for m in run_checks() if m.id == "plugins.E001"] == []
