"""Walking the chain: every event must hash to its stored hash and link to the one before.

The walk reads the table in keyset pages of a fixed size, so memory stays flat
however long the chain is, and it takes no lock: it checks the chain up to the
head as it was when the walk began (later appends are left for the next walk).

`first_tampered` is the earliest sequence number the walk can no longer vouch
for; every event before it hashed and linked correctly.
"""

import functools
import hashlib
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from django.db import DEFAULT_DB_ALIAS, connection, connections
from django.utils import timezone

from audit.canonical import GENESIS_HASH, HASHED_FIELDS, assemble, format_timestamp, metadata_json
from audit.checkpoints import Checkpoint
from audit.models import AuditEvent, ChainHead

PAGE_SIZE = 20_000
# In the canonical key order, so a row unpacks straight into `assemble`.
_COLUMNS = (*sorted(HASHED_FIELDS), "event_hash")
_SEQ = _COLUMNS.index("sequence_num")


@dataclass
class VerificationResult:
    valid: bool
    total_events: int
    first_tampered: int | None
    chain_root_hash: str
    verified_at: datetime
    reason: str = ""
    checkpoint_checked: bool = False
    checkpoint_signature_verified: bool = False
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Walk:
    """The state of one walk: how far it got and the first problem it met."""

    last_seq: int = 0
    last_hash: str = GENESIS_HASH
    checkpoint_hash: str | None = None
    first_tampered: int | None = None
    reason: str = ""

    def fail(self, sequence_num: int, reason: str) -> None:
        self.first_tampered, self.reason = sequence_num, reason

    def fail_if_earlier(self, sequence_num: int, reason: str) -> None:
        """A problem found after the walk: it counts only if it lies before the walk's own."""
        if self.first_tampered is None or sequence_num < self.first_tampered:
            self.fail(sequence_num, reason)


def _head() -> tuple[int, str] | None:
    return ChainHead.objects.filter(id=1).values_list("sequence_num", "event_hash").first()


# PostgreSQL formats the timestamp itself, in the canonical form: cheaper than
# building a datetime per row only to print it again.
_PG_TIMESTAMP = """to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"""


@functools.cache
def _page_sql(vendor: str, bounded: bool) -> str:
    quote = connection.ops.quote_name
    columns = []
    for name in _COLUMNS:
        column = quote(AuditEvent._meta.get_field(name).column)
        if vendor == "postgresql" and name == "timestamp":
            column = _PG_TIMESTAMP.format(column=column)
        elif vendor == "postgresql" and name == "metadata":
            column = f"{column}::text"  # text, so repeated values hit the _metadata_text cache
        columns.append(column)
    seq = quote("sequence_num")
    upper = f" AND {seq} <= %s" if bounded else ""
    return (
        f"SELECT {', '.join(columns)} FROM {quote(AuditEvent._meta.db_table)} "
        f"WHERE {seq} > %s{upper} ORDER BY {seq} LIMIT {PAGE_SIZE}"
    )


def _pages(upper: int | None) -> Iterator[list[tuple[Any, ...]]]:
    """Raw rows in chain order, one bounded keyset page at a time.

    Raw SQL rather than the ORM: the per-value converters would cost more than
    the hashing. The next page is fetched on a helper thread while the caller
    hashes this one; they take turns on the same connection (so the walk sees
    what this transaction sees), never using it at the same time. At most two
    pages are in memory.
    """
    db = connections[DEFAULT_DB_ALIAS]  # this thread's connection itself, not the thread-local proxy
    sql = _page_sql(db.vendor, upper is not None)

    def fetch(after: int) -> list[tuple[Any, ...]]:
        with db.cursor() as cursor:
            cursor.execute(sql, [after] if upper is None else [after, upper])
            return cursor.fetchall()

    db.inc_thread_sharing()
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-verify") as prefetch:
            pending = prefetch.submit(fetch, 0)
            while page := pending.result():
                pending = prefetch.submit(fetch, page[-1][_SEQ])
                yield page
    finally:
        db.dec_thread_sharing()


def _timestamp(value: datetime | str) -> str:
    if isinstance(value, str):
        return value  # already canonical (PostgreSQL)
    # SQLite hands back naive datetimes, stored in UTC by Django.
    return format_timestamp(value if value.tzinfo is not None else value.replace(tzinfo=UTC))


@functools.lru_cache(maxsize=4096)
def _metadata_text(stored: str) -> str:
    """Canonical JSON of stored metadata; many events share the same few values."""
    return metadata_json(json.loads(stored))


def _metadata(stored: Any) -> str:
    return _metadata_text(stored) if isinstance(stored, str) else metadata_json(stored)


def _walk_rows(walk: _Walk, upper: int | None, checkpoint_seq: int | None) -> None:
    with closing(_pages(upper)) as pages:
        _check_pages(walk, pages, checkpoint_seq)


def _check_pages(walk: _Walk, pages: Iterator[list[tuple[Any, ...]]], checkpoint_seq: int | None) -> None:
    sha256 = hashlib.sha256
    for page in pages:
        for action, error, kind, ip, metadata, prev, resource, seq, success, stamp, user, stored_hash in page:
            expected = walk.last_seq + 1
            if seq != expected:
                walk.fail(expected, f"event {expected} is missing")
                return
            document = assemble(
                action, error, kind, ip, _metadata(metadata), prev, resource, seq, success,
                _timestamp(stamp), user,
            )  # fmt: skip
            if sha256(document).hexdigest() != stored_hash:
                walk.fail(seq, f"event {seq} does not match its hash")
                return
            if prev != walk.last_hash:
                # The successor recorded what its predecessor hashed to when it
                # was appended; the predecessor no longer does (or the link was
                # rewritten). Nothing before the predecessor is in doubt.
                walk.fail(max(seq - 1, 1), f"event {seq} does not link to event {seq - 1}")
                return
            walk.last_seq, walk.last_hash = seq, stored_hash
            if seq == checkpoint_seq:
                walk.checkpoint_hash = stored_hash


def _check_checkpoint(walk: _Walk, checkpoint: Checkpoint, *, walked_all: bool) -> bool:
    """Compare the checkpoint with what the walk saw; whether the comparison could be made.

    It can whenever the walk got as far as the checkpoint's event (everything up to it hashed and
    linked), even if it stopped at a problem after it: a checkpoint that no longer matches then moves
    `first_tampered` back to its sequence number. A walk that stopped before the checkpoint's event
    has already found an earlier problem, and cannot compare.
    """
    if checkpoint.sequence_num == 0:
        if checkpoint.root_hash != GENESIS_HASH:
            walk.fail_if_earlier(1, "checkpoint at 0 must carry the genesis hash")
        return True
    if walk.checkpoint_hash is not None:
        if walk.checkpoint_hash != checkpoint.root_hash:
            walk.fail_if_earlier(
                checkpoint.sequence_num,
                f"event {checkpoint.sequence_num} no longer has the checkpointed root hash: "
                "the chain up to it was rewritten",
            )
        return True
    if walked_all and walk.last_seq < checkpoint.sequence_num:
        walk.fail_if_earlier(
            walk.last_seq + 1,
            f"chain holds {walk.last_seq} events but the checkpoint vouches for {checkpoint.sequence_num}: "
            "truncated or rolled back",
        )
        return True
    return False


def verify_chain(*, checkpoint: Checkpoint | None = None) -> VerificationResult:
    """Check every event up to the current head, and optionally a saved checkpoint."""
    head = _head()
    upper = head[0] if head else None
    walk = _Walk()
    _walk_rows(walk, upper, checkpoint.sequence_num if checkpoint else None)
    # Every stored event up to the head hashed and linked (the head itself is checked next).
    walked_all = walk.first_tampered is None
    if walked_all and head is not None:
        # The head row is written with every append: a chain that stops short
        # of it, or ends elsewhere, lost or changed its tail.
        if walk.last_seq < head[0]:
            walk.fail(walk.last_seq + 1, f"events after {walk.last_seq} are missing (the head is at {head[0]})")
        elif walk.last_hash != head[1]:
            walk.fail(walk.last_seq, f"event {walk.last_seq} does not match the chain head")
    checkpoint_checked = checkpoint is not None and _check_checkpoint(walk, checkpoint, walked_all=walked_all)
    total, root = walk.last_seq, walk.last_hash
    if walk.first_tampered is not None:
        # The walk stopped early; report the table as it stands.
        stored = AuditEvent.objects.all() if upper is None else AuditEvent.objects.filter(sequence_num__lte=upper)
        total = stored.count()
        root = stored.order_by("-sequence_num").values_list("event_hash", flat=True).first() or GENESIS_HASH
    return VerificationResult(
        valid=walk.first_tampered is None,
        total_events=total,
        first_tampered=walk.first_tampered,
        chain_root_hash=root,
        verified_at=timezone.now(),
        reason=walk.reason,
        checkpoint_checked=checkpoint_checked,
    )
