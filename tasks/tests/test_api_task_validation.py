"""POST /v1/tasks refuses every malformed field with a 422 naming it."""

import pytest
from django.test import override_settings

from artifacts.tests.factories import DatasetFactory
from tasks.models import Task

pytestmark = pytest.mark.django_db


def submit(client, **fields):
    return client.post("/v1/tasks", {"job_name": "job", "entrypoint": "python train.py", **fields}, format="json")


def assert_invalid(response, field: str, *, tasks_before: int = 0) -> None:
    assert response.status_code == 422, response.json()
    body = response.json()
    assert body["code"] == "VALIDATION_ERROR"
    fields = [detail["field"] or "" for detail in body["details"]]
    assert any(name == field or name.startswith(f"{field}.") for name in fields), fields
    assert Task.objects.count() == tasks_before


@pytest.mark.parametrize(
    "job_name",
    ["", "has space", "semi;colon", "dot.name", "ünïcode", "x" * 65, "job\n", 42, None, ["a"]],
)
def test_invalid_job_name_is_refused(user_client, job_name):
    assert_invalid(submit(user_client, job_name=job_name), "job_name")


def test_task_without_a_command_is_refused(user_client):
    response = user_client.post("/v1/tasks", {"job_name": "job"}, format="json")
    assert_invalid(response, "entrypoint")
    assert "no command to run" in response.json()["details"][0]["message"]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"entrypoint": 'python -c "print(1)'}, "entrypoint"),
        ({"entrypoint": "python train.py", "args": "--name 'unclosed"}, "args"),
        ({"entrypoint": "python train.py\\"}, "entrypoint"),
    ],
)
def test_command_line_the_worker_could_not_split_is_refused(user_client, fields, field):
    response = submit(user_client, **fields)
    assert_invalid(response, field)
    assert "Cannot be split into words" in response.json()["details"][0]["message"]


def test_command_given_only_in_args_is_accepted(user_client):
    assert submit(user_client, entrypoint="", args="python train.py").status_code == 201


@pytest.mark.parametrize("job_name", ["a", "A-b_c-9", "x" * 64])
def test_valid_job_name_is_accepted(user_client, job_name):
    assert submit(user_client, job_name=job_name).status_code == 201


def test_missing_job_name_is_refused(user_client):
    assert_invalid(user_client.post("/v1/tasks", {"priority": 3}, format="json"), "job_name")


@pytest.mark.parametrize("priority", [0, 11, -1, "5", 5.5, True, None])
def test_priority_outside_1_to_10_or_not_integer_is_refused(user_client, priority):
    assert_invalid(submit(user_client, priority=priority), "priority")


@pytest.mark.parametrize("priority", [1, 10])
def test_priority_bounds_are_accepted(user_client, priority):
    assert submit(user_client, priority=priority).json()["priority"] == priority


@pytest.mark.parametrize("field", ["cpu", "memory_gb", "gpu"])
@pytest.mark.parametrize("value", [-1, 1.5, "2", True, 10**12])
def test_resource_must_be_non_negative_integer(user_client, field, value):
    assert_invalid(submit(user_client, **{field: value}), field)


@pytest.mark.parametrize("field", ["cpu", "memory_gb", "gpu"])
def test_zero_resource_is_accepted(user_client, field):
    assert submit(user_client, **{field: 0}).status_code == 201


@pytest.mark.parametrize("gpu", [None, 0])
def test_a_gpu_type_without_gpus_is_refused(user_client, gpu):
    fields = {"gpu_type": "H100"} if gpu is None else {"gpu_type": "H100", "gpu": gpu}

    assert_invalid(submit(user_client, **fields), "gpu_type")


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "d", "sha256": "A" * 64},
        {"name": "d", "sha256": "a" * 63},
        {"name": "d", "sha256": "g" * 64},
        {"name": "d", "mount_path": "/abs/path"},
        {"name": "d", "mount_path": "data/../../etc"},
        {"name": "d", "mount_path": ".."},
        {"name": "d", "mount_path": "C:\\data"},
        {"source": "s3://bucket/x"},
        {"name": "d", "extra": "x"},
        {"name": 5},
        "mnist",
    ],
)
def test_malformed_dataset_spec_is_refused(user_client, spec):
    assert_invalid(submit(user_client, dataset_specs=[spec]), "dataset_specs")


def test_well_formed_dataset_spec_is_accepted(user_client):
    spec = {"name": "d", "source": "https://data.example/d", "sha256": "0123456789abcdef" * 4, "mount_path": "data/d"}
    assert submit(user_client, dataset_specs=[spec]).json()["dataset_specs"] == [spec]


def test_dataset_the_owner_has_not_uploaded_is_refused_by_name(user_client, user):
    DatasetFactory(owner=user, name="mnist")

    response = submit(user_client, datasets=["mnist", "cifar"])

    assert_invalid(response, "datasets")
    assert "cifar" in response.json()["error"] and "mnist" not in response.json()["error"]


def test_dataset_of_another_user_is_not_the_owners(user_client, other_user):
    DatasetFactory(owner=other_user, name="mnist")

    spec = {"name": "m", "source": "fetchml://datasets/mnist"}

    assert_invalid(submit(user_client, dataset_specs=[spec]), "dataset_specs")


def test_dataset_source_the_worker_cannot_fetch_is_refused(user_client):
    spec = {"name": "d", "source": "s3://bucket/d"}

    response = submit(user_client, dataset_specs=[spec])

    assert_invalid(response, "dataset_specs")
    assert "unsupported source" in response.json()["error"]


def test_two_datasets_mounted_at_the_same_path_are_refused(user_client, user):
    DatasetFactory(owner=user, name="mnist")
    spec = {"name": "other", "source": "https://data.example/other", "mount_path": "datasets/mnist"}

    assert_invalid(submit(user_client, datasets=["mnist"], dataset_specs=[spec]), "dataset_specs")


@pytest.mark.parametrize("metadata", [{"k": 1}, {"k": None}, {"k": ["v"]}, {"": "v"}, {"k" * 129: "v"}, ["k"]])
def test_metadata_must_map_strings_to_strings(user_client, metadata):
    assert_invalid(submit(user_client, metadata=metadata), "metadata")


@pytest.mark.parametrize("env", [{"1BAD": "x"}, {"A-B": "x"}, {"BAD\n": "x"}, {"OK": 3}, "A=1"])
def test_env_must_map_variable_names_to_strings(user_client, env):
    assert_invalid(submit(user_client, env=env), "env")


@pytest.mark.parametrize("node_count", [0, -2, 1025, "2"])
def test_node_count_must_be_at_least_one(user_client, node_count):
    assert_invalid(submit(user_client, node_count=node_count), "node_count")


@pytest.mark.parametrize("max_retries", [-1, 21, "3"])
def test_max_retries_must_be_0_to_20(user_client, max_retries):
    assert_invalid(submit(user_client, max_retries=max_retries), "max_retries")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("retry_on_exit_code", "true"),
        ("allow_unschedulable", 1),
        ("timeout_seconds", 0),
        ("cancel_grace_seconds", -1),
        ("experiment_id", "not-a-uuid"),
        ("reservation_id", "42"),
        ("gpu_type", "x" * 65),
        ("snapshot_id", "x" * 65),
        ("entrypoint", "x" * 4097),
        ("args", 7),
        ("datasets", "mnist"),
        ("datasets", [1]),
    ],
)
def test_ill_typed_or_out_of_range_extension_is_refused(user_client, field, value):
    assert_invalid(submit(user_client, **{field: value}), field)


def test_each_bad_list_item_is_named_by_its_index_from_zero(user_client):
    response = user_client.post(
        "/v1/tasks", {"job_name": "m", "entrypoint": "true", "datasets": [1, "a", 2]}, format="json"
    )

    assert response.status_code == 422, response.content
    assert [detail["field"] for detail in response.json()["details"]] == ["datasets.0", "datasets.2"]
    assert response.json()["error"] == "Validation failed: datasets.0, datasets.2"


@pytest.mark.parametrize(
    "plugin_configs",
    [
        {"tensorboard": {"mode": "embedded"}},
        {"tensorboard": {"enabled": "yes"}},
        {"tensorboard": {"settings": "x"}},
        {"tensorboard": {"colour": "red"}},
        {"bad name": {}},
        {"tensorboard": "on"},
        ["tensorboard"],
    ],
)
def test_plugin_configs_must_match_plugin_config_shape(user_client, plugin_configs):
    assert_invalid(submit(user_client, plugin_configs=plugin_configs), "plugin_configs")


@pytest.mark.parametrize(
    ("plugin_configs", "field"),
    [
        ({"nope": {"enabled": False}}, "plugin_configs.nope"),
        ({"tensorboard": {"image": "evil/tb:1"}}, "plugin_configs.tensorboard.image"),
        ({"tensorboard": {"settings": {"url": "http://elsewhere"}}}, "plugin_configs.tensorboard.settings.url"),
    ],
)
def test_plugin_configs_may_only_change_what_the_plugin_allows(user_client, plugin_configs, field):
    response = submit(user_client, plugin_configs=plugin_configs)
    assert_invalid(response, "plugin_configs")
    assert field in [detail["field"] for detail in response.json()["details"]]


def test_plugin_can_be_turned_off_for_one_task(user_client):
    response = submit(user_client, plugin_configs={"tensorboard": {"enabled": False}})
    assert response.status_code == 201
    assert Task.objects.get().plugin_configs == {"tensorboard": {"enabled": False}}


def test_unknown_field_is_refused_by_name(user_client):
    response = submit(user_client, priorty=3)
    assert_invalid(response, "priorty")
    assert response.json()["details"][0]["message"] == "Unknown field."


def test_body_that_is_not_an_object_is_refused(user_client):
    response = user_client.post("/v1/tasks", ["job"], format="json")
    assert response.status_code == 422


def test_malformed_json_is_bad_request(user_client):
    response = user_client.post("/v1/tasks", "{not json", content_type="application/json")
    assert response.status_code == 400
    assert response.json()["code"] == "BAD_REQUEST"


@override_settings(FETCHML_MAX_LIST_ITEMS=3)
@pytest.mark.parametrize(("field", "item"), [("datasets", "d{}"), ("dataset_specs", {"name": "d{}"})])
def test_lists_longer_than_max_list_items_are_refused(user_client, user, field, item):
    names = [f"d{index}" for index in range(4)]
    for name in names:
        DatasetFactory(owner=user, name=name)
    items = names if field == "datasets" else [{"name": name} for name in names]
    assert submit(user_client, **{field: items[:3]}).status_code == 201
    assert_invalid(submit(user_client, **{field: items}), field, tasks_before=1)


@override_settings(FETCHML_MAX_METADATA_ENTRIES=2)
@pytest.mark.parametrize("field", ["metadata", "env"])
def test_maps_with_more_than_max_metadata_entries_are_refused(user_client, field):
    assert_invalid(submit(user_client, **{field: {"A": "1", "B": "2", "C": "3"}}), field)


def test_metadata_value_longer_than_max_string_length_is_refused(user_client):
    assert_invalid(submit(user_client, metadata={"k": "x" * 4097}), "metadata")
