"""/v1/jupyter/services: start, list, stop; workspace rules; token visible to its owner only."""

import pytest

from audit.models import AuditEvent
from jupyter.models import JupyterService
from jupyter.services import jupyter_ready
from tasks.models import Task

pytestmark = pytest.mark.django_db

URL = "/v1/jupyter/services"


def _start(client, **body) -> dict:
    response = client.post(URL, {"name": "nb", **body}, format="json")
    assert response.status_code == 201, response.content
    return response.json()


def _running(service_id: str, token: str = "tok-123") -> None:
    task_id = JupyterService.objects.get(id=service_id).task_id
    assert jupyter_ready(task_id=task_id, url="http://10.0.0.7:8888/", service_token=token)


def test_start_creates_a_starting_service_and_a_queued_service_task(user_client, user):
    body = _start(user_client, workspace="projects/a", image="quay.io/jupyter/base-notebook")
    assert (body["name"], body["status"], body["url"], body["token"]) == ("nb", "starting", None, None)
    service = JupyterService.objects.get(id=body["id"])
    assert (service.owner, service.workspace, service.image) == (user, "projects/a", "quay.io/jupyter/base-notebook")
    task = Task.objects.get(id=body["task_id"])
    assert (task.kind, task.owner, task.status, task.max_retries) == ("service", user, "queued", 0)


def test_start_without_an_image_uses_the_default_image(user_client):
    assert _start(user_client)["image"] == "jupyter/pytorch:latest"


@pytest.mark.parametrize("workspace", ["/etc", "../up", "a/../../b", "a/..", "C:\\x"])
def test_workspace_outside_the_work_directory_is_refused_with_422(user_client, workspace):
    response = user_client.post(URL, {"name": "nb", "workspace": workspace}, format="json")
    assert response.status_code == 422, response.content
    assert response.json()["details"][0]["field"] == "workspace"
    assert not JupyterService.objects.exists()


def test_start_without_a_name_is_422(user_client):
    assert user_client.post(URL, {"workspace": "x"}, format="json").status_code == 422


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "nb3", "image": 123}, "image"),
        ({"name": 3}, "name"),
        ({"name": "nb3", "workspace": 7}, "workspace"),
        ({"name": "nb3", "bogus": 1}, "bogus"),
        ({"name": "nb\n"}, "name"),
        ({"name": "nb3", "image": "img\n"}, "image"),
    ],
)
def test_start_refuses_wrong_json_types_and_unknown_fields_with_422(user_client, body, field):
    response = user_client.post(URL, body, format="json")
    assert response.status_code == 422, response.content
    assert [detail["field"] for detail in response.json()["details"]] == [field]
    assert not JupyterService.objects.exists()


def test_a_service_name_with_a_dot_gives_its_task_a_valid_job_name(user_client):
    body = _start(user_client, name="my.notebook")
    assert Task.objects.get(id=body["task_id"]).job_name == "jupyter-my_notebook"


def test_a_long_service_name_gives_its_task_a_job_name_of_64_characters(user_client):
    body = _start(user_client, name="n" * 64)
    assert Task.objects.get(id=body["task_id"]).job_name == "jupyter-" + "n" * 56


def test_a_starting_service_shows_its_task_waiting_in_the_queue(user_client):
    body = _start(user_client)
    listed = user_client.get(URL).json()[0]
    read = user_client.get(f"{URL}/{body['id']}").json()
    assert (body["status"], body["task_status"]) == ("starting", "queued")
    assert listed["task_status"] == read["task_status"] == "queued"


def test_a_running_service_shows_its_task_running(user_client):
    body = _start(user_client)
    Task.objects.filter(id=body["task_id"]).update(status="running")
    _running(body["id"])
    assert user_client.get(f"{URL}/{body['id']}").json()["task_status"] == "running"


def test_list_shows_own_services_only(user_client, other_client):
    mine = _start(user_client)
    _start(other_client)
    assert [s["id"] for s in user_client.get(URL).json()] == [mine["id"]]


def test_admin_lists_every_service(user_client, other_client, admin_client_key):
    _start(user_client)
    _start(other_client)
    assert len(admin_client_key.get(URL).json()) == 2


def test_owner_sees_url_and_token_once_running(user_client):
    body = _start(user_client)
    _running(body["id"], token="tok-123")
    [listed] = user_client.get(URL).json()
    assert (listed["status"], listed["url"], listed["token"]) == ("running", "http://10.0.0.7:8888/", "tok-123")


def test_admin_sees_the_running_service_without_its_token(user_client, admin_client_key):
    _running(_start(user_client)["id"])
    [listed] = admin_client_key.get(URL).json()
    assert (listed["status"], listed["user_id"], listed["token"]) == ("running", "alice", None)


def test_get_of_one_service_shows_its_url_and_token_to_its_owner_once_running(user_client):
    body = _start(user_client)
    assert user_client.get(f"{URL}/{body['id']}").json()["status"] == "starting"
    _running(body["id"], token="tok-123")
    got = user_client.get(f"{URL}/{body['id']}").json()
    assert (got["id"], got["status"], got["url"], got["token"]) == (
        body["id"],
        "running",
        "http://10.0.0.7:8888/",
        "tok-123",
    )


def test_get_of_someone_elses_service_is_404(user_client, other_client):
    body = _start(other_client)
    response = user_client.get(f"{URL}/{body['id']}")
    assert (response.status_code, response.json()["code"]) == (404, "NOT_FOUND")


def test_token_is_stored_sealed(user_client):
    body = _start(user_client)
    _running(body["id"], token="tok-123")
    sealed = JupyterService.objects.get(id=body["id"]).token_sealed
    assert sealed and "tok-123" not in sealed


def test_delete_of_a_queued_service_cancels_its_task_and_stops_it(user_client):
    body = _start(user_client)
    assert user_client.delete(f"{URL}/{body['id']}").status_code == 204
    service = JupyterService.objects.select_related("task").get(id=body["id"])
    assert (service.status, service.task.status) == ("stopped", "cancelled")


def test_delete_of_a_running_service_asks_its_worker_to_stop(user_client):
    body = _start(user_client)
    Task.objects.filter(id=body["task_id"]).update(status="running")
    _running(body["id"])
    assert user_client.delete(f"{URL}/{body['id']}").status_code == 204
    service = JupyterService.objects.select_related("task").get(id=body["id"])
    assert service.status == "stopping"
    assert service.task.cancel_requested_at is not None
    [listed] = user_client.get(URL).json()
    assert listed["token"] is None


def test_delete_twice_is_still_204(user_client):
    body = _start(user_client)
    user_client.delete(f"{URL}/{body['id']}")
    assert user_client.delete(f"{URL}/{body['id']}").status_code == 204


def test_delete_of_someone_elses_service_is_404(user_client, other_client):
    body = _start(other_client)
    assert user_client.delete(f"{URL}/{body['id']}").status_code == 404
    assert JupyterService.objects.get(id=body["id"]).status == "starting"


def test_start_and_stop_are_audited(user_client):
    body = _start(user_client)
    user_client.delete(f"{URL}/{body['id']}")
    actions = list(
        AuditEvent.objects.filter(event_type="jupyter_changed", resource=f"jupyter:{body['id']}")
        .order_by("sequence_num")
        .values_list("action", flat=True)
    )
    assert actions == ["start", "stop"]


def test_workers_cannot_use_the_jupyter_api(worker_key):
    from conftest import KeyClient

    assert KeyClient(worker_key).get(URL).status_code == 403
