"""Publishing over the channel layer: ids and small payloads, after commit.

Groups:
- `tasks.user.<user_pk>`: every change of that user's tasks (client /ws)
- `tasks.admins`: every task change (admin clients)
- `tasks.task.<task_id>`: one task (job SSE stream, /ws subscribe)
- `scheduler.status`: fleet/queue changes (status SSE stream)
- `scheduler.wake`: the scheduler loops, woken by new work or freed capacity
- `worker.<worker_id>`: one worker agent's connection
"""

import logging
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

logger = logging.getLogger("fetchml.events")

ADMINS_GROUP = "tasks.admins"
STATUS_GROUP = "scheduler.status"
WAKE_GROUP = "scheduler.wake"


def user_group(user_pk: Any) -> str:
    return f"tasks.user.{user_pk}"


def task_group(task_id: Any) -> str:
    return f"tasks.task.{task_id}"


def worker_group(worker_id: Any) -> str:
    return f"worker.{worker_id}"


def send_now(groups: list[str], message: dict) -> None:
    """Send to groups immediately. A channel-layer outage is logged, never raised:
    the database is the record, and every listener also polls as a safety net."""
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        # One trip through async_to_sync for all groups: each trip costs a thread hop (milliseconds).
        async_to_sync(_group_send_all)(layer, groups, message)
    except Exception:
        logger.warning("channel layer send to %s failed", groups, exc_info=True)


async def _group_send_all(layer: Any, groups: list[str], message: dict) -> None:
    for group in groups:
        await layer.group_send(group, message)


def send_on_commit(groups: list[str], message: dict) -> None:
    transaction.on_commit(lambda: send_now(groups, message))


def task_changed(task, *, event: str = "task_update", extra: dict | None = None) -> None:
    """Tell clients, the task's streams and the status stream that a task changed."""
    payload = {
        "type": "task.event",
        "event": event,
        "task_id": str(task.id),
        "status": task.status,
        "priority": task.priority,
        "owner_id": task.owner_id,
        **(extra or {}),
    }
    send_on_commit([user_group(task.owner_id), ADMINS_GROUP, task_group(task.id), STATUS_GROUP], payload)


def wake_scheduler(reason: str) -> None:
    send_on_commit([WAKE_GROUP], {"type": "scheduler.wake", "reason": reason})


def status_changed(reason: str, extra: dict | None = None) -> None:
    send_on_commit([STATUS_GROUP], {"type": "status.event", "event": reason, **(extra or {})})
