"""Building audit chains for tests (through the real append path)."""

from django.db import transaction

from audit.models import AuditEvent
from audit.services import Entry, record_many


def append_events(count: int, *, batch: int = 1000, user: str = "alice", event_type: str = "file_access") -> None:
    """Append `count` events, `batch` per transaction, as a busy system would."""
    done = 0
    while done < count:
        size = min(batch, count - done)
        entries = [
            Entry(
                event_type=event_type,
                user=user,
                resource=f"file:data/{done + i}.csv",
                action="read",
                metadata={"bytes": done + i},
            )
            for i in range(size)
        ]
        with transaction.atomic():
            record_many(entries)
        done += size


def event(sequence_num: int) -> AuditEvent:
    return AuditEvent.objects.get(sequence_num=sequence_num)
