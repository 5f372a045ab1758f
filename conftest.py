"""Fixtures shared by every app's tests."""

import asyncio
import os
from dataclasses import dataclass, field

import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.core.cache import cache
from django.db import connections
from django.test import Client
from rest_framework.test import APIClient

from fetchml.dbpool import close_pool_connections
from fetchml.ratelimits import cache_breaker
from fetchml.testing import IsolatedNetwork, backend_pid
from fetchml.tests.factories import ApiKeyFactory, UserFactory

USING_POSTGRES = os.environ.get("DATABASE_URL", "").startswith(("postgres://", "postgresql://"))
requires_postgres = pytest.mark.skipif(
    not USING_POSTGRES, reason="needs PostgreSQL: set DATABASE_URL=postgres://... (CI always does)"
)


@pytest.fixture(autouse=True)
def _plain_http(settings):
    """Production settings (DATABASE_URL set, DEBUG off) redirect to HTTPS; tests speak HTTP."""
    settings.SECURE_SSL_REDIRECT = False


@pytest.fixture
def queued_until_a_round(settings):
    """Submitted tasks wait for a dispatch round even when a worker is free: for tests of what
    a round does with the queue it finds (by default a submission places its task at once)."""
    settings.FETCHML_DISPATCH_ON_SUBMIT = False


@pytest.fixture(autouse=True)
def _clean_cache():
    """Rate-limit counters, auth-audit throttles and a cache failure must not leak between tests."""
    cache.clear()
    cache_breaker.reset()
    yield
    cache_breaker.reset()
    cache.clear()


@pytest.fixture(autouse=True)
def _pool_connections():
    """Connections the database thread pool opened must not outlive the test (nor keep its database)."""
    yield
    close_pool_connections()


@pytest.fixture
def isolated_network():
    """An `IsolatedNetwork` (fetchml.testing), removed after the test; the test skips, saying why,
    where one cannot be made (not root)."""
    network, why_not = IsolatedNetwork.make()
    if network is None:
        pytest.skip(why_not)
    yield network
    network.close()


class KeyClient(APIClient):
    """An APIClient that sends one API key on every request."""

    def __init__(self, raw_key: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.raw_key = raw_key
        if raw_key:
            self.credentials(HTTP_X_API_KEY=raw_key)


@pytest.fixture
def thread_connections():
    """Close the database connections that async tests open in asgiref's sync thread.

    `database_sync_to_async` keeps them (CONN_MAX_AGE); left open, they stop
    the test database from being dropped at the end of the run.
    """
    yield
    asyncio.run(sync_to_async(connections.close_all)())


@dataclass
class GroupMoves:
    """The (group, channel) pairs the channel layer was asked to add and to discard, in order."""

    joined: list[tuple[str, str]] = field(default_factory=list)
    left: list[tuple[str, str]] = field(default_factory=list)


@pytest.fixture
def group_moves(monkeypatch) -> GroupMoves:
    """Records every group_add and group_discard of the default channel layer, passing each on."""
    layer = get_channel_layer()
    moves = GroupMoves()
    real_add, real_discard = layer.group_add, layer.group_discard

    async def add(group: str, channel: str) -> None:
        moves.joined.append((group, channel))
        await real_add(group, channel)

    async def discard(group: str, channel: str) -> None:
        moves.left.append((group, channel))
        await real_discard(group, channel)

    monkeypatch.setattr(layer, "group_add", add)
    monkeypatch.setattr(layer, "group_discard", discard)
    return moves


@pytest.fixture
def anon_client() -> KeyClient:
    return KeyClient()


@pytest.fixture
def user(db):
    return UserFactory(username="alice")


@pytest.fixture
def other_user(db):
    return UserFactory(username="bob")


@pytest.fixture
def admin_user(db):
    return UserFactory(username="root", is_staff=True, is_superuser=True)


@pytest.fixture
def console(admin_user) -> Client:
    """A Django test client logged in to the admin as a superuser (the operator console)."""
    client = Client()
    client.force_login(admin_user)
    return client


@pytest.fixture
def user_client(user) -> KeyClient:
    return KeyClient(ApiKeyFactory.raw(user=user, role="user"))


@pytest.fixture
def other_client(other_user) -> KeyClient:
    return KeyClient(ApiKeyFactory.raw(user=other_user, role="user"))


@pytest.fixture
def admin_client_key(admin_user) -> KeyClient:
    return KeyClient(ApiKeyFactory.raw(user=admin_user, role="admin"))


@pytest.fixture
def worker_key(db) -> str:
    return ApiKeyFactory.raw(user=UserFactory(username="worker-agent"), role="worker")


@pytest.fixture
def freezable_database():
    """Skips unless this process may stop PostgreSQL's server processes (a local server, run as root
    or as the server's user), as a host whose database process hangs would."""
    own = backend_pid()
    try:
        os.kill(own, 0)
    except (PermissionError, ProcessLookupError) as error:
        pytest.skip(f"cannot signal the PostgreSQL server process {own} from here: {error}")
