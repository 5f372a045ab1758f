"""Signed checkpoints: the chain root, vouched for by a key the database never sees.

Anyone who can write to the database can recompute a whole chain, so a
checkpoint saved outside it (sequence number, root hash, time, HMAC-SHA256
signature with FETCHML_AUDIT_SIGNING_KEY) is what exposes truncation, rollback
and full rewrites later. Without a configured key nothing is signed: an
unsigned checkpoint is only as trustworthy as the place it was kept.
"""

import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.utils.dateparse import parse_datetime

from audit.canonical import format_timestamp, is_hex_digest
from fetchml.conf import app_settings

SIGNATURE_ALGORITHM = "HMAC-SHA256"
NO_KEY_WARNING = (
    "FETCHML_AUDIT_SIGNING_KEY is not set: chain roots are not signed, so a saved root only protects "
    "against tampering if it was kept somewhere the database's writers cannot reach"
)


class CheckpointError(ValueError):
    """A checkpoint that is malformed or whose signature does not match."""


@dataclass(frozen=True)
class Checkpoint:
    sequence_num: int
    root_hash: str
    timestamp: datetime | None = None
    signature: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "sequence_num": self.sequence_num,
            "root_hash": self.root_hash,
            "timestamp": format_timestamp(self.timestamp) if self.timestamp else None,
            "signature": self.signature,
            "signature_algorithm": SIGNATURE_ALGORITHM if self.signature else None,
        }


def signing_configured() -> bool:
    return bool(app_settings.AUDIT_SIGNING_KEY)


def signed_message(*, sequence_num: int, root_hash: str, timestamp: datetime | None) -> bytes:
    """What the signature covers: the three fields as canonical JSON."""
    document = {
        "root_hash": root_hash,
        "sequence_num": sequence_num,
        "timestamp": format_timestamp(timestamp) if timestamp else None,
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _mac(message: bytes) -> str:
    return hmac.new(app_settings.AUDIT_SIGNING_KEY.encode("utf-8"), message, hashlib.sha256).hexdigest()


def sign(*, sequence_num: int, root_hash: str, timestamp: datetime | None) -> Checkpoint:
    """A checkpoint for this root, signed if a key is configured."""
    signature = None
    if signing_configured():
        signature = _mac(signed_message(sequence_num=sequence_num, root_hash=root_hash, timestamp=timestamp))
    return Checkpoint(sequence_num=sequence_num, root_hash=root_hash, timestamp=timestamp, signature=signature)


def signature_matches(checkpoint: Checkpoint) -> bool:
    if not (checkpoint.signature and signing_configured()):
        return False
    message = signed_message(
        sequence_num=checkpoint.sequence_num, root_hash=checkpoint.root_hash, timestamp=checkpoint.timestamp
    )
    return hmac.compare_digest(_mac(message), checkpoint.signature)


def parse(data: Any) -> Checkpoint:
    """A checkpoint from its JSON form (as exported), checked field by field.

    A signed checkpoint must carry this server's signature; an unsigned one
    (e.g. a root published elsewhere) is taken at the caller's word.
    """
    if not isinstance(data, dict):
        raise CheckpointError("checkpoint must be a JSON object")
    sequence_num = data.get("sequence_num")
    if isinstance(sequence_num, bool) or not isinstance(sequence_num, int) or sequence_num < 0:
        raise CheckpointError("checkpoint sequence_num must be a non-negative integer")
    root_hash = data.get("root_hash")
    if not is_hex_digest(root_hash):
        raise CheckpointError("checkpoint root_hash must be 64 lowercase hex characters")
    raw_time = data.get("timestamp")
    timestamp = None
    if raw_time is not None:
        timestamp = parse_datetime(raw_time) if isinstance(raw_time, str) else None
        if timestamp is None or timestamp.tzinfo is None:
            raise CheckpointError("checkpoint timestamp must be an ISO 8601 time with a zone")
    signature = data.get("signature")
    if signature is not None and not is_hex_digest(signature):
        raise CheckpointError("checkpoint signature must be 64 lowercase hex characters")
    return check_signature(
        Checkpoint(sequence_num=sequence_num, root_hash=root_hash, timestamp=timestamp, signature=signature)
    )


def check_signature(checkpoint: Checkpoint) -> Checkpoint:
    """The checkpoint, unless it is signed and the signature is not this server's."""
    if checkpoint.signature is not None and signing_configured() and not signature_matches(checkpoint):
        raise CheckpointError("checkpoint signature does not match: it was not issued with this server's key")
    return checkpoint


def warnings_for(checkpoint: Checkpoint | None = None) -> list[str]:
    """What a reader of a verification or a chain root should know about signing."""
    if signing_configured():
        return []
    warnings = [NO_KEY_WARNING]
    if checkpoint is not None and checkpoint.signature is not None:
        warnings.append("the checkpoint's signature was not checked (no key to check it with)")
    return warnings
