"""Reads of the audit chain shared by the API, the commands and the admin."""

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

from django.db.models import QuerySet

from audit.canonical import GENESIS_HASH, HASHED_FIELDS, canonical_bytes
from audit.checkpoints import Checkpoint, sign
from audit.models import AuditEvent

EXPORT_PAGE_SIZE = 2000


def audit_event_list(
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    event_type: str | None = None,
    user_id: str | None = None,
    resource: str | None = None,
) -> QuerySet[AuditEvent]:
    """Events in chain order; `since` and `until` are inclusive."""
    events = AuditEvent.objects.order_by("sequence_num")
    if since is not None:
        events = events.filter(timestamp__gte=since)
    if until is not None:
        events = events.filter(timestamp__lte=until)
    if event_type:
        events = events.filter(event_type=event_type)
    if user_id:
        events = events.filter(user_id=user_id)
    if resource:
        events = events.filter(resource=resource)
    return events


@dataclass(frozen=True)
class ChainRoot:
    root_hash: str
    sequence_num: int
    timestamp: datetime | None

    @property
    def total_events(self) -> int:
        # Sequence numbers are gap-free from 1, so the last one is the count.
        return self.sequence_num


def chain_root() -> ChainRoot:
    """The newest event's hash, read from the events themselves (not the head cache)."""
    last = AuditEvent.objects.order_by("-sequence_num").values_list("sequence_num", "event_hash", "timestamp").first()
    if last is None:
        return ChainRoot(root_hash=GENESIS_HASH, sequence_num=0, timestamp=None)
    return ChainRoot(sequence_num=last[0], root_hash=last[1], timestamp=last[2])


def chain_checkpoint() -> Checkpoint:
    """The current root as a checkpoint, signed when a key is configured."""
    root = chain_root()
    return sign(sequence_num=root.sequence_num, root_hash=root.root_hash, timestamp=root.timestamp)


def export_lines(*, since: int = 0) -> Iterator[bytes]:
    """JSON Lines for outside verifiers: `{"event":<canonical bytes>,"event_hash":"<hex>"}`.

    The event is embedded byte for byte as it was hashed, so a verifier needs
    only SHA-256 over the slice between the fixed prefix and suffix.
    """
    after = since
    while True:
        page = list(AuditEvent.objects.filter(sequence_num__gt=after).order_by("sequence_num")[:EXPORT_PAGE_SIZE])
        if not page:
            return
        for event in page:
            fields = {name: getattr(event, name) for name in HASHED_FIELDS}
            yield b'{"event":' + canonical_bytes(fields) + b',"event_hash":"' + event.event_hash.encode() + b'"}\n'
        after = page[-1].sequence_num
