"""Fixtures for the scheduler's tests."""

from pathlib import Path

import pytest
from asgiref.sync import async_to_sync
from channels.layers import channel_layers, get_channel_layer
from django.db import connection

from artifacts.tests.factories import worker_key_pair
from fetchml.testing import LiveServer, database_url_for
from fetchml.tests.factories import ApiKeyFactory, UserFactory


@pytest.fixture
def channel_layer():
    """A clean channel layer: a new in-memory instance, or an emptied Redis database."""
    channel_layers.backends.clear()
    layer = get_channel_layer()
    if hasattr(layer, "flush"):
        async_to_sync(layer.flush)()
    yield layer
    channel_layers.backends.clear()


@pytest.fixture
def owner_key(user) -> str:
    """A user key of `user`: what the end-to-end tests submit with."""
    return ApiKeyFactory.raw(user=user, role="user")


@pytest.fixture
def agent_key(db) -> str:
    """A worker key: what the end-to-end tests' agents connect with."""
    return ApiKeyFactory.raw(user=UserFactory(username="e2e-agent"), role="worker")


@pytest.fixture
def live(tmp_path: Path):
    """A live daphne on the test database, storing files under `tmp_path`: what agents upload to."""
    with LiveServer(
        database_url=database_url_for(connection), env={"FETCHML_STORAGE_DIR": str(tmp_path / "s")}
    ) as server:
        yield server


@pytest.fixture
def worker():
    """A worker key: (the row, the raw header value)."""
    return worker_key_pair()
