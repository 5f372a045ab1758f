"""PUT/GET/DELETE of plugin configuration: validation, permissions, masking, audit."""

import json

import pytest

from audit.models import AuditEvent
from plugins.models import PluginConfig
from plugins.schema import MASK, open_secrets

pytestmark = pytest.mark.django_db

WANDB = {"enabled": True, "mode": "remote", "settings": {"api_key": "wandb-secret-123", "project": "vision"}}


def fields(response) -> list[str]:
    return [d["field"] for d in response.json()["details"]]


def test_unknown_setting_is_422_naming_it(admin_client_key):
    body = {"enabled": True, "mode": "remote", "settings": {"api_key": "k", "colour": "red"}}
    response = admin_client_key.put("/v1/plugins/wandb/config", body, format="json")
    assert response.status_code == 422
    assert fields(response) == ["settings.colour"]
    assert "settings.colour" in response.json()["error"]


def test_wrongly_typed_setting_is_422_naming_it(admin_client_key):
    body = {"enabled": True, "mode": "sidecar", "settings": {"reload_interval": "5"}}
    response = admin_client_key.put("/v1/plugins/tensorboard/config", body, format="json")
    assert response.status_code == 422
    assert fields(response) == ["settings.reload_interval"]


def test_boolean_is_not_accepted_as_integer_setting(admin_client_key):
    body = {"enabled": True, "mode": "sidecar", "settings": {"reload_interval": True}}
    response = admin_client_key.put("/v1/plugins/tensorboard/config", body, format="json")
    assert response.status_code == 422
    assert fields(response) == ["settings.reload_interval"]


def test_a_reload_interval_over_a_day_is_422_naming_it(admin_client_key):
    body = {"enabled": True, "mode": "sidecar", "settings": {"reload_interval": 2**63}}
    response = admin_client_key.put("/v1/plugins/tensorboard/config", body, format="json")
    assert response.status_code == 422
    assert response.json()["details"] == [{"field": "settings.reload_interval", "message": "Must be at most 86400."}]


def test_a_reload_interval_out_of_range_is_422_while_the_plugin_is_disabled_too(admin_client_key):
    body = {"enabled": False, "settings": {"reload_interval": 0}}
    response = admin_client_key.put("/v1/plugins/tensorboard/config", body, format="json")
    assert response.status_code == 422
    assert response.json()["details"] == [{"field": "settings.reload_interval", "message": "Must be at least 1."}]
    assert not PluginConfig.objects.filter(name="tensorboard").exists()


@pytest.mark.parametrize(
    ("plugin", "setting", "raw", "message"),
    [
        ("wandb", "api_key", r"a\u0000b", "Null characters are not allowed."),
        ("wandb", "api_key", r"\ud800", "Surrogate characters are not allowed: U+D800."),
        ("mlflow", "experiment_name", r"\udc00", "Surrogate characters are not allowed: U+DC00."),
    ],
)
def test_a_setting_no_database_text_can_hold_is_422_naming_it(admin_client_key, plugin, setting, raw, message):
    body = f'{{"settings": {{"{setting}": "{raw}"}}}}'
    response = admin_client_key.generic("PUT", f"/v1/plugins/{plugin}/config", body, content_type="application/json")
    assert response.status_code == 422, response.content
    assert response.json()["details"] == [{"field": f"settings.{setting}", "message": message}]
    assert not PluginConfig.objects.filter(name=plugin).exists()


def test_a_put_without_a_body_is_400(admin_client_key):
    response = admin_client_key.generic("PUT", "/v1/plugins/mlflow/config", b"", content_type="application/json")
    assert (response.status_code, response.json()["code"]) == (400, "BAD_REQUEST")


def test_mode_outside_the_enum_is_422(admin_client_key):
    response = admin_client_key.put("/v1/plugins/mlflow/config", {"enabled": True, "mode": "cloud"}, format="json")
    assert response.status_code == 422
    assert fields(response) == ["mode"]


def test_mode_the_plugin_does_not_support_is_422(admin_client_key):
    response = admin_client_key.put("/v1/plugins/wandb/config", {**WANDB, "mode": "sidecar"}, format="json")
    assert response.status_code == 422
    assert fields(response) == ["mode"]
    assert "supports: remote" in response.json()["details"][0]["message"]


def test_enabling_in_disabled_mode_is_422(admin_client_key):
    response = admin_client_key.put("/v1/plugins/tensorboard/config", {"enabled": True}, format="json")
    assert response.status_code == 422
    assert fields(response) == ["mode"]


def test_required_setting_of_the_mode_is_enforced(admin_client_key):
    response = admin_client_key.put("/v1/plugins/mlflow/config", {"enabled": True, "mode": "remote"}, format="json")
    assert response.status_code == 422
    assert fields(response) == ["settings.tracking_uri"]


def test_url_setting_must_be_http(admin_client_key):
    body = {"enabled": True, "mode": "remote", "settings": {"tracking_uri": "file:///etc/passwd"}}
    response = admin_client_key.put("/v1/plugins/mlflow/config", body, format="json")
    assert response.status_code == 422
    assert fields(response) == ["settings.tracking_uri"]


def test_unknown_top_level_field_is_422(admin_client_key):
    response = admin_client_key.put("/v1/plugins/wandb/config", {**WANDB, "colour": "red"}, format="json")
    assert response.status_code == 422
    assert fields(response) == ["colour"]


def test_wrongly_typed_enabled_is_422(admin_client_key):
    response = admin_client_key.put("/v1/plugins/wandb/config", {**WANDB, "enabled": "yes"}, format="json")
    assert response.status_code == 422
    assert fields(response) == ["enabled"]


def test_invalid_put_stores_nothing(admin_client_key):
    admin_client_key.put("/v1/plugins/wandb/config", {**WANDB, "settings": {"nope": 1}}, format="json")
    assert not PluginConfig.objects.filter(name="wandb").exists()
    assert not AuditEvent.objects.filter(event_type="plugin_configured").exists()


def test_put_stores_config_and_returns_plugin(admin_client_key, admin_user):
    response = admin_client_key.put("/v1/plugins/wandb/config", WANDB, format="json")
    assert response.status_code == 200
    body = response.json()
    assert (body["name"], body["enabled"], body["mode"], body["version"]) == ("wandb", True, "remote", "1.0.0")
    assert body["changed"] is True
    row = PluginConfig.objects.get(name="wandb")
    assert open_secrets("wandb", row.settings) == {"api_key": "wandb-secret-123", "project": "vision"}
    assert row.updated_by == admin_user


def test_a_secret_is_stored_sealed(admin_client_key):
    admin_client_key.put("/v1/plugins/wandb/config", WANDB, format="json")
    stored = PluginConfig.objects.get(name="wandb").settings
    assert "wandb-secret-123" not in json.dumps(stored)
    assert set(stored["api_key"]) == {"sealed"}
    assert stored["project"] == "vision"


def test_a_secret_sealed_under_another_secret_key_counts_as_unset(admin_client_key, settings, caplog):
    admin_client_key.put("/v1/plugins/wandb/config", WANDB, format="json")
    settings.SECRET_KEY = "another-" + "k" * 50

    opened = open_secrets("wandb", PluginConfig.objects.get(name="wandb").settings)

    assert opened == {"project": "vision"}
    assert "secret api_key cannot be opened" in caplog.text


def test_put_by_user_is_403(user_client):
    response = user_client.put("/v1/plugins/wandb/config", WANDB, format="json")
    assert response.status_code == 403
    assert not PluginConfig.objects.exists()


def test_put_without_key_is_401(anon_client):
    assert anon_client.put("/v1/plugins/wandb/config", WANDB, format="json").status_code == 401


def test_delete_by_user_is_403(user_client):
    assert user_client.delete("/v1/plugins/wandb/config").status_code == 403


def test_delete_without_key_is_401(anon_client):
    assert anon_client.delete("/v1/plugins/wandb/config").status_code == 401


def test_reads_are_open_to_users(user_client):
    assert user_client.get("/v1/plugins").status_code == 200
    assert user_client.get("/v1/plugins/mlflow").status_code == 200
    assert user_client.get("/v1/plugins/mlflow/config").status_code == 200


def test_worker_key_cannot_read_plugins(worker_key):
    from conftest import KeyClient

    assert KeyClient(worker_key).get("/v1/plugins").status_code == 403


def test_unknown_plugin_is_404(admin_client_key):
    assert admin_client_key.get("/v1/plugins/nope").status_code == 404
    assert admin_client_key.get("/v1/plugins/nope/config").status_code == 404
    assert admin_client_key.get("/v1/plugins/nope/health").status_code == 404
    assert admin_client_key.put("/v1/plugins/nope/config", WANDB, format="json").status_code == 404
    assert admin_client_key.delete("/v1/plugins/nope/config").status_code == 404


def test_list_shows_every_builtin_plugin(user_client):
    body = user_client.get("/v1/plugins").json()
    assert [p["name"] for p in body] == ["tensorboard", "mlflow", "wandb"]
    assert all(p["status"]["status"] == "stopped" and p["enabled"] is False for p in body)


def test_secrets_are_masked_on_every_read(admin_client_key, user_client):
    admin_client_key.put("/v1/plugins/wandb/config", WANDB, format="json")
    reads = [
        user_client.get("/v1/plugins/wandb/config").json()["settings"],
        user_client.get("/v1/plugins/wandb").json()["config"]["settings"],
        next(p for p in user_client.get("/v1/plugins").json() if p["name"] == "wandb")["config"]["settings"],
    ]
    for settings in reads:
        assert settings["api_key"] == MASK
        assert settings["project"] == "vision"
    assert "wandb-secret-123" not in user_client.get("/v1/plugins").content.decode()


def test_put_response_masks_secrets(admin_client_key):
    response = admin_client_key.put("/v1/plugins/wandb/config", WANDB, format="json")
    assert response.json()["config"]["settings"]["api_key"] == MASK
    assert "wandb-secret-123" not in response.content.decode()


def test_putting_back_the_mask_keeps_the_stored_secret(admin_client_key):
    admin_client_key.put("/v1/plugins/wandb/config", WANDB, format="json")
    config = admin_client_key.get("/v1/plugins/wandb/config").json()
    config["settings"]["project"] = "audio"
    response = admin_client_key.put("/v1/plugins/wandb/config", config, format="json")
    assert response.status_code == 200
    stored = open_secrets("wandb", PluginConfig.objects.get(name="wandb").settings)
    assert (stored["api_key"], stored["project"]) == ("wandb-secret-123", "audio")


def test_mask_without_a_stored_secret_is_422(admin_client_key):
    body = {"enabled": True, "mode": "remote", "settings": {"api_key": MASK}}
    response = admin_client_key.put("/v1/plugins/wandb/config", body, format="json")
    assert response.status_code == 422
    assert fields(response) == ["settings.api_key"]


def test_put_is_audited_with_a_masked_diff(admin_client_key):
    admin_client_key.put("/v1/plugins/wandb/config", WANDB, format="json")
    new = {"settings": {"api_key": "rotated-456", "project": "audio"}}
    admin_client_key.put("/v1/plugins/wandb/config", new, format="json")
    events = list(AuditEvent.objects.filter(event_type="plugin_configured").order_by("sequence_num"))
    assert [e.action for e in events] == ["configure", "configure"]
    assert events[1].user_id == "root"
    assert events[1].resource == "plugin:wandb"
    assert events[1].metadata == {
        "changes": {},
        "settings": {"api_key": {"from": MASK, "to": MASK}, "project": {"from": "vision", "to": "audio"}},
    }
    assert events[0].metadata["changes"]["enabled"] == {"from": False, "to": True}
    stored = str([e.metadata for e in events])
    assert "wandb-secret-123" not in stored and "rotated-456" not in stored


def test_put_that_changes_nothing_is_not_audited(admin_client_key):
    admin_client_key.put("/v1/plugins/wandb/config", WANDB, format="json")
    response = admin_client_key.put("/v1/plugins/wandb/config", WANDB, format="json")
    assert response.json()["changed"] is False
    assert AuditEvent.objects.filter(event_type="plugin_configured").count() == 1


def test_fields_left_out_keep_their_values(admin_client_key):
    admin_client_key.put("/v1/plugins/wandb/config", WANDB, format="json")
    admin_client_key.put("/v1/plugins/wandb/config", {"image": "wandb/local:0.50"}, format="json")
    row = PluginConfig.objects.get(name="wandb")
    assert (row.enabled, row.mode, row.image) == (True, "remote", "wandb/local:0.50")
    assert open_secrets("wandb", row.settings)["api_key"] == "wandb-secret-123"


def test_delete_disables_and_keeps_settings(admin_client_key):
    admin_client_key.put("/v1/plugins/wandb/config", WANDB, format="json")
    response = admin_client_key.delete("/v1/plugins/wandb/config")
    assert response.status_code == 204
    row = PluginConfig.objects.get(name="wandb")
    assert (row.enabled, row.mode, row.settings["project"]) == (False, "remote", "vision")
    plugin = admin_client_key.get("/v1/plugins/wandb").json()
    assert (plugin["enabled"], plugin["mode"]) == (False, "disabled")
    event = AuditEvent.objects.filter(event_type="plugin_configured").latest("sequence_num")
    assert event.action == "disable"
    assert event.metadata["changes"] == {"enabled": {"from": True, "to": False}}


def test_delete_of_the_plugin_path_is_an_alias(admin_client_key):
    admin_client_key.put("/v1/plugins/wandb/config", WANDB, format="json")
    assert admin_client_key.delete("/v1/plugins/wandb").status_code == 204
    assert PluginConfig.objects.get(name="wandb").enabled is False


def test_requires_restart_is_surfaced(admin_client_key):
    body = {"enabled": True, "mode": "sidecar", "settings": {"log_subdir": "runs/tb"}}
    response = admin_client_key.put("/v1/plugins/tensorboard/config", body, format="json")
    assert response.json()["requires_restart"] is True
    assert response.json()["restart_required"] is True
    wandb = admin_client_key.put("/v1/plugins/wandb/config", WANDB, format="json").json()
    assert (wandb["requires_restart"], wandb["restart_required"]) == (False, False)


def test_settings_schema_is_described_without_secret_defaults(user_client):
    schema = user_client.get("/v1/plugins/wandb").json()["settings_schema"]
    assert schema["api_key"]["secret"] is True
    assert schema["run_mode"]["choices"] == ["online", "offline", "disabled"]
    assert schema["run_mode"]["overridable"] is True


def test_putting_back_what_a_get_shows_is_not_a_change(admin_client_key):
    admin_client_key.put("/v1/plugins/wandb/config", WANDB, format="json")
    shown = admin_client_key.get("/v1/plugins/wandb/config").json()

    response = admin_client_key.put("/v1/plugins/wandb/config", shown, format="json")

    assert response.json()["changed"] is False
    assert AuditEvent.objects.filter(event_type="plugin_configured").count() == 1


def test_putting_back_the_defaults_of_a_never_configured_plugin_is_not_a_change(admin_client_key):
    shown = admin_client_key.get("/v1/plugins/tensorboard/config").json()

    response = admin_client_key.put("/v1/plugins/tensorboard/config", shown, format="json")

    assert response.json()["changed"] is False
    assert not PluginConfig.objects.filter(name="tensorboard").exists()
    assert not AuditEvent.objects.filter(event_type="plugin_configured").exists()


def test_setting_a_value_equal_to_its_default_is_not_a_change(admin_client_key):
    admin_client_key.put("/v1/plugins/wandb/config", WANDB, format="json")

    response = admin_client_key.put(
        "/v1/plugins/wandb/config", {"settings": {**WANDB["settings"], "run_mode": "online"}}, format="json"
    )

    assert response.json()["changed"] is False


def test_delete_of_a_plugin_already_disabled_is_not_audited(admin_client_key):
    admin_client_key.put("/v1/plugins/wandb/config", WANDB, format="json")
    admin_client_key.delete("/v1/plugins/wandb/config")

    response = admin_client_key.delete("/v1/plugins/wandb/config")

    assert response.status_code == 204
    assert [e.action for e in AuditEvent.objects.filter(event_type="plugin_configured")] == ["configure", "disable"]


def test_delete_of_a_never_configured_plugin_is_204_and_stores_nothing(admin_client_key):
    assert admin_client_key.delete("/v1/plugins/mlflow/config").status_code == 204
    assert not PluginConfig.objects.filter(name="mlflow").exists()
    assert not AuditEvent.objects.filter(event_type="plugin_configured").exists()


def test_delete_disables_a_plugin_whose_stored_config_no_longer_validates(admin_client_key):
    # Stored before the plugin dropped a setting: a PUT must fix it, but turning the plugin off must not need that.
    PluginConfig.objects.create(
        name="wandb", enabled=True, mode="remote", settings={"api_key": "k", "retired_setting": 1}
    )

    response = admin_client_key.delete("/v1/plugins/wandb/config")

    assert response.status_code == 204
    assert PluginConfig.objects.get(name="wandb").enabled is False
    event = AuditEvent.objects.get(event_type="plugin_configured")
    assert (event.action, event.metadata["changes"]) == ("disable", {"enabled": {"from": True, "to": False}})
