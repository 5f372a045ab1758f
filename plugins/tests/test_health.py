"""Health: remote mode probes the server; sidecar mode reads the reports of running tasks."""

import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from plugins.services import plugin_status_report
from plugins.tests.factories import TaskFactory

pytestmark = pytest.mark.django_db


class _Handler(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.server.answer_status)  # type: ignore[attr-defined]
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args) -> None:
        return  # keep test output clean


def _serve(answer_status: int) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.answer_status = answer_status  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def server_up() -> Iterator[str]:
    yield from _serve(200)


@pytest.fixture
def server_failing() -> Iterator[str]:
    yield from _serve(503)


@pytest.fixture
def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def configure_mlflow(client, url: str) -> None:
    body = {"enabled": True, "mode": "remote", "settings": {"tracking_uri": url}}
    assert client.put("/v1/plugins/mlflow/config", body, format="json").status_code == 200


def test_remote_server_answering_is_healthy(admin_client_key, user_client, server_up):
    configure_mlflow(admin_client_key, server_up)
    body = user_client.get("/v1/plugins/mlflow/health").json()
    assert body["status"] == "healthy"
    assert body["version"] == "1.0.0"
    assert body["details"]["plugin_status"]["status"] == "healthy"
    assert body["details"]["plugin_status"]["url"] == server_up
    assert body["details"]["reason"] == "HTTP 200"
    assert body["timestamp"]


def test_remote_server_on_a_closed_port_is_unhealthy(admin_client_key, user_client, closed_port_url):
    configure_mlflow(admin_client_key, closed_port_url)
    body = user_client.get("/v1/plugins/mlflow/health").json()
    assert body["status"] == "unhealthy"
    assert body["details"]["reason"].startswith("unreachable")


def test_remote_server_answering_an_error_is_unhealthy(admin_client_key, user_client, server_failing):
    configure_mlflow(admin_client_key, server_failing)
    body = user_client.get("/v1/plugins/mlflow/health").json()
    assert (body["status"], body["details"]["reason"]) == ("unhealthy", "HTTP 503")


def test_list_shows_the_remote_status(admin_client_key, user_client, server_up):
    configure_mlflow(admin_client_key, server_up)
    mlflow = next(p for p in user_client.get("/v1/plugins").json() if p["name"] == "mlflow")
    assert mlflow["status"]["status"] == "healthy"
    assert mlflow["status"]["last_check"]


def test_new_url_is_probed_again_not_served_from_cache(admin_client_key, user_client, server_up, closed_port_url):
    configure_mlflow(admin_client_key, server_up)
    assert user_client.get("/v1/plugins/mlflow").json()["status"]["status"] == "healthy"
    configure_mlflow(admin_client_key, closed_port_url)
    assert user_client.get("/v1/plugins/mlflow").json()["status"]["status"] == "unhealthy"


def test_disabled_plugin_is_stopped(user_client):
    body = user_client.get("/v1/plugins/wandb/health").json()
    assert body["details"]["plugin_status"]["status"] == "stopped"
    assert body["details"]["mode"] == "disabled"


def test_sidecar_mode_without_running_tasks_is_stopped(admin_client_key, user_client):
    admin_client_key.put("/v1/plugins/tensorboard/config", {"enabled": True, "mode": "sidecar"}, format="json")
    TaskFactory(status="completed", plugin_status={"tensorboard": {"status": "healthy"}})
    body = user_client.get("/v1/plugins/tensorboard/health").json()
    assert body["details"]["plugin_status"]["status"] == "stopped"
    assert body["status"] == "degraded"


def test_sidecar_mode_with_healthy_reports_is_healthy(admin_client_key, user_client):
    admin_client_key.put("/v1/plugins/tensorboard/config", {"enabled": True, "mode": "sidecar"}, format="json")
    for _ in range(2):
        task = TaskFactory(status="running")
        plugin_status_report(task_id=task.id, name="tensorboard", status="healthy", url="http://10.0.0.7:6006/")
    body = user_client.get("/v1/plugins/tensorboard/health").json()
    assert body["status"] == "healthy"
    assert body["details"]["sidecars"] == {"healthy": 2}
    assert body["details"]["plugin_status"]["url"] == ""  # each sidecar belongs to one user's task


def test_sidecar_mode_with_some_unhealthy_is_degraded(admin_client_key, user_client):
    admin_client_key.put("/v1/plugins/tensorboard/config", {"enabled": True, "mode": "sidecar"}, format="json")
    for state in ("healthy", "unhealthy"):
        plugin_status_report(task_id=TaskFactory(status="running").id, name="tensorboard", status=state, url="")
    body = user_client.get("/v1/plugins/tensorboard/health").json()
    assert body["status"] == "degraded"
    assert body["details"]["plugin_status"]["status"] == "unhealthy"


def test_sidecar_mode_with_only_unhealthy_is_unhealthy(admin_client_key, user_client):
    admin_client_key.put("/v1/plugins/tensorboard/config", {"enabled": True, "mode": "sidecar"}, format="json")
    plugin_status_report(task_id=TaskFactory(status="running").id, name="tensorboard", status="unhealthy", url="")
    assert user_client.get("/v1/plugins/tensorboard/health").json()["status"] == "unhealthy"
