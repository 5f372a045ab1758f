"""Publishing after commit: one batch per transaction, nothing from a rollback."""

import asyncio
import time
import uuid

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import transaction

from fetchml import events
from fetchml.channel_layer import PUBLISH_TIMEOUT_SECONDS, RedisChannelLayer
from fetchml.testing import ThreadedGate
from tasks.tests.factories import TaskFactory

pytestmark = pytest.mark.django_db(transaction=True)

GROUP = "tests.events"


@pytest.fixture
def listener():
    """A channel in GROUP, and a function draining what reached it."""
    layer = get_channel_layer()
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(GROUP, channel)

    def received() -> list[dict]:
        async def drain() -> list[dict]:
            messages = []
            while True:
                try:
                    async with asyncio.timeout(0.2):
                        messages.append(await layer.receive(channel))
                except TimeoutError:
                    return messages

        return async_to_sync(drain)()

    yield received
    async_to_sync(layer.group_discard)(GROUP, channel)


@pytest.fixture
def publications(monkeypatch) -> list[int]:
    """The size of each batch published, one publication per `send_batch_now`."""
    counted: list[int] = []
    real = events._publish

    def counting(layer, batch):
        counted.append(len(batch))
        return real(layer, batch)

    monkeypatch.setattr(events, "_publish", counting)
    return counted


def message(number: int) -> dict:
    return {"type": "test.event", "number": number}


def test_a_transaction_publishes_its_messages_at_once_in_order(listener, publications):
    with transaction.atomic():
        for number in range(5):
            events.send_on_commit([GROUP], message(number))
        assert publications == []  # nothing leaves before the commit

    assert publications == [5]
    assert [m["number"] for m in listener()] == [0, 1, 2, 3, 4]


def test_a_rolled_back_transaction_publishes_nothing_and_the_next_one_its_own(listener, publications):
    with pytest.raises(RuntimeError), transaction.atomic():
        events.send_on_commit([GROUP], message(1))
        raise RuntimeError("roll back")

    with transaction.atomic():
        events.send_on_commit([GROUP], message(2))

    assert publications == [1]
    assert [m["number"] for m in listener()] == [2]


def test_a_rolled_back_savepoint_drops_messages_first_sent_inside_it(listener, publications):
    with transaction.atomic():
        with pytest.raises(RuntimeError), transaction.atomic():
            events.send_on_commit([GROUP], message(1))
            raise RuntimeError("roll back the savepoint")
        events.send_on_commit([GROUP], message(2))

    assert [m["number"] for m in listener()] == [2]


def test_messages_sent_together_on_commit_leave_with_the_others_in_order(listener, publications):
    with transaction.atomic():
        events.send_on_commit([GROUP], message(0))
        events.send_all_on_commit([([GROUP], message(1)), ([GROUP], message(2))])
        events.send_on_commit([GROUP], message(3))
        assert publications == []

    assert publications == [4]
    assert [m["number"] for m in listener()] == [0, 1, 2, 3]


def test_messages_sent_together_outside_a_transaction_leave_at_once_together(listener, publications):
    events.send_all_on_commit([([GROUP], message(1)), ([GROUP], message(2))])

    assert publications == [2]
    assert [m["number"] for m in listener()] == [1, 2]


def test_outside_a_transaction_a_message_leaves_at_once(listener, publications):
    events.send_on_commit([GROUP], message(7))

    assert publications == [1]
    assert [m["number"] for m in listener()] == [7]


def test_each_group_gets_its_messages_in_order_when_a_batch_spans_groups(listener, publications):
    layer = get_channel_layer()
    other = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)("tests.events.other", other)
    with transaction.atomic():
        for number in range(6):
            groups = [GROUP, "tests.events.other"] if number % 2 else [GROUP]
            events.send_on_commit(groups, message(number))

    async def drain_other() -> list[int]:
        return [(await layer.receive(other))["number"] for _ in range(3)]

    assert [m["number"] for m in listener()] == [0, 1, 2, 3, 4, 5]
    assert async_to_sync(drain_other)() == [1, 3, 5]
    async_to_sync(layer.group_discard)("tests.events.other", other)


def task_event(number: int) -> dict:
    return {"type": "task.event", "event": "task_update", "task_id": str(number), "status": "running"}


def test_task_changes_of_one_transaction_reach_a_group_as_one_message_in_order(listener, publications):
    with transaction.atomic():
        events.send_on_commit([GROUP], message(0))
        for number in range(1, 4):
            events.send_on_commit([GROUP], task_event(number))
        events.send_on_commit([GROUP], message(4))
        events.send_on_commit([GROUP], task_event(5))

    received = listener()

    assert [m["type"] for m in received] == ["test.event", "task.events", "test.event", "task.event"]
    assert [m["task_id"] for m in events.task_events_of(received[1])] == ["1", "2", "3"]
    assert events.task_events_of(received[3]) == [received[3]]


def test_a_transaction_wakes_the_scheduler_once(listener, publications):
    with transaction.atomic():
        for reason in ("capacity_freed", "task_completed", "capacity_freed"):
            events.send_on_commit([GROUP], {"type": "scheduler.wake", "reason": reason})

    assert listener() == [{"type": "scheduler.wake", "reason": "capacity_freed"}]


def test_a_transactions_one_wake_up_says_new_work_if_any_of_its_wake_ups_did(listener, publications):
    with transaction.atomic():
        for reason in ("capacity_freed", "task_queued", "task_failed"):
            events.send_on_commit([GROUP], {"type": "scheduler.wake", "reason": reason})

    assert listener() == [{"type": "scheduler.wake", "reason": "task_queued"}]


def test_a_task_change_is_not_sent_to_the_tasks_own_group(user):
    task = TaskFactory(owner=user)
    with transaction.atomic():
        events.task_changed(task)
        [(groups, _)] = transaction.get_connection().fetchml_outbox

    assert groups == [events.user_group(user.pk), events.ADMINS_GROUP, events.STATUS_GROUP]


def test_a_batch_sends_what_starts_work_before_the_clients_task_events(monkeypatch):
    layer = get_channel_layer()
    log: list[tuple[str, str]] = []

    def recording(send, groups_of):
        async def recorded(*args) -> None:
            groups = groups_of(*args)
            log.extend(("start", group) for group in groups)
            await asyncio.sleep(0)  # lets the other sends of the batch run meanwhile, if any were started
            await send(*args)
            log.extend(("end", group) for group in groups)

        return recorded

    def recording_blocking(send):
        def recorded(sends) -> None:
            log.extend(("start", group) for group, _ in sends)
            send(sends)
            log.extend(("end", group) for group, _ in sends)

        return recorded

    # One send per group (the in-memory layer), or all of a kind of group in one (the Redis layer,
    # from this thread, or from an event loop where it cannot send from the thread).
    monkeypatch.setattr(layer, "group_send", recording(layer.group_send, lambda group, message: [group]))
    if hasattr(layer, "group_send_all"):
        all_groups = recording(layer.group_send_all, lambda sends: [group for group, _ in sends])
        monkeypatch.setattr(layer, "group_send_all", all_groups)
        monkeypatch.setattr(layer, "group_send_all_blocking", recording_blocking(layer.group_send_all_blocking))
    clients = [events.user_group(1), events.ADMINS_GROUP, events.STATUS_GROUP]
    worker = events.worker_group("w-1")
    batch = [(clients, task_event(1)), ([events.WAKE_GROUP], {"type": "scheduler.wake"}), ([worker], message(2))]

    events.send_batch_now(batch)

    urgent = {events.WAKE_GROUP, worker}
    last_urgent_end = max(i for i, (what, group) in enumerate(log) if what == "end" and group in urgent)
    first_client_start = min(i for i, (what, group) in enumerate(log) if what == "start" and group in clients)
    assert last_urgent_end < first_client_start
    assert {group for _, group in log} == urgent | set(clients)


@pytest.mark.skipif(not settings.REDIS_URL, reason="needs Redis: set REDIS_URL=redis://... (CI always does)")
def test_on_the_redis_layer_a_publication_leaves_from_the_publishing_thread(listener, monkeypatch):
    def no_hop(function):
        raise AssertionError("handed to an event loop")

    monkeypatch.setattr(events, "async_to_sync", no_hop)
    with transaction.atomic():
        events.send_on_commit([GROUP], message(1))
        events.send_on_commit([events.WAKE_GROUP], {"type": "scheduler.wake", "reason": "test"})

    assert [m["number"] for m in listener()] == [1]


def test_an_assign_notice_without_a_count_is_counted_when_opened():
    _, notice = events.assign_notice("w", '[{"type":"assign"},{"type":"assign"}]', 2)
    del notice["count"]

    assert events.encoded_assigns_of(notice) == ('[{"type":"assign"},{"type":"assign"}]', 2)


@pytest.mark.skipif(not settings.REDIS_URL, reason="needs Redis: set REDIS_URL=redis://... (CI always does)")
@pytest.mark.timeout(20)  # the receive's socket time-out (15 s) for each kind would exceed it
def test_a_publication_to_a_silent_redis_is_dropped_after_one_short_time_out(monkeypatch, caplog):
    config = settings.CHANNEL_LAYERS["default"]["CONFIG"]
    with ThreadedGate(settings.REDIS_URL) as gate:
        hosts = [config["hosts"][0] | {"address": gate.url}]
        layer = RedisChannelLayer(**(config | {"hosts": hosts, "prefix": f"test-{uuid.uuid4().hex}"}))
        monkeypatch.setattr(events, "get_channel_layer", lambda: layer)
        gate.mute()
        started = time.monotonic()
        events.send_batch_now([(["scheduler.wake"], {"type": "wake"}), (["tasks.admins"], {"type": "task_update"})])
        took = time.monotonic() - started

    assert took < 2 * PUBLISH_TIMEOUT_SECONDS + 5, f"took {took:.1f} s"
    # What starts work failed; the clients' events were not tried against the same silence.
    assert caplog.text.count("publication dropped") == 1
