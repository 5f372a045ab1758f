"""Publishing over the channel layer: ids and small payloads, after commit.

The one larger payload, a worker's `assign` messages, travels sealed: they
carry plugin secrets, and the layer (Redis) is no place for those in clear.

Groups:
- `tasks.user.<user_pk>`: every change of that user's tasks (client /ws, and
  the streams of one task, which pick its events)
- `tasks.admins`: every task change (admin clients)
- `tasks.task.<task_id>`: one task's new log lines (log follow, /ws subscribe)
- `scheduler.status`: fleet/queue changes (status SSE stream)
- `scheduler.wake`: the scheduler loops, woken by new work or freed capacity
- `worker.<worker_id>`: one worker agent's connection
- `api_key.<key_id>`: every live connection authenticated with that key (worker
  and client WebSockets, SSE streams), told when the key is revoked
"""

import asyncio
import contextlib
import json
import logging
from collections.abc import Iterable, Iterator
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

from fetchml.sealing import seal, unseal

logger = logging.getLogger("fetchml.events")

ADMINS_GROUP = "tasks.admins"
STATUS_GROUP = "scheduler.status"
WAKE_GROUP = "scheduler.wake"
CONCURRENT_GROUP_SENDS = 16


def user_group(user_pk: Any) -> str:
    return f"tasks.user.{user_pk}"


def task_group(task_id: Any) -> str:
    return f"tasks.task.{task_id}"


_WORKER_GROUP_PREFIX = "worker."


def worker_group(worker_id: Any) -> str:
    return f"{_WORKER_GROUP_PREFIX}{worker_id}"


def api_key_group(key_id: Any) -> str:
    return f"api_key.{key_id}"


API_KEY_REVOKED = "api_key.revoked"


def api_key_revoked(key_id: Any) -> None:
    """After commit, end every live connection authenticated with the key (each closes itself)."""
    send_on_commit([api_key_group(key_id)], {"type": API_KEY_REVOKED})


def send_now(groups: list[str], message: dict) -> None:
    """Send to groups immediately. A channel-layer outage is logged, never raised:
    the database is the record, and every listener also polls as a safety net."""
    send_batch_now([(groups, message)])


def send_batch_now(batch: list[tuple[list[str], dict]]) -> None:
    """Send several (groups, message) pairs in order, as one publication: on the Redis layer from
    this thread (its blocking send), on other layers through one `async_to_sync` hop to an event
    loop (a thread hand-off, which delayed each `assign` by about 0.2 ms on the Redis layer)."""
    layer = get_channel_layer()
    if layer is None or not batch:
        return
    try:
        _publish(layer, batch)
    except Exception:
        logger.warning("channel layer batch of %d message(s) failed", len(batch), exc_info=True)


def _publish(layer: Any, batch: list[tuple[list[str], dict]]) -> None:
    if getattr(layer, "sends_blocking", False):
        for sends in _by_kind(batch):
            try:
                layer.group_send_all_blocking(_flattened(sends))
            except Exception:
                # Redis out of reach or silent: the rest of the publication would wait out the same
                # failure. Dropped: listeners re-read the database, unacknowledged assigns are sent again.
                logger.warning("channel layer send to %s failed; publication dropped", ", ".join(sends), exc_info=True)
                return
        return
    async_to_sync(_send_batch)(layer, batch)


def send_on_commit(groups: list[str], message: dict) -> None:
    """Send after the current transaction commits (at once outside one).

    All messages of one transaction leave in one batch, as one publication
    (`send_batch_now`): a dispatch round placing 128 tasks publishes once,
    not 256 times. A rolled-back transaction sends nothing.
    """
    send_all_on_commit([(groups, message)])


def send_all_on_commit(batch: list[tuple[list[str], dict]]) -> None:
    """`send_on_commit` for several (groups, message) pairs, in order."""
    connection = transaction.get_connection()
    if not connection.in_atomic_block:
        send_batch_now(batch)
        return
    _outbox(connection).extend((list(groups), message) for groups, message in batch)


class _Outbox(list):
    """The messages of one transaction, sent by its on-commit hook."""

    def __call__(self) -> None:
        send_batch_now(list(self))


def _outbox(connection: Any) -> _Outbox:
    """This transaction's outbox: the one whose hook is still registered, else a new one.

    Django drops the hooks of a rolled-back transaction (or savepoint) and
    clears them when it runs them, so a missing hook means a new transaction.
    A message added inside a savepoint that is rolled back while the outer
    transaction commits is still sent: such a message (ids a listener re-reads)
    costs a read, never a wrong state. A block whose messages must not outlive
    its savepoint runs inside `unsent_if_rolled_back`.
    """
    outbox = getattr(connection, "fetchml_outbox", None)
    if outbox is None or not any(hook is outbox for _, hook, _ in connection.run_on_commit):
        outbox = _Outbox()
        connection.fetchml_outbox = outbox
        transaction.on_commit(outbox)
    return outbox


@contextlib.contextmanager
def unsent_if_rolled_back() -> Iterator[None]:
    """Drop what the block queued for the current transaction's commit if the block raises.

    For a savepoint the caller rolls back and survives (the outer transaction
    commits): without this its messages would still leave, and some (a
    worker's `assign`) are more than ids a listener re-reads.
    """
    connection = transaction.get_connection()
    if not connection.in_atomic_block:
        yield
        return
    outbox = _outbox(connection)
    kept = len(outbox)
    try:
        yield
    except BaseException:
        del outbox[kept:]
        raise


def _by_kind(batch: list[tuple[list[str], dict]]) -> list[dict[str, list[dict]]]:
    """The batch as sends to groups, in the order they leave: what starts work (the scheduler's
    wake-up, a worker's assigns), then what only informs (clients' task events); sent together,
    the latter's share of the work would delay the former. Each group's messages stay in order
    (one listener sees one task's changes in the order they were made)."""
    by_group: dict[str, list[dict]] = {}
    for groups, message in batch:
        for group in groups:
            by_group.setdefault(group, []).append(message)
    by_group = {group: coalesced(messages) for group, messages in by_group.items()}
    kinds = [
        {group: messages for group, messages in by_group.items() if _starts_work(group) is urgent}
        for urgent in (True, False)
    ]
    return [sends for sends in kinds if sends]


def _flattened(sends: dict[str, list[dict]]) -> list[tuple[str, dict]]:
    return [(group, message) for group, messages in sends.items() for message in messages]


@contextlib.contextmanager
def _failure_logged(groups: Iterable[str]) -> Iterator[None]:
    """A failed send is logged, not raised: the database is the record, and listeners also poll."""
    try:
        yield
    except Exception:
        logger.warning("channel layer send to %s failed", ", ".join(groups), exc_info=True)


async def _send_batch(layer: Any, batch: list[tuple[list[str], dict]]) -> None:
    for sends in _by_kind(batch):
        await _send_to_groups(layer, sends)


async def _send_to_groups(layer: Any, sends: dict[str, list[dict]]) -> None:
    if hasattr(layer, "group_send_all"):
        # The Redis layer: all of them in two round trips, not two a group (fetchml/channel_layer.py).
        with _failure_logged(sends):
            await layer.group_send_all(_flattened(sends))
        return
    # Other layers: the groups concurrently, bounded (each send may hold a connection of a pool).
    slots = asyncio.Semaphore(CONCURRENT_GROUP_SENDS)
    await asyncio.gather(*(_send_in_order(layer, group, messages, slots) for group, messages in sends.items()))


def _starts_work(group: str) -> bool:
    return group == WAKE_GROUP or group.startswith(_WORKER_GROUP_PREFIX)


async def _send_in_order(layer: Any, group: str, messages: list[dict], slots: asyncio.Semaphore) -> None:
    async with slots:
        for message in messages:
            with _failure_logged([group]):
                await layer.group_send(group, message)


def coalesced(messages: list[dict]) -> list[dict]:
    """One group's messages of a transaction, fewer: consecutive task changes travel as one
    `task.events` message (a dispatch round or a batch of reports changes hundreds of
    tasks), and the scheduler is woken once (for new work, if any wake-up was for it)."""
    out: list[dict] = []
    wake_at = None  # where the one wake-up goes: the first, carrying new work's reason if any has one
    for message in messages:
        kind = message.get("type")
        if kind == "scheduler.wake":
            if wake_at is None:
                wake_at = len(out)
                out.append(message)
            elif out[wake_at].get("reason") in CAPACITY_WAKE_REASONS:
                out[wake_at] = message
        elif kind == "task.event" and out and out[-1]["type"] in ("task.event", "task.events"):
            if out[-1]["type"] == "task.event":
                out[-1] = {"type": "task.events", "events": [out[-1]]}
            out[-1]["events"].append(message)
        else:
            out.append(message)
    return out


def task_events_of(message: dict, *, task_id: str | None = None) -> list[dict]:
    """The single `task.event` messages carried by a channel-layer message (none for other types);
    with `task_id`, only that task's state changes (the streams of one task pick them this way)."""
    if message.get("type") == "task.event":
        found = [message]
    elif message.get("type") == "task.events":
        found = [event for event in message.get("events") or [] if isinstance(event, dict)]
    else:
        return []
    if task_id is None:
        return found
    return [event for event in found if event.get("task_id") == task_id and event.get("status")]


def task_changed(task, *, event: str = "task_update", extra: dict | None = None) -> None:
    """Tell the owner's and the admins' clients and the status stream that a task changed.

    Not the task's own group (logs only): streams of one task listen to its
    owner's group and pick its events, so a batch changing hundreds of tasks
    costs three group sends, not one per task.
    """
    send_on_commit(*task_event(task, event=event, extra=extra))


def task_event(task, *, event: str = "task_update", extra: dict | None = None) -> tuple[list[str], dict]:
    """(groups, message) of `task_changed`, to send later or with others (`send_all_on_commit`)."""
    payload = {
        "type": "task.event",
        "event": event,
        "task_id": str(task.id),
        "status": task.status,
        "priority": task.priority,
        "owner_id": task.owner_id,
        **(extra or {}),
    }
    return [user_group(task.owner_id), ADMINS_GROUP, STATUS_GROUP], payload


_ASSIGNS_PURPOSE = "fetchml.events.assigns"


def assign_notice(worker_id: Any, encoded: str, count: int) -> tuple[list[str], dict]:
    """(groups, message) handing a worker's connection `count` `assign` messages to relay, sealed:
    `encoded`, the JSON text of their list, as the connection sends it on."""
    sealed = seal(encoded.encode(), purpose=_ASSIGNS_PURPOSE)
    return [worker_group(worker_id)], {"type": "worker.assign", "assigns": sealed, "count": count}


def encoded_assigns_of(notice: dict) -> tuple[str, int]:
    """The JSON text of an `assign_notice`'s messages and their count (raises `Unsealable` if not
    sealed by this deployment)."""
    encoded = unseal(notice["assigns"], purpose=_ASSIGNS_PURPOSE).decode()
    count = notice.get("count")
    return encoded, len(json.loads(encoded)) if count is None else count  # None: sent before counts were


def assigns_of(notice: dict) -> list[dict]:
    """The `assign` messages of an `assign_notice`."""
    return json.loads(encoded_assigns_of(notice)[0])


# Wake-ups that only free capacity: they matter to a scheduler with work left waiting.
CAPACITY_WAKE_REASONS = frozenset({"capacity_freed", "task_completed", "task_failed", "task_cancelled"})


def wake_scheduler(reason: str) -> None:
    send_on_commit(*scheduler_wake(reason))


def scheduler_wake(reason: str) -> tuple[list[str], dict]:
    """(groups, message) of `wake_scheduler`."""
    return [WAKE_GROUP], {"type": "scheduler.wake", "reason": reason}


def status_changed(reason: str, extra: dict | None = None) -> None:
    send_on_commit([STATUS_GROUP], {"type": "status.event", "event": reason, **(extra or {})})
