"""Fixtures for the scheduler's tests."""

import asyncio

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import channel_layers, get_channel_layer
from django.db import connections


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
def thread_connections():
    """Close the database connections that async tests open in asgiref's sync thread.

    `database_sync_to_async` keeps them (CONN_MAX_AGE); left open, they stop
    the test database from being dropped at the end of the run.
    """
    yield
    asyncio.run(sync_to_async(connections.close_all)())
