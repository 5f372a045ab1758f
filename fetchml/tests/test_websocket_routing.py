"""WebSocket paths and refusals: the full ASGI application, and daphne in front of it."""

import logging

import pytest
from channels.testing import WebsocketCommunicator
from django.db import connection
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from fetchml.asgi import application
from fetchml.consumers import CLOSE_NOT_FOUND
from fetchml.testing import LiveServer, database_url_for, run_async

TIMEOUT = 5


async def _closed_with(path: str) -> tuple[int, str]:
    socket = WebsocketCommunicator(application, path)
    connected, _ = await socket.connect(timeout=TIMEOUT)
    assert connected, "refused at the handshake, with no close code"
    closed = await socket.receive_output(timeout=TIMEOUT)
    assert closed["type"] == "websocket.close", closed
    return closed["code"], closed.get("reason", "")


def _live_close(server: LiveServer, path: str) -> tuple[int, str]:
    """The close code and reason a real client gets from the live server at `path`."""
    with (
        connect(f"ws://{server.host}:{server.port}{path}", open_timeout=TIMEOUT) as ws,
        pytest.raises(ConnectionClosed) as closed,
    ):
        ws.recv(timeout=TIMEOUT)
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code, closed.value.rcvd.reason


@pytest.mark.parametrize("path", ["/ws/nothere", "/ws/", "/", "/ws/worker/extra", "/v1/tasks"])
@run_async
async def test_a_path_with_no_websocket_endpoint_is_closed_with_4404(path):
    assert await _closed_with(path) == (CLOSE_NOT_FOUND, "no WebSocket endpoint at this path")


@run_async
async def test_a_path_with_no_websocket_endpoint_is_logged_in_one_info_line(caplog):
    caplog.set_level(logging.INFO)
    await _closed_with("/ws/nothere")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, "refused a WebSocket to '/ws/nothere': no endpoint there")
    ]


@pytest.mark.django_db(transaction=True)
def test_daphne_refuses_an_unknown_path_with_4404_and_no_traceback():
    with LiveServer(database_url=database_url_for(connection)) as server:
        closed = _live_close(server, "/ws/nothere")
        output = server.output()
    assert closed == (CLOSE_NOT_FOUND, "no WebSocket endpoint at this path")
    assert "Traceback" not in output and "No route found" not in output


@pytest.mark.django_db(transaction=True)
def test_daphne_delivers_the_reason_with_the_close_code():
    with LiveServer(database_url=database_url_for(connection)) as server:
        assert _live_close(server, "/ws") == (4401, "an X-API-Key header is required")
        assert _live_close(server, "/ws/worker") == (4401, "invalid or missing API key")
