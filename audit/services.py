"""Writes to the audit chain. Nothing else writes audit rows.

`record` / `record_many` append inside the caller's transaction, so a change
and its audit events commit (or roll back) together. The chain head row stays
locked until that transaction ends, so callers record as the last write of
their transaction and group events produced together in one `record_many`
(or, where the events come from many calls, inside `appended_together`).
"""

import contextlib
import functools
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from audit.canonical import GENESIS_HASH, assemble, format_timestamp, metadata_json, normalise_metadata
from audit.checkpoints import Checkpoint, signature_matches, signing_configured, warnings_for
from audit.models import AuditEvent, ChainHead, EventType
from audit.verification import VerificationResult, verify_chain
from fetchml.bulk import insert_json_rows, insert_rows
from fetchml.compiled import compiled_once

_EVENT_TYPES = frozenset(EventType.values)
_LIMITS = {
    "user_id": AuditEvent._meta.get_field("user_id").max_length,
    "resource": AuditEvent._meta.get_field("resource").max_length,
    "action": AuditEvent._meta.get_field("action").max_length,
    "ip_address": AuditEvent._meta.get_field("ip_address").max_length,
}


@dataclass
class Entry:
    event_type: str
    user: AbstractBaseUser | str | None = None
    resource: str = ""
    action: str = ""
    success: bool = True
    ip_address: str | None = None
    error: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)


def _user_id(user: AbstractBaseUser | str | None) -> str:
    if user is None:
        return ""
    if isinstance(user, str):
        return user
    return user.get_username() if user.is_authenticated else ""


def _row(entry: Entry) -> dict[str, Any]:
    if entry.event_type not in _EVENT_TYPES:
        raise ValueError(f"unknown audit event type {entry.event_type!r}")
    return {
        "event_type": entry.event_type,
        "user_id": _user_id(entry.user)[: _LIMITS["user_id"]],
        "resource": (entry.resource or "")[: _LIMITS["resource"]],
        "action": (entry.action or "")[: _LIMITS["action"]],
        "success": bool(entry.success),
        "ip_address": (entry.ip_address or "")[: _LIMITS["ip_address"]],
        "error": entry.error or "",
        "metadata": normalise_metadata(entry.metadata),
    }


_locked_head = compiled_once(lambda: ChainHead.objects.select_for_update().filter(id=1))


def _lock_head() -> ChainHead:
    """The chain head, locked until the caller's transaction ends.

    A missing head (new database, or one emptied by `flush`) is recreated from
    the last stored event, never blindly from genesis, so the next append
    always links to what the table holds.
    """
    head = next(iter(_locked_head()), None)
    if head is not None:
        return head
    last = AuditEvent.objects.order_by("-sequence_num").values_list("sequence_num", "event_hash").first()
    sequence_num, last_hash = last if last else (0, GENESIS_HASH)
    try:
        with transaction.atomic():
            ChainHead.objects.create(id=1, sequence_num=sequence_num, event_hash=last_hash)
    except IntegrityError:
        pass  # another writer created it first; lock theirs
    return ChainHead.objects.select_for_update().get(id=1)


@functools.cache
def _head_update_sql() -> str:
    quote = connection.ops.quote_name
    meta = ChainHead._meta
    columns = {name: quote(meta.get_field(name).column) for name in ("id", "sequence_num", "event_hash")}
    return (
        f"UPDATE {quote(meta.db_table)} SET {columns['sequence_num']} = %s, {columns['event_hash']} = %s "
        f"WHERE {columns['id']} = 1"
    )


def record_many(entries: list[Entry]) -> None:
    """Append several events under one acquisition of the chain head (inside an
    `appended_together` block, with the block's other events when it ends)."""
    pending = _pending_events()
    if pending is not None:
        pending.extend(entries)
        return
    _append(entries)


def _pending_events() -> list[Entry] | None:
    """The events the open `appended_together` block of this transaction collects, if any."""
    return getattr(transaction.get_connection(), "fetchml_audit_pending", None)


def _append(entries: list[Entry]) -> list[dict[str, Any]]:
    """Append `entries`; the stored rows (column -> value)."""
    if not entries:
        return []
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("audit events must be recorded inside the transaction of the change")
    # Everything but the links is prepared before taking the lock, so the lock
    # is held only for the append itself.
    rows = [_row(entry) for entry in entries]
    metadata_texts = [metadata_json(row["metadata"]) for row in rows]
    head = _lock_head()
    # Taken under the lock so timestamps never go backwards along the chain.
    now = timezone.now()
    stamp = format_timestamp(now)
    sequence, prev_hash = head.sequence_num, head.event_hash
    # The hashed document holds every column but the hash, spelled as PostgreSQL reads it from
    # JSON: with the hash added, it is the stored row as the insert below takes it there.
    stored = []
    for row, metadata_text in zip(rows, metadata_texts, strict=True):
        sequence += 1
        document = assemble(
            row["action"],
            row["error"],
            row["event_type"],
            row["ip_address"],
            metadata_text,
            prev_hash,
            row["resource"],
            sequence,
            row["success"],
            stamp,
            row["user_id"],
        )
        row.update(sequence_num=sequence, timestamp=now, prev_hash=prev_hash)
        prev_hash = row["event_hash"] = hashlib.sha256(document).hexdigest()
        stored.append(f'{document.decode()[:-1]},"event_hash":"{prev_hash}"}}')
    # The events and the new head in one statement where the database allows it.
    then = (_head_update_sql(), [sequence, prev_hash])
    if connection.vendor == "postgresql":
        insert_json_rows(AuditEvent, stored, then=then)
    else:
        insert_rows([AuditEvent(**row) for row in rows], then=then)
    return rows


def record(
    *,
    event_type: str,
    user: AbstractBaseUser | str | None = None,
    resource: str = "",
    action: str = "",
    success: bool = True,
    ip_address: str | None = None,
    error: str = "",
    metadata: dict[str, Any] | None = None,
) -> AuditEvent | None:
    """Append one event to the chain, in the caller's transaction (None: appended later,
    with the others of an `appended_together` block)."""
    entry = Entry(
        event_type=event_type,
        user=user,
        resource=resource,
        action=action,
        success=success,
        ip_address=ip_address,
        error=error,
        metadata=metadata or {},
    )
    pending = _pending_events()
    if pending is not None:
        pending.append(entry)
        return None
    return AuditEvent(**_append([entry])[0])


@contextlib.contextmanager
def appended_together() -> Iterator[None]:
    """Collect the events `record`ed inside and append them in one go on leaving.

    For a transaction that records events from many calls (a batch of run
    reports, a submission and the dispatch round inside it): the chain head
    is then locked once, at the end, instead of from the first event until
    the commit, so concurrent writers wait for each other only for the
    append itself. Enter it inside that transaction; a savepoint inside it
    that may roll back on its own runs in `unrecorded_if_rolled_back` (else
    its events would still be appended). An exception discards the events
    with the transaction. Nested uses join the outermost.
    """
    if _pending_events() is not None:
        yield
        return
    conn = transaction.get_connection()
    if not conn.in_atomic_block:
        raise RuntimeError("audit events must be recorded inside the transaction of the change")
    pending: list[Entry] = []
    conn.fetchml_audit_pending = pending
    try:
        yield
    finally:
        conn.fetchml_audit_pending = None
    record_many(pending)


@contextlib.contextmanager
def unrecorded_if_rolled_back() -> Iterator[None]:
    """Drop the events the block added to an open `appended_together` block if the block raises.

    For a savepoint the caller rolls back and survives (the outer transaction
    commits): without this its events would still be appended when the
    `appended_together` block ends. Outside such a block the events are
    appended at once, in the savepoint, and roll back with it.
    """
    pending = _pending_events()
    if pending is None:
        yield
        return
    kept = len(pending)
    try:
        yield
    except BaseException:
        del pending[kept:]
        raise


def audit_verify(
    *,
    user: AbstractBaseUser | str | None,
    ip_address: str | None = None,
    checkpoint: Checkpoint | None = None,
    source: str = "api",
    record_event: bool = True,
) -> VerificationResult:
    """Walk the whole chain, then record that it was verified.

    The walk takes no lock and runs outside any transaction of ours, so it
    never holds up appends; the `audit_verified` event is written afterwards
    in a transaction of its own (skipped with `record_event=False`, for
    auditors connected with a read-only role).
    """
    result = verify_chain(checkpoint=checkpoint)
    result.checkpoint_signature_verified = checkpoint is not None and signature_matches(checkpoint)
    result.warnings = warnings_for(checkpoint)
    if not record_event:
        return result
    metadata: dict[str, Any] = {
        "source": source,
        "valid": result.valid,
        "total_events": result.total_events,
        "first_tampered": result.first_tampered,
        "chain_root_hash": result.chain_root_hash,
        "signing_configured": signing_configured(),
    }
    if checkpoint is not None:
        metadata["checkpoint"] = {
            "sequence_num": checkpoint.sequence_num,
            "root_hash": checkpoint.root_hash,
            "signature_verified": result.checkpoint_signature_verified,
            "checked": result.checkpoint_checked,
        }
    with transaction.atomic():
        record(
            event_type=EventType.AUDIT_VERIFIED,
            user=user,
            resource="audit_chain",
            action="verify",
            success=result.valid,
            ip_address=ip_address,
            error="" if result.valid else result.reason,
            metadata=metadata,
        )
    return result
