"""The operator console: actions go through the services (state, audit), secrets are shown once."""

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from audit.models import AuditEvent
from conftest import KeyClient
from fetchml import apikeys
from fetchml.clock import api_time
from fetchml.models import ApiKey
from fetchml.tests.factories import ApiKeyFactory
from jupyter.models import JupyterService
from plugins.models import PluginConfig
from plugins.schema import MASK
from scheduler.models import Worker
from tasks.states import TaskStatus
from tasks.tests.factories import (
    ExperimentFactory,
    NodeAssignmentFactory,
    ReservationFactory,
    TaskFactory,
    WorkerFactory,
)

pytestmark = pytest.mark.django_db

TASKS_URL = reverse("admin:tasks_task_changelist")
KEYS_URL = reverse("admin:fetchml_apikey_changelist")


def run_action(console: Client, url: str, action: str, rows, **extra):
    data = {"action": action, "_selected_action": [str(row.pk) for row in rows], **extra}
    response = console.post(url, data, follow=True)
    assert response.status_code == 200
    return [str(message) for message in response.context["messages"]]


def events(event_type: str, resource: str) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(event_type=event_type, resource=resource))


# --- pages -------------------------------------------------------------------


@pytest.mark.parametrize(
    "model",
    [
        "tasks_task",
        "tasks_experiment",
        "scheduler_worker",
        "scheduler_reservation",
        "fetchml_apikey",
        "plugins_pluginconfig",
        "jupyter_jupyterservice",
    ],
)
def test_console_lists_each_model(console, user, model):
    task = TaskFactory(owner=user, worker=WorkerFactory())
    ExperimentFactory(owner=user)
    ReservationFactory(owner=user)
    ApiKeyFactory.create(user=user)
    PluginConfig.objects.create(name="tensorboard", enabled=True, mode="sidecar")
    JupyterService.objects.create(owner=user, name="nb", task=task, token_sealed="sealed-token")
    response = console.get(reverse(f"admin:{model}_changelist"))
    assert response.status_code == 200
    assert b"sealed-token" not in response.content


def test_task_page_is_read_only_and_shows_node_assignments(console, user):
    task = TaskFactory(owner=user, status=TaskStatus.RUNNING)
    NodeAssignmentFactory(task=task, worker=WorkerFactory(name="gpu-box-x"))
    response = console.get(reverse("admin:tasks_task_change", args=[task.pk]))
    assert response.status_code == 200
    assert b"gpu-box-x" in response.content
    assert b'name="_save"' not in response.content


def test_worker_list_shows_capacity_and_usage(console):
    WorkerFactory(cpu_cores=32, memory_gb=128, gpu_count=4, used_cpu=8, used_memory_gb=16, used_gpus=1)
    content = console.get(reverse("admin:scheduler_worker_changelist")).content.decode()
    assert "32 / 128 / 4 / 4+0" in content
    assert "8 / 16 / 1 / 0+0" in content


def test_task_search_finds_exact_id_and_job_name(console, user):
    wanted = TaskFactory(owner=user, job_name="needle")
    TaskFactory(owner=user, job_name="hay")
    by_id = console.get(TASKS_URL, {"q": str(wanted.id)}).context["cl"].result_list
    by_name = console.get(TASKS_URL, {"q": "needle"}).context["cl"].result_list
    assert [t.id for t in by_id] == [wanted.id]
    assert [t.id for t in by_name] == [wanted.id]


def test_console_is_closed_to_non_staff_users(user):
    client = Client()
    client.force_login(user)
    assert client.get(TASKS_URL).status_code == 302


# --- task actions --------------------------------------------------------------


def test_cancel_action_cancels_queued_task_and_audits_it(console, user, admin_user):
    task = TaskFactory(owner=user)
    messages = run_action(console, TASKS_URL, "cancel_tasks", [task])
    task.refresh_from_db()
    assert task.status == TaskStatus.CANCELLED
    assert task.cancelled_by == admin_user
    assert [e.user_id for e in events("job_cancelled", f"task:{task.id}")] == ["root"]
    assert messages == ["Done: cancel 1 task(s)."]


def test_cancel_action_reports_finished_task_as_failure(console, user):
    task = TaskFactory(owner=user, status=TaskStatus.COMPLETED, ended_at=timezone.now())
    [message] = run_action(console, TASKS_URL, "cancel_tasks", [task])
    assert message.startswith(f"Could not cancel {task.job_name}")
    task.refresh_from_db()
    assert task.status == TaskStatus.COMPLETED


def test_requeue_action_requeues_failed_task_and_audits_it(console, user):
    task = TaskFactory(owner=user, status=TaskStatus.FAILED, ended_at=timezone.now(), error="boom", retry_count=3)
    run_action(console, TASKS_URL, "requeue_tasks", [task])
    task.refresh_from_db()
    assert (task.status, task.retry_count, task.error) == (TaskStatus.QUEUED, 0, "")
    assert len(events("job_requeued", f"task:{task.id}")) == 1


def test_a_requeued_task_keeps_how_its_last_attempt_ended(console, user):
    ended_at = timezone.now()
    task = TaskFactory(
        owner=user,
        status=TaskStatus.FAILED,
        attempt=1,
        ended_at=ended_at,
        exit_code=3,
        failure_reason="exit_code",
        error="boom",
        output="epoch 1",
    )

    run_action(console, TASKS_URL, "requeue_tasks", [task])

    task.refresh_from_db()
    assert (task.exit_code, task.failure_reason, task.output) == (None, "", "")
    assert [(a["attempt"], a["failure_reason"], a["exit_code"], a["error"]) for a in task.earlier_attempts] == [
        (1, "exit_code", 3, "boom")
    ]
    assert task.earlier_attempts[0]["ended_at"] == api_time(ended_at)


def test_requeue_action_refuses_queued_task(console, user):
    task = TaskFactory(owner=user)
    [message] = run_action(console, TASKS_URL, "requeue_tasks", [task])
    assert message.startswith("Could not re-queue")


def test_set_priority_action_changes_priority_and_audits_it(console, user):
    tasks = TaskFactory.create_batch(2, owner=user, priority=2)
    messages = run_action(console, TASKS_URL, "set_priority", tasks, priority="9")
    assert messages == ["Done: set priority 9 on 2 task(s)."]
    for task in tasks:
        task.refresh_from_db()
        assert task.priority == 9
        [event] = events("job_priority_changed", f"task:{task.id}")
        assert event.metadata == {"from": 2, "to": 9}


@pytest.mark.parametrize("priority", ["", "0", "11", "high"])
def test_set_priority_action_without_valid_priority_changes_nothing(console, user, priority):
    task = TaskFactory(owner=user, priority=2)
    [message] = run_action(console, TASKS_URL, "set_priority", [task], priority=priority)
    assert "Enter a priority" in message
    task.refresh_from_db()
    assert task.priority == 2


# --- API keys ------------------------------------------------------------------


def create_key_in_console(console, user, **extra):
    data = {"user": user.pk, "role": "user", "name": "laptop", "expires_at_0": "", "expires_at_1": "", **extra}
    return console.post(reverse("admin:fetchml_apikey_add"), data, follow=True)


def test_created_key_secret_is_shown_once_and_works(console, user):
    response = create_key_in_console(console, user)
    key = ApiKey.objects.get(user=user)
    words = [word for message in response.context["messages"] for word in str(message).split()]
    [raw] = [word for word in words if apikeys.split(word) is not None]
    assert apikeys.split(raw)[0] == key.prefix
    assert KeyClient(raw).get("/v1/tasks").status_code == 200
    assert raw.encode() not in console.get(KEYS_URL).content
    assert raw.encode() not in console.get(reverse("admin:fetchml_apikey_change", args=[key.pk])).content
    assert key.prefix.encode() in console.get(KEYS_URL).content


def test_key_created_in_console_goes_through_the_service(console, user):
    create_key_in_console(console, user, role="worker", name="ops")
    key = ApiKey.objects.get(user=user)
    assert (key.role, key.name) == ("worker", "ops")
    [event] = events("api_key_created", f"api_key:{key.prefix}")
    assert event.user_id == "root"


def test_key_with_past_expiry_is_refused_by_the_form(console, user):
    response = create_key_in_console(console, user, expires_at_0="2000-01-01", expires_at_1="00:00:00")
    assert b"Must be in the future." in response.content
    assert not ApiKey.objects.filter(user=user).exists()


def test_revoke_action_revokes_and_audits(console, user):
    key, raw = ApiKeyFactory.pair(user=user)
    messages = run_action(console, KEYS_URL, "revoke_keys", [key])
    key.refresh_from_db()
    assert key.revoked_at is not None
    assert messages == ["Done: revoke 1 API key(s)."]
    assert len(events("api_key_revoked", f"api_key:{key.prefix}")) == 1
    assert KeyClient(raw).get("/v1/tasks").status_code == 401


def test_revoking_a_revoked_key_is_reported(console, user):
    key = ApiKeyFactory.create(user=user, role="user")
    run_action(console, KEYS_URL, "revoke_keys", [key])
    [message] = run_action(console, KEYS_URL, "revoke_keys", [key])
    assert "already revoked" in message


# --- workers and plugins -------------------------------------------------------


def test_drain_action_drains_worker_and_audits_it(console, user):
    worker = WorkerFactory()
    NodeAssignmentFactory(task=TaskFactory(owner=user, status=TaskStatus.RUNNING), worker=worker)
    messages = run_action(console, reverse("admin:scheduler_worker_changelist"), "drain_workers", [worker])
    worker.refresh_from_db()
    assert worker.status == Worker.Status.DRAINING
    assert messages == ["Done: drain 1 worker(s)."]
    assert [e.user_id for e in events("scheduler_drain", f"worker:{worker.name}")] == ["root"]


def test_plugin_page_masks_secret_settings(console):
    settings = {"api_key": "s3cr3t-token", "project": "vision"}
    PluginConfig.objects.create(name="wandb", enabled=True, mode="remote", settings=settings)
    response = console.get(reverse("admin:plugins_pluginconfig_change", args=["wandb"]))
    assert response.status_code == 200
    assert b"s3cr3t-token" not in response.content
    assert MASK.encode() in response.content
    assert b"vision" in response.content


def test_plugin_disable_action_goes_through_the_plugin_service(console):
    config = PluginConfig.objects.create(name="tensorboard", enabled=True, mode="sidecar")
    messages = run_action(console, reverse("admin:plugins_pluginconfig_changelist"), "disable_plugins", [config])
    config.refresh_from_db()
    assert config.enabled is False
    assert messages == ["Done: disable 1 plugin(s)."]
    assert len(events("plugin_configured", "plugin:tensorboard")) == 1


def test_plugin_enable_action_reports_an_invalid_configuration(console):
    config = PluginConfig.objects.create(name="wandb", enabled=False, mode="remote", settings={})
    [message] = run_action(console, reverse("admin:plugins_pluginconfig_changelist"), "enable_plugins", [config])
    assert message.startswith("Could not enable wandb")
    config.refresh_from_db()
    assert config.enabled is False


def test_a_console_page_refused_is_a_page_not_the_apis_json(console):
    response = console.get(reverse("admin:tasks_task_add"))

    assert response.status_code == 403
    assert response["Content-Type"].startswith("text/html")


def test_a_console_page_not_found_is_a_page_not_the_apis_json(console):
    response = console.get("/admin/tasks/no-such-model/")

    assert response.status_code == 404
    assert response["Content-Type"].startswith("text/html")


def test_a_requeued_task_that_never_ran_keeps_no_attempt(console, user):
    task = TaskFactory(owner=user, status=TaskStatus.CANCELLED, attempt=0, failure_reason="cancelled")

    run_action(console, TASKS_URL, "requeue_tasks", [task])

    task.refresh_from_db()
    assert task.earlier_attempts == []
