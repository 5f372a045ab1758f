"""GET /health: no key, healthy when its dependencies answer, degraded (503) when one does not."""

import http.client
import json
import socket
from datetime import datetime

import pytest
from django.conf import settings
from django.db import connection
from django.test import override_settings
from websockets.sync.client import connect

import fetchml
from fetchml.testing import LiveServer, database_url_for


def closed_port() -> int:
    """A local TCP port with nothing listening on it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_health_is_healthy_with_version_and_timestamp(anon_client, db):
    response = anon_client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "healthy"
    assert body["version"] == fetchml.__version__
    assert datetime.fromisoformat(body["timestamp"]).tzinfo is not None
    assert body["checks"] == {"database": "ok", "channel_layer": "ok"}


def test_health_body_is_compact_json(anon_client, db):
    response = anon_client.get("/health")
    assert response.content == json.dumps(response.json(), separators=(",", ":")).encode()


def test_health_is_degraded_when_the_channel_layer_is_unreachable(anon_client, db):
    broken = {
        "default": {
            "BACKEND": "fetchml.channel_layer.RedisChannelLayer",
            "CONFIG": {"hosts": [f"redis://127.0.0.1:{closed_port()}/0"]},
        }
    }
    with override_settings(CHANNEL_LAYERS=broken):
        response = anon_client.get("/health")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "degraded"
    assert body["checks"] == {"database": "ok", "channel_layer": "unreachable"}


@pytest.mark.django_db(transaction=True)
def test_health_is_degraded_when_the_database_is_unreachable(anon_client, tmp_path):
    original = connection.settings_dict.copy()
    connection.close()
    if connection.vendor == "sqlite":
        connection.settings_dict["NAME"] = str(tmp_path / "missing-dir" / "db.sqlite3")
    else:
        connection.settings_dict["PORT"] = str(closed_port())
    try:
        response = anon_client.get("/health")
    finally:
        connection.close()
        connection.settings_dict.clear()
        connection.settings_dict.update(original)
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "degraded"
    assert body["checks"]["database"] == "unreachable"
    assert connection.cursor() is not None  # restored for the teardown


def test_health_needs_no_key_and_ignores_a_bad_one(db):
    from conftest import KeyClient

    assert KeyClient("not-a-key").get("/health").status_code == 200


def test_health_answers_head(anon_client, db):
    assert anon_client.head("/health").status_code == 200


@pytest.mark.skipif(not settings.REDIS_URL, reason="needs Redis: set REDIS_URL=redis://... (CI always does)")
@pytest.mark.django_db(transaction=True)
def test_health_is_healthy_on_a_server_with_a_websocket_connected(user_client):
    # A connected consumer holds the process's receive; the check's message must reach it all the same.
    with LiveServer(database_url=database_url_for(connection)) as server:
        url = f"ws://{server.host}:{server.port}/ws"
        with connect(url, additional_headers={"X-API-Key": user_client.raw_key}, open_timeout=15) as ws:
            ws.send(json.dumps({"type": "ping"}))
            assert json.loads(ws.recv(timeout=15))["type"] == "pong"
            client = http.client.HTTPConnection(server.host, server.port, timeout=15)
            try:
                client.request("GET", "/health")
                response = client.getresponse()
                body = json.loads(response.read())
            finally:
                client.close()

    assert (response.status, body["checks"]) == (200, {"database": "ok", "channel_layer": "ok"})
