"""The client WebSocket /ws, over fetchml.asgi.application with channels' WebsocketCommunicator.

Events are published after commit, hence `transactional_db`. Where a test
shows that something is NOT delivered, it makes a second, visible change
afterwards and checks that this marker is the first message to arrive (one
channel's messages arrive in order), instead of waiting for silence.
"""

import asyncio

import channels.consumer
import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.db import transaction
from django.test import override_settings
from django.utils import timezone

from fetchml.shared_reads import SharedRead
from fetchml.testing import client_socket, close_of, open_client_socket, run_async
from fetchml.tests.factories import ApiKeyFactory
from tasks import consumers
from tasks.api.serializers import TaskSerializer
from tasks.consumers import CLOSE_FORBIDDEN, CLOSE_RATE_LIMITED, CLOSE_UNAUTHENTICATED
from tasks.logs import append_lines
from tasks.models import Task, TaskLogLine
from tasks.services import task_submit, task_transition
from tasks.states import TaskStatus

pytestmark = pytest.mark.django_db(transaction=True)
TIMEOUT = 5


@pytest.fixture
def alice_key(user) -> str:
    return ApiKeyFactory.raw(user=user)


@pytest.fixture
def bob_key(other_user) -> str:
    return ApiKeyFactory.raw(user=other_user)


@pytest.fixture
def admin_key(admin_user) -> str:
    return ApiKeyFactory.raw(user=admin_user, role="admin")


@pytest.fixture
def alice_task(user):
    return task_submit(owner=user, job_name="alice-job")


@pytest.fixture
def bob_task(other_user):
    return task_submit(owner=other_user, job_name="bob-job")


async def _move(task, state: str) -> None:
    assert await sync_to_async(task_transition)(task_id=task.id, to=state) is not None


async def _receive(socket: WebsocketCommunicator) -> dict:
    return await socket.receive_json_from(timeout=TIMEOUT)


async def _ask(socket: WebsocketCommunicator, message: dict) -> dict:
    await socket.send_json_to(message)
    return await _receive(socket)


async def _subscribe(socket: WebsocketCommunicator, task) -> tuple[dict, dict]:
    """Subscribe to `task`: the `subscribed` answer and the task's current state that follows it."""
    reply = await _ask(socket, {"type": "subscribe", "task_id": str(task.id)})
    assert reply["type"] == "subscribed", reply
    return reply, await _receive(socket)


def _state(message: dict) -> tuple[str, str, str]:
    """(type, task id, status) of a task message."""
    return message["type"], message["task"]["id"], message["task"]["status"]


def _changed_unannounced(task, status: str) -> None:
    """Change the task's row as a transition would, with no message published: a lost one."""
    ended = timezone.now() if status in (TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED) else None
    Task.objects.filter(id=task.id).update(status=status, ended_at=ended)


def _lines_unannounced(task, *texts: str) -> None:
    TaskLogLine.objects.bulk_create([TaskLogLine(task_id=task.id, attempt=1, stream="stdout", line=t) for t in texts])


# --- authentication -----------------------------------------------------


async def _refusal(socket: WebsocketCommunicator) -> tuple[int, str]:
    """The close code and reason a refused connection gets: accepted, then closed (a close
    before the accept reaches a client as a bare HTTP 403, without either)."""
    connected, _ = await socket.connect(timeout=TIMEOUT)
    assert connected, "refused at the handshake, with no close code"
    return await close_of(socket)


@run_async
async def test_connection_without_a_key_is_closed_with_4401_and_a_reason():
    assert await _refusal(client_socket()) == (CLOSE_UNAUTHENTICATED, "an X-API-Key header is required")


@run_async
async def test_connection_with_an_unknown_key_is_closed_with_4401_and_a_reason():
    assert await _refusal(client_socket("fetchml_nothing_atall")) == (CLOSE_UNAUTHENTICATED, "invalid API key")


@run_async
async def test_key_in_the_query_string_is_refused_even_with_a_valid_header(alice_key):
    code, reason = await _refusal(client_socket(alice_key, path=f"/ws?api_key={alice_key}"))
    assert (code, reason) == (CLOSE_UNAUTHENTICATED, "API keys are accepted in the X-API-Key header only")


@run_async
async def test_key_only_in_the_query_string_is_refused(alice_key):
    code, _ = await _refusal(client_socket(path=f"/ws?key={alice_key}"))
    assert code == CLOSE_UNAUTHENTICATED


@run_async
async def test_worker_key_is_closed_with_4403_and_a_reason(worker_key):
    assert await _refusal(client_socket(worker_key)) == (CLOSE_FORBIDDEN, "worker keys connect to /ws/worker")


@run_async
async def test_too_many_failed_attempts_are_closed_with_4429(settings):
    settings.FETCHML_RATE_LIMIT_AUTH_FAILURES = "1/m"
    first, _ = await _refusal(client_socket("fetchml_nothing_atall"))
    second, reason = await _refusal(client_socket("fetchml_nothing_atall"))
    assert (first, second) == (CLOSE_UNAUTHENTICATED, CLOSE_RATE_LIMITED)
    assert "try again" in reason


@run_async
async def test_a_frame_sent_to_a_refused_connection_is_ignored():
    socket = client_socket()
    await _refusal(socket)
    await socket.send_to(text_data='{"type": "ping"}')
    assert await socket.receive_nothing(timeout=0.2)


@run_async
async def test_ping_is_answered_with_pong(alice_key):
    socket = await open_client_socket(alice_key)
    try:
        reply = await _ask(socket, {"type": "ping"})
    finally:
        await socket.disconnect()
    assert reply["type"] == "pong"
    assert "timestamp" in reply


# --- task events --------------------------------------------------------


@run_async
async def test_messages_are_handled_without_a_hop_to_the_shared_sync_thread(alice_key, alice_task, monkeypatch):
    hops = []

    async def counted() -> None:
        hops.append(1)

    monkeypatch.setattr(channels.consumer, "aclose_old_connections", counted)
    socket = await open_client_socket(alice_key)
    try:
        pong = await _ask(socket, {"type": "ping"})
        await _move(alice_task, TaskStatus.PREPARING)
        update = await _receive(socket)
    finally:
        await socket.disconnect()
    assert (pong["type"], update["type"]) == ("pong", "task_update")
    assert hops == []


@run_async
async def test_connections_told_of_the_same_change_share_one_read_of_it(alice_key, alice_task, monkeypatch):
    reads = []

    def counted(task_ids: list[str]) -> dict:
        reads.append(task_ids)
        return consumers.task_snapshots(task_ids)

    monkeypatch.setattr(consumers, "shared_snapshots", SharedRead(counted))
    sockets = [await open_client_socket(alice_key) for _ in range(20)]
    try:
        await _move(alice_task, TaskStatus.PREPARING)
        told = [_state(await _receive(socket)) for socket in sockets]
    finally:
        for socket in sockets:
            await socket.disconnect()
    assert set(told) == {("task_update", str(alice_task.id), "preparing")}
    # The live layer hands the crowd one message object: one read of it answers them all.
    assert len(reads) == 1


@run_async
async def test_state_change_of_own_task_sends_task_update(alice_key, alice_task):
    socket = await open_client_socket(alice_key)
    try:
        await _move(alice_task, TaskStatus.PREPARING)
        message = await _receive(socket)
    finally:
        await socket.disconnect()
    assert message["type"] == "task_update"
    assert message["task"]["id"] == str(alice_task.id)
    assert message["task"]["status"] == "preparing"
    assert message["task"]["priority"] == 5
    assert message["task"]["user_id"] == "alice"
    assert "timestamp" in message


@run_async
async def test_final_state_sends_task_complete(alice_key, alice_task):
    socket = await open_client_socket(alice_key)
    try:
        await _move(alice_task, TaskStatus.CANCELLED)
        message = await _receive(socket)
    finally:
        await socket.disconnect()
    assert message["type"] == "task_complete"
    assert message["task"]["status"] == "cancelled"
    assert message["task"]["ended_at"] is not None


@run_async
async def test_each_transition_is_reported_with_its_own_status(alice_key, alice_task):
    socket = await open_client_socket(alice_key)
    try:
        for state in (TaskStatus.PREPARING, TaskStatus.RUNNING, TaskStatus.COMPLETED):
            await _move(alice_task, state)
        messages = [await _receive(socket) for _ in range(3)]
    finally:
        await socket.disconnect()
    assert [(m["type"], m["task"]["status"]) for m in messages] == [
        ("task_update", "preparing"),
        ("task_update", "running"),
        ("task_complete", "completed"),
    ]


@run_async
async def test_changes_made_in_one_transaction_arrive_each_with_its_own_status(alice_key, user, alice_task):
    other = await sync_to_async(task_submit)(owner=user, job_name="second")

    def move_both() -> None:
        with transaction.atomic():
            for state in (TaskStatus.PREPARING, TaskStatus.RUNNING):
                for task in (alice_task, other):
                    assert task_transition(task_id=task.id, to=state) is not None

    socket = await open_client_socket(alice_key)
    try:
        await sync_to_async(move_both)()
        messages = [await _receive(socket) for _ in range(4)]
    finally:
        await socket.disconnect()
    assert [(m["task"]["id"], m["task"]["status"]) for m in messages] == [
        (str(alice_task.id), "preparing"),
        (str(other.id), "preparing"),
        (str(alice_task.id), "running"),
        (str(other.id), "running"),
    ]


@run_async
async def test_user_never_receives_events_of_another_users_task(bob_key, alice_task, bob_task):
    socket = await open_client_socket(bob_key)
    try:
        await _move(alice_task, TaskStatus.PREPARING)
        await _move(alice_task, TaskStatus.CANCELLED)
        await _move(bob_task, TaskStatus.PREPARING)  # the marker
        first = await _receive(socket)
    finally:
        await socket.disconnect()
    assert first["task"]["id"] == str(bob_task.id)


@run_async
async def test_admin_receives_events_of_every_users_tasks(admin_key, alice_task, bob_task):
    socket = await open_client_socket(admin_key)
    try:
        await _move(alice_task, TaskStatus.PREPARING)
        await _move(bob_task, TaskStatus.CANCELLED)
        messages = [await _receive(socket) for _ in range(2)]
    finally:
        await socket.disconnect()
    assert [(m["task"]["user_id"], m["type"]) for m in messages] == [("alice", "task_update"), ("bob", "task_complete")]


# --- subscriptions ------------------------------------------------------


@run_async
async def test_subscribing_to_own_task_narrows_the_stream_to_it(alice_key, user, alice_task):
    other = await sync_to_async(task_submit)(owner=user, job_name="second")
    socket = await open_client_socket(alice_key)
    try:
        reply, state = await _subscribe(socket, alice_task)
        await _move(other, TaskStatus.PREPARING)
        await _move(alice_task, TaskStatus.PREPARING)  # the marker
        first = await _receive(socket)
    finally:
        await socket.disconnect()
    assert reply == {"type": "subscribed", "task_id": str(alice_task.id)}
    assert _state(state) == ("task_update", str(alice_task.id), "queued")
    assert first["task"]["id"] == str(alice_task.id)


@run_async
async def test_subscribed_task_also_streams_its_new_log_lines(alice_key, alice_task):
    socket = await open_client_socket(alice_key)
    try:
        await _subscribe(socket, alice_task)
        lines = [{"stream": "stdout", "line": "epoch 1"}, {"stream": "stderr", "line": "warn"}]
        await sync_to_async(append_lines)(task_id=alice_task.id, attempt=1, lines=lines)
        message = await _receive(socket)
    finally:
        await socket.disconnect()
    assert message["type"] == "task_log"
    assert message["task_id"] == str(alice_task.id)
    assert [(line["stream"], line["line"]) for line in message["lines"]] == [("stdout", "epoch 1"), ("stderr", "warn")]


@run_async
async def test_unsubscribing_from_the_last_task_widens_the_stream_again(alice_key, user, alice_task):
    other = await sync_to_async(task_submit)(owner=user, job_name="second")
    socket = await open_client_socket(alice_key)
    try:
        await _subscribe(socket, alice_task)
        reply = await _ask(socket, {"type": "unsubscribe", "task_id": str(alice_task.id)})
        await _move(other, TaskStatus.PREPARING)
        message = await _receive(socket)
    finally:
        await socket.disconnect()
    assert reply == {"type": "unsubscribed", "task_id": str(alice_task.id)}
    assert message["task"]["id"] == str(other.id)


@run_async
async def test_subscribing_to_another_users_task_is_an_error(bob_key, alice_task, bob_task):
    socket = await open_client_socket(bob_key)
    try:
        reply = await _ask(socket, {"type": "subscribe", "task_id": str(alice_task.id)})
        await _move(alice_task, TaskStatus.PREPARING)
        await _move(bob_task, TaskStatus.PREPARING)  # the marker: bob still gets his own tasks
        first = await _receive(socket)
    finally:
        await socket.disconnect()
    assert reply["type"] == "error"
    assert reply["code"] == "NOT_FOUND"
    assert first["task"]["id"] == str(bob_task.id)


@run_async
async def test_admin_may_subscribe_to_any_task(admin_key, alice_task):
    socket = await open_client_socket(admin_key)
    try:
        reply, _ = await _subscribe(socket, alice_task)
        await _move(alice_task, TaskStatus.PREPARING)
        message = await _receive(socket)
    finally:
        await socket.disconnect()
    assert reply["type"] == "subscribed"
    assert message["task"]["id"] == str(alice_task.id)


@run_async
async def test_admin_subscribed_to_a_users_task_gets_only_that_task(admin_key, user, alice_task):
    other = await sync_to_async(task_submit)(owner=user, job_name="second")
    socket = await open_client_socket(admin_key)
    try:
        await _subscribe(socket, alice_task)
        await _move(other, TaskStatus.PREPARING)
        await _move(alice_task, TaskStatus.CANCELLED)  # the marker
        first = await _receive(socket)
    finally:
        await socket.disconnect()
    assert (first["type"], first["task"]["id"]) == ("task_complete", str(alice_task.id))


@run_async
async def test_unsubscribing_from_a_task_not_subscribed_is_an_error(alice_key, alice_task):
    socket = await open_client_socket(alice_key)
    try:
        reply = await _ask(socket, {"type": "unsubscribe", "task_id": str(alice_task.id)})
    finally:
        await socket.disconnect()
    assert (reply["type"], reply["code"], reply["task_id"]) == ("error", "NOT_FOUND", str(alice_task.id))


@run_async
async def test_unsubscribing_with_no_task_id_is_a_validation_error(alice_key):
    socket = await open_client_socket(alice_key)
    try:
        reply = await _ask(socket, {"type": "unsubscribe", "task_id": "not-a-uuid"})
    finally:
        await socket.disconnect()
    assert (reply["type"], reply["code"]) == ("error", "VALIDATION_ERROR")


# --- the state now, and what the channel layer lost --------------------------


@run_async
async def test_subscribing_to_a_task_that_already_ended_tells_its_final_state(alice_key, alice_task):
    await _move(alice_task, TaskStatus.CANCELLED)
    socket = await open_client_socket(alice_key)
    try:
        _, state = await _subscribe(socket, alice_task)
    finally:
        await socket.disconnect()
    assert _state(state) == ("task_complete", str(alice_task.id), "cancelled")


@run_async
@override_settings(FETCHML_WS_RECHECK_SECONDS=0.05)
async def test_a_change_of_a_task_told_about_whose_message_was_lost_is_told_by_a_recheck(alice_key, alice_task):
    socket = await open_client_socket(alice_key)
    try:
        await _move(alice_task, TaskStatus.PREPARING)
        told = await _receive(socket)
        await sync_to_async(_changed_unannounced)(alice_task, TaskStatus.CANCELLED)
        caught_up = await _receive(socket)
    finally:
        await socket.disconnect()
    assert told["task"]["status"] == "preparing"
    assert _state(caught_up) == ("task_complete", str(alice_task.id), "cancelled")


@run_async
@override_settings(FETCHML_WS_RECHECK_SECONDS=0.05)
async def test_a_subscribed_tasks_change_whose_message_was_lost_is_told_by_a_recheck(alice_key, alice_task):
    socket = await open_client_socket(alice_key)
    try:
        _, state = await _subscribe(socket, alice_task)
        await sync_to_async(_changed_unannounced)(alice_task, TaskStatus.PREPARING)
        caught_up = await _receive(socket)
    finally:
        await socket.disconnect()
    assert state["task"]["status"] == "queued"
    assert (caught_up["type"], caught_up["task"]["status"]) == ("task_update", "preparing")


@run_async
@override_settings(FETCHML_WS_RECHECK_SECONDS=0.05)
async def test_a_recheck_tells_only_what_changed_since_it_was_told(alice_key, user, alice_task):
    other = await sync_to_async(task_submit)(owner=user, job_name="second")
    socket = await open_client_socket(alice_key)
    try:
        await _move(alice_task, TaskStatus.CANCELLED)
        await _move(other, TaskStatus.PREPARING)
        told = [await _receive(socket), await _receive(socket)]
        # Two rechecks, each shown by the change of the other task it catches up on.
        for status in (TaskStatus.RUNNING, TaskStatus.COMPLETED):
            await sync_to_async(_changed_unannounced)(other, status)
            told.append(await _receive(socket))
    finally:
        await socket.disconnect()
    assert [(_state(message)[1], _state(message)[2]) for message in told] == [
        (str(alice_task.id), "cancelled"),
        (str(other.id), "preparing"),
        (str(other.id), "running"),
        (str(other.id), "completed"),
    ]


async def _told_after_a_late_preparing(alice_key, user, alice_task) -> tuple[dict, dict, Task]:
    """Subscribed to `alice_task` and another task, the message of `alice_task` going to `preparing`
    arrives after the subscription's state; then the other task moves (the marker). The state told
    of `alice_task`, the first message after it, and the other task."""
    other = await sync_to_async(task_submit)(owner=user, job_name="second")
    socket = await open_client_socket(alice_key)
    try:
        _, state = await _subscribe(socket, alice_task)
        await _subscribe(socket, other)
        late = {"type": "task.event", "event": "task_update", "task_id": str(alice_task.id), "status": "preparing"}
        await get_channel_layer().group_send(f"tasks.user.{user.pk}", {**late, "priority": 5, "owner_id": user.pk})
        await _move(other, TaskStatus.PREPARING)
        first = await _receive(socket)
    finally:
        await socket.disconnect()
    return state, first, other


@run_async
async def test_a_change_older_than_the_state_told_is_not_told_after_it(alice_key, user, alice_task):
    await _move(alice_task, TaskStatus.PREPARING)
    await _move(alice_task, TaskStatus.RUNNING)
    state, first, other = await _told_after_a_late_preparing(alice_key, user, alice_task)
    assert state["task"]["status"] == "running"
    assert (first["task"]["id"], first["task"]["status"]) == (str(other.id), "preparing")


@run_async
async def test_a_change_already_told_on_subscribing_is_not_told_again(alice_key, user, alice_task):
    await _move(alice_task, TaskStatus.PREPARING)
    state, first, other = await _told_after_a_late_preparing(alice_key, user, alice_task)
    assert state["task"]["status"] == "preparing"
    assert (first["task"]["id"], first["task"]["status"]) == (str(other.id), "preparing")


@run_async
async def test_log_lines_whose_message_was_lost_come_with_the_next_lines(alice_key, alice_task):
    socket = await open_client_socket(alice_key)
    try:
        await _subscribe(socket, alice_task)
        await sync_to_async(_lines_unannounced)(alice_task, "epoch 1", "epoch 2")
        await sync_to_async(append_lines)(
            task_id=alice_task.id, attempt=1, lines=[{"stream": "stdout", "line": "epoch 3"}]
        )
        message = await _receive(socket)
    finally:
        await socket.disconnect()
    assert [line["line"] for line in message["lines"]] == ["epoch 1", "epoch 2", "epoch 3"]


@run_async
@override_settings(FETCHML_WS_RECHECK_SECONDS=0.05)
async def test_log_lines_never_announced_are_sent_by_a_recheck(alice_key, alice_task):
    socket = await open_client_socket(alice_key)
    try:
        await _subscribe(socket, alice_task)
        await sync_to_async(_lines_unannounced)(alice_task, "epoch 1")
        message = await _receive(socket)
    finally:
        await socket.disconnect()
    assert (message["type"], [line["line"] for line in message["lines"]]) == ("task_log", ["epoch 1"])


@run_async
async def test_lines_stored_before_the_subscription_are_not_sent(alice_key, alice_task):
    await sync_to_async(_lines_unannounced)(alice_task, "old")
    socket = await open_client_socket(alice_key)
    try:
        await _subscribe(socket, alice_task)
        await sync_to_async(append_lines)(task_id=alice_task.id, attempt=1, lines=[{"stream": "stdout", "line": "new"}])
        message = await _receive(socket)
    finally:
        await socket.disconnect()
    assert [line["line"] for line in message["lines"]] == ["new"]


def test_snapshots_of_more_tasks_than_one_query_takes_are_all_read(user, monkeypatch):
    monkeypatch.setattr(consumers, "IDS_PER_QUERY", 2)
    ids = [str(task_submit(owner=user, job_name=f"job-{n}").id) for n in range(5)]

    assert sorted(consumers.task_snapshots([*ids, ids[0]])) == sorted(ids)


def test_a_snapshot_tells_times_and_the_failure_reason_as_the_rest_api_does(user):
    task = task_submit(owner=user, job_name="told")
    Task.objects.filter(id=task.id).update(
        status=TaskStatus.FAILED, started_at=timezone.now(), ended_at=timezone.now(), failure_reason=""
    )
    task.refresh_from_db()
    rest = TaskSerializer(task).data

    snapshot = consumers.task_snapshot(str(task.id))

    for field in ("created_at", "started_at", "ended_at", "failure_reason"):
        assert snapshot[field] == rest[field], field
    assert snapshot["created_at"].endswith("Z")


# --- malformed input ----------------------------------------------------


async def _reply_then_pong(key: str, frame: str) -> tuple[dict, dict]:
    """The answer to `frame`, then the answer to a ping on the same connection."""
    socket = await open_client_socket(key)
    try:
        await socket.send_to(text_data=frame)
        reply = await _receive(socket)
        pong = await _ask(socket, {"type": "ping"})
    finally:
        await socket.disconnect()
    return reply, pong


@pytest.mark.parametrize(
    "frame",
    [
        "not json",
        "[1, 2]",
        '{"no": "type"}',
        '{"type": 7}',
        '{"type": "dance"}',
        '{"type": "subscribe"}',
        '{"type": "subscribe", "task_id": "not-a-uuid"}',
        '{"type": "subscribe", "task_id": ["x"]}',
    ],
)
@run_async
async def test_malformed_message_gets_an_error_and_the_connection_stays_open(alice_key, frame):
    reply, pong = await _reply_then_pong(alice_key, frame)
    assert reply["type"] == "error"
    assert reply["error"]
    assert pong["type"] == "pong"


@run_async
async def test_a_message_naming_a_key_twice_gets_an_error_naming_it(alice_key):
    reply, pong = await _reply_then_pong(alice_key, '{"type": "ping", "type": "subscribe"}')
    assert (reply["type"], reply["error"]) == ("error", "the object names 'type' more than once")
    assert pong["type"] == "pong"


@pytest.mark.parametrize(
    "frame",
    [
        "[" * 200_000 + "]" * 200_000,
        '{"type": "subscribe", "task_id": ' + "[" * 5_000 + "]" * 5_000 + "}",
        '{"type": "ping", "extra": ' + '{"a": ' * 65 + "1" + "}" * 65 + "}",
    ],
    ids=["past-the-recursion-limit", "deep-field", "past-the-depth-bound"],
)
@run_async
async def test_deeply_nested_json_gets_an_error_and_the_connection_stays_open(alice_key, frame):
    reply, pong = await _reply_then_pong(alice_key, frame)
    assert (reply["type"], reply["code"]) == ("error", "BAD_REQUEST")
    assert "nested deeper than" in reply["error"]
    assert pong["type"] == "pong"


@run_async
async def test_binary_frame_gets_an_error(alice_key):
    socket = await open_client_socket(alice_key)
    try:
        await socket.send_to(bytes_data=b"\x00\x01")
        reply = await _receive(socket)
    finally:
        await socket.disconnect()
    assert reply["type"] == "error"


@run_async
async def test_unrelated_channel_messages_are_ignored(alice_key, user, alice_task):
    socket = await open_client_socket(alice_key)
    try:
        await get_channel_layer().group_send(f"tasks.user.{user.pk}", {"type": "someone.elses.message"})
        await _move(alice_task, TaskStatus.PREPARING)
        message = await _receive(socket)
    finally:
        await socket.disconnect()
    assert message["type"] == "task_update"


@run_async
async def test_disconnect_leaves_every_joined_group(alice_key, alice_task, group_moves):
    joined, left = group_moves.joined, group_moves.left
    socket = await open_client_socket(alice_key)
    await _subscribe(socket, alice_task)
    await socket.disconnect()

    # The owner's group, the subscribed task's, and the key's (told of its revocation).
    assert len({group for group, _ in joined}) == 3
    assert set(joined) <= set(left)


@run_async
async def test_a_consumer_cancelled_by_its_server_leaves_its_groups_and_stops_rechecking(
    alice_key, alice_task, group_moves, monkeypatch, settings
):
    settings.FETCHML_WS_RECHECK_SECONDS = 0.05
    rechecks = []
    monkeypatch.setattr(consumers.ClientConsumer, "_recheck", lambda self: rechecks.append(1) or asyncio.sleep(0))
    socket = await open_client_socket(alice_key)
    async with asyncio.timeout(TIMEOUT):
        while not rechecks:
            await asyncio.sleep(0.01)
    socket.future.cancel()  # as daphne cancels an application past its close timeout, with no disconnect
    with pytest.raises(asyncio.CancelledError):
        await socket.future
    async with asyncio.timeout(TIMEOUT):
        while sorted(group_moves.left) != sorted(group_moves.joined):
            await asyncio.sleep(0.01)
    rechecked = len(rechecks)
    await asyncio.sleep(0.3)  # six re-check intervals
    assert len({group for group, _ in group_moves.joined}) == 2  # the owner's and the key's
    assert len(rechecks) == rechecked
