"""The SSE streams and a key that stops being usable: revoked (told at once), expired or its user
deactivated (found at the next heartbeat). The stream ends; opened again, it is refused with 401."""

from collections.abc import Callable

import pytest
from asgiref.sync import sync_to_async
from django.test import override_settings

from fetchml.models import ApiKey
from fetchml.testing import KeyAsyncClient, SSEStream, run_async
from fetchml.tests.factories import ApiKeyFactory, deactivate_key_user, expire_key, revoke_key, revoke_key_unannounced
from tasks.services import task_submit

pytestmark = pytest.mark.django_db(transaction=True)

STREAMS = {
    "log-follow": "/v1/tasks/{task}/logs?follow=true",
    "job": "/v1/scheduler/jobs/{task}/stream",
    "status": "/v1/scheduler/status/stream",
}


@pytest.fixture(params=list(STREAMS.values()), ids=list(STREAMS))
def stream_url(request, user) -> str:
    task = task_submit(owner=user, job_name="watched")
    return request.param.format(task=task.id)


@pytest.fixture
def alice_pair(user) -> tuple[ApiKey, str]:
    return ApiKeyFactory.pair(user=user)


async def _open(raw_key: str, url: str) -> SSEStream:
    response = await KeyAsyncClient(raw_key).get(url)
    assert response.status_code == 200, response.content
    return SSEStream(response.streaming_content)


_revoke = sync_to_async(revoke_key)


@run_async
async def test_revoking_its_key_ends_a_stream(alice_pair, stream_url):
    key, raw = alice_pair
    stream = await _open(raw, stream_url)
    try:
        await stream.events(1)
        await _revoke(key)
        await stream.until_end()
    finally:
        await stream.close()
    assert stream.ended


@run_async
@override_settings(FETCHML_SSE_HEARTBEAT_SECONDS=0.05)
@pytest.mark.parametrize(
    "made_unusable",
    [expire_key, deactivate_key_user, revoke_key_unannounced],
    ids=["expired", "user-deactivated", "revocation-message-lost"],
)
async def test_a_key_found_unusable_at_a_heartbeat_ends_the_stream(
    alice_pair, stream_url, made_unusable: Callable[[ApiKey], None]
):
    key, raw = alice_pair
    stream = await _open(raw, stream_url)
    try:
        await stream.events(1)
        await sync_to_async(made_unusable)(key)
        await stream.until_end()
    finally:
        await stream.close()
    assert stream.ended


@run_async
async def test_revoking_another_key_leaves_a_stream_open(alice_pair, other_user, stream_url):
    _key, raw = alice_pair
    bobs = await sync_to_async(ApiKeyFactory.create)(user=other_user)
    stream = await _open(raw, stream_url)
    try:
        await stream.events(1)
        await _revoke(bobs)
        stream.timeout = 0.3
        with pytest.raises(TimeoutError):
            await stream.next()
    finally:
        await stream.close()
    assert not stream.ended


@run_async
async def test_reopening_a_stream_with_a_revoked_key_is_refused_with_401(alice_pair, stream_url):
    key, raw = alice_pair
    await _revoke(key)
    response = await KeyAsyncClient(raw).get(stream_url)
    assert response.status_code == 401
