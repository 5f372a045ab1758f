"""plugin_status_report: what the worker consumer calls when a sidecar's state changes."""

import uuid

import pytest

from fetchml.errors import Conflict, Invalid, NotFound
from plugins.services import plugin_status_report
from plugins.tests.factories import TaskFactory
from tasks.models import Task

pytestmark = pytest.mark.django_db


def test_report_is_stored_in_the_task_plugin_status(db):
    task = TaskFactory(status="running")
    entry = plugin_status_report(task_id=task.id, name="tensorboard", status="healthy", url="http://10.0.0.7:6006/")
    stored = Task.objects.get(id=task.id).plugin_status["tensorboard"]
    assert stored == entry
    assert (stored["name"], stored["status"], stored["url"]) == ("tensorboard", "healthy", "http://10.0.0.7:6006/")
    assert stored["last_check"]


def test_report_of_one_plugin_keeps_the_others(db):
    task = TaskFactory(status="running")
    plugin_status_report(task_id=task.id, name="tensorboard", status="starting", url="")
    plugin_status_report(task_id=task.id, name="mlflow", status="healthy", url="http://10.0.0.7:5000/")
    assert set(Task.objects.get(id=task.id).plugin_status) == {"tensorboard", "mlflow"}


def test_task_api_shows_the_reported_status(user, user_client):
    task = TaskFactory(owner=user, status="running")
    plugin_status_report(task_id=task.id, name="mlflow", status="healthy", url="http://10.0.0.7:5000/")
    body = user_client.get(f"/v1/tasks/{task.id}").json()
    assert body["plugin_status"]["mlflow"]["status"] == "healthy"


def test_status_change_is_published_after_commit(django_capture_on_commit_callbacks):
    task = TaskFactory(status="running")
    with django_capture_on_commit_callbacks(execute=False) as first:
        plugin_status_report(task_id=task.id, name="mlflow", status="healthy", url="")
    with django_capture_on_commit_callbacks(execute=False) as repeat:
        plugin_status_report(task_id=task.id, name="mlflow", status="healthy", url="")
    assert (len(first), len(repeat)) == (1, 0)


def test_unknown_status_is_invalid(db):
    task = TaskFactory(status="running")
    with pytest.raises(Invalid) as error:
        plugin_status_report(task_id=task.id, name="mlflow", status="fine", url="")
    assert [d["field"] for d in error.value.details] == ["status"]


def test_unknown_plugin_is_invalid(db):
    with pytest.raises(Invalid) as error:
        plugin_status_report(task_id=TaskFactory(status="running").id, name="ghost", status="healthy", url="")
    assert [d["field"] for d in error.value.details] == ["name"]


@pytest.mark.parametrize("url", ["ftp://x", "http://[::1", "10.0.0.7:5000"])
def test_non_http_url_is_invalid(db, url):
    with pytest.raises(Invalid) as error:
        plugin_status_report(task_id=TaskFactory(status="running").id, name="mlflow", status="healthy", url=url)
    assert [d["field"] for d in error.value.details] == ["url"]


def test_unknown_task_is_not_found(db):
    with pytest.raises(NotFound):
        plugin_status_report(task_id=uuid.uuid4(), name="mlflow", status="healthy", url="")


def test_malformed_task_id_is_invalid(db):
    with pytest.raises(Invalid):
        plugin_status_report(task_id="not-a-uuid", name="mlflow", status="healthy", url="")


def test_finished_task_accepts_only_stopped(db):
    task = TaskFactory(status="completed")
    with pytest.raises(Conflict):
        plugin_status_report(task_id=task.id, name="mlflow", status="healthy", url="")
    plugin_status_report(task_id=task.id, name="mlflow", status="stopped", url="")
    assert Task.objects.get(id=task.id).plugin_status["mlflow"]["status"] == "stopped"
