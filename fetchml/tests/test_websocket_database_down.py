"""WebSocket handshakes while the database is out of reach: turned away with 4503, no traceback."""

from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from fetchml.consumers import CLOSE_UNAVAILABLE
from fetchml.testing import LiveServer

TIMEOUT = 5
SOME_KEY = "fetchml_abcdefgh_" + "s" * 40


@pytest.fixture
def server_without_database(tmp_path: Path):
    """A live daphne whose database cannot be opened (its directory does not exist)."""
    with LiveServer(database_url=f"sqlite:///{tmp_path / 'missing' / 'db.sqlite3'}") as server:
        yield server


def _close_of(server: LiveServer, path: str) -> tuple[int, str]:
    with (
        connect(
            f"ws://{server.host}:{server.port}{path}",
            additional_headers={"X-API-Key": SOME_KEY},
            open_timeout=TIMEOUT,
        ) as ws,
        pytest.raises(ConnectionClosed) as closed,
    ):
        ws.recv(timeout=TIMEOUT)
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code, closed.value.rcvd.reason


@pytest.mark.parametrize("path", ["/ws/worker", "/ws"])
def test_a_websocket_opened_while_the_database_is_out_of_reach_is_told_to_try_again(server_without_database, path):
    code, reason = _close_of(server_without_database, path)

    assert (code, reason) == (CLOSE_UNAVAILABLE, "the server cannot reach its database; try again shortly")


def test_a_websocket_turned_away_for_the_database_is_one_log_line_without_a_traceback(server_without_database):
    started = len(server_without_database.output())  # what its start-up said (/health found no database)
    for _ in range(2):
        _close_of(server_without_database, "/ws/worker")

    output = server_without_database.output()[started:]
    assert output.count("refused a WebSocket to /ws/worker: the database is out of reach") == 2
    assert "Traceback" not in output
