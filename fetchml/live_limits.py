"""How many live connections one API key may hold open on one server process.

A client WebSocket (/ws) or an SSE stream lasts for hours and costs the
server for each change it is told of; a script that opens one per job, or
forgets to close them, would make every other user's updates wait. Each
server process counts the live connections of each key and refuses one past
`FETCHML_LIVE_CONNECTIONS_PER_KEY` (429, or close code 4429 on /ws). The
count is per process: behind a load balancer over N processes a key may
hold up to N times as many. Worker agents' connections are not counted (a
fleet may share one worker key).
"""

import threading
from collections import Counter

from fetchml.conf import app_settings
from fetchml.errors import RateLimited


class TooManyLiveConnections(RateLimited):
    """Past the key's live connections: refused until one of them closes (no time to wait for)."""


class LiveConnection:
    """One counted connection; `release()` (idempotent) gives its place back."""

    def __init__(self, counts: "LiveConnections", key_id: str) -> None:
        self._counts = counts
        self.key_id = key_id
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._counts._release(self.key_id)


class LiveConnections:
    def __init__(self) -> None:
        self._open: Counter[str] = Counter()
        self._lock = threading.Lock()  # consumers of several event loops (tests, threads) may count at once

    def open(self, key_id: str) -> LiveConnection:
        """Count a new connection of the key; raises TooManyLiveConnections past the limit."""
        limit = app_settings.LIVE_CONNECTIONS_PER_KEY
        with self._lock:
            if self._open[key_id] >= limit:
                raise TooManyLiveConnections(
                    f"This API key already holds {limit} live connections (WebSockets and event streams) "
                    "on this server; close one first"
                )
            self._open[key_id] += 1
        return LiveConnection(self, key_id)

    def count(self, key_id: str) -> int:
        with self._lock:
            return self._open[key_id]

    def _release(self, key_id: str) -> None:
        with self._lock:
            self._open[key_id] -= 1
            if self._open[key_id] <= 0:
                del self._open[key_id]


live_connections = LiveConnections()
