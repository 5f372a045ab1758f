"""The client WebSocket /ws and a key that stops being usable: revoked (told at once), expired or
its user deactivated (found at the next re-check). The connection is closed with 4401."""

from collections.abc import Callable

import pytest
from asgiref.sync import sync_to_async
from django.test import override_settings

from fetchml.models import ApiKey
from fetchml.services import user_save
from fetchml.testing import close_of, open_client_socket, run_async
from fetchml.tests.factories import ApiKeyFactory, deactivate_key_user, expire_key, revoke_key, revoke_key_unannounced
from tasks.consumers import CLOSE_UNAUTHENTICATED
from tasks.services import task_submit, task_transition
from tasks.states import TaskStatus

pytestmark = pytest.mark.django_db(transaction=True)
TIMEOUT = 5
REVOKED = (CLOSE_UNAUTHENTICATED, "API key revoked")
FOUND_UNUSABLE = (CLOSE_UNAUTHENTICATED, "API key revoked or expired")


@pytest.fixture
def alice_pair(user) -> tuple[ApiKey, str]:
    return ApiKeyFactory.pair(user=user)


_revoke = sync_to_async(revoke_key)


@run_async
@pytest.mark.parametrize("role", ["user", "admin"])
async def test_revoking_its_key_closes_a_client_connection_with_4401(admin_user, role):
    key, raw = await sync_to_async(ApiKeyFactory.pair)(user=admin_user, role=role)
    socket = await open_client_socket(raw)
    try:
        await _revoke(key)
        closed = await close_of(socket)
    finally:
        await socket.disconnect()
    assert closed == REVOKED


@run_async
async def test_deactivating_its_user_in_the_console_closes_a_client_connection_at_once(alice_pair, user, admin_user):
    _, raw = alice_pair
    socket = await open_client_socket(raw)
    try:
        await sync_to_async(_deactivate_in_the_console)(user, admin_user)
        closed = await close_of(socket)
    finally:
        await socket.disconnect()
    assert closed == REVOKED


def _deactivate_in_the_console(user, operator) -> None:
    user.is_active = False
    user_save(user=user, operator=operator, created=False, changed_fields=["is_active"])


@run_async
async def test_revoking_its_key_closes_a_connection_with_subscriptions(alice_pair, user):
    key, raw = alice_pair
    task = await sync_to_async(task_submit)(owner=user, job_name="watched")
    socket = await open_client_socket(raw)
    try:
        await socket.send_json_to({"type": "subscribe", "task_id": str(task.id)})
        assert (await socket.receive_json_from(timeout=TIMEOUT))["type"] == "subscribed"
        assert (await socket.receive_json_from(timeout=TIMEOUT))["type"] == "task_update"
        await _revoke(key)
        closed = await close_of(socket)
    finally:
        await socket.disconnect()
    assert closed == REVOKED


@run_async
async def test_a_connection_closed_for_its_key_is_told_nothing_more(alice_pair, user):
    key, raw = alice_pair
    task = await sync_to_async(task_submit)(owner=user, job_name="after")
    socket = await open_client_socket(raw)
    try:
        await _revoke(key)
        await close_of(socket)
        await sync_to_async(task_transition)(task_id=task.id, to=TaskStatus.PREPARING)
        await socket.send_json_to({"type": "ping"})
        silent = await socket.receive_nothing(timeout=0.3)
    finally:
        await socket.disconnect()
    assert silent


@run_async
@override_settings(FETCHML_WS_RECHECK_SECONDS=0.05)
@pytest.mark.parametrize(
    "made_unusable",
    [expire_key, deactivate_key_user, revoke_key_unannounced],
    ids=["expired", "user-deactivated", "revocation-message-lost"],
)
async def test_a_key_found_unusable_at_a_recheck_closes_the_connection_with_4401(
    alice_pair, made_unusable: Callable[[ApiKey], None]
):
    key, raw = alice_pair
    socket = await open_client_socket(raw)
    try:
        await sync_to_async(made_unusable)(key)
        closed = await close_of(socket)
    finally:
        await socket.disconnect()
    assert closed == FOUND_UNUSABLE


@run_async
async def test_revoking_another_key_leaves_the_connection_open(alice_pair, other_user):
    _key, raw = alice_pair
    bobs = await sync_to_async(ApiKeyFactory.create)(user=other_user)
    socket = await open_client_socket(raw)
    try:
        await _revoke(bobs)
        await socket.send_json_to({"type": "ping"})
        answer = await socket.receive_json_from(timeout=TIMEOUT)
    finally:
        await socket.disconnect()
    assert answer["type"] == "pong"


@run_async
async def test_reconnecting_with_a_revoked_key_is_refused_with_4401(alice_pair):
    key, raw = alice_pair
    await _revoke(key)
    socket = await open_client_socket(raw)
    try:
        closed = await close_of(socket)
    finally:
        await socket.disconnect()
    assert closed == (CLOSE_UNAUTHENTICATED, "invalid API key")
