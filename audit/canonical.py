"""The canonical form an event is hashed in. Changing it breaks every chain.

JSON, keys sorted, no whitespace, UTF-8 (non-ASCII kept as is), timestamps in
UTC as `YYYY-MM-DDTHH:MM:SS.ffffffZ`, and the hash of the previous event. The
form is documented for outside verifiers in docs/audit.md; the golden vectors
in audit/tests/test_canonical.py pin it.
"""

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

from django.core.serializers.json import DjangoJSONEncoder

GENESIS_HASH = "0" * 64
HASHED_FIELDS = (
    "sequence_num",
    "timestamp",
    "event_type",
    "user_id",
    "resource",
    "action",
    "success",
    "ip_address",
    "error",
    "metadata",
    "prev_hash",
)

# Floats of this size or more print in exponent form in Python but come back
# from PostgreSQL's jsonb as plain integers; they are stored as integers.
_EXPONENT_FORM_FROM = 1e16
_PLAIN = frozenset({int, bool, type(None)})

_encoder = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
# The escaper json.dumps itself uses when ensure_ascii=False (C implementation).
_string = json.encoder.encode_basestring


def format_timestamp(value: datetime) -> str:
    if value.tzinfo is None:
        raise ValueError("audit timestamps must be timezone-aware")
    if value.utcoffset():
        value = value.astimezone(UTC)
    return value.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def _stable_number(value: Any) -> Any:
    if isinstance(value, float):
        if value == 0.0:
            return 0.0  # jsonb has no negative zero
        if value.is_integer() and abs(value) >= _EXPONENT_FORM_FROM:
            return int(value)
        return value
    if isinstance(value, dict):
        return {key: _stable_number(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_stable_number(item) for item in value]
    return value


_NOT_PLAIN = object()


def _plain_copy(value: Any) -> Any:
    """`value` as it reads back from JSON, without the round trip, where that is plain to see: text
    (a str subclass, such as a choice's enum member, becomes the plain string), whole numbers,
    booleans, nulls and lists of them. `_NOT_PLAIN` for anything else."""
    if type(value) in _PLAIN:
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if type(value) is list:
        items = [_plain_copy(item) for item in value]
        if all(item is not _NOT_PLAIN for item in items):
            return items
    return _NOT_PLAIN


def normalise_metadata(metadata: dict[str, Any] | None) -> dict[str, Any]:
    """The metadata exactly as it will read back from either database.

    The hash is taken over what is stored, so values are reduced to plain JSON
    first (UUIDs, datetimes and Decimals become strings, like the JSONField
    would need anyway) and numbers the databases would print differently are
    fixed up. NaN and infinities are refused: JSON has no spelling for them.
    """
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise TypeError("audit metadata must be a dict")
    if all(type(key) is str for key in metadata):
        plain = {key: _plain_copy(value) for key, value in metadata.items()}
        if all(value is not _NOT_PLAIN for value in plain.values()):
            return plain
    try:
        plain = json.loads(json.dumps(metadata, cls=DjangoJSONEncoder, allow_nan=False))
    except ValueError as exc:
        raise ValueError(f"audit metadata is not representable as JSON: {exc}") from exc
    return _stable_number(plain)


def metadata_json(metadata: dict[str, Any]) -> str:
    return _encoder.encode(metadata) if metadata else "{}"


def assemble(
    action: str,
    error: str,
    event_type: str,
    ip_address: str,
    metadata_text: str,
    prev_hash: str,
    resource: str,
    sequence_num: int,
    success: bool,
    timestamp_text: str,
    user_id: str,
) -> bytes:
    """The canonical document from its parts, arguments in key order.

    Byte for byte `json.dumps(document, sort_keys=True, separators=(",", ":"),
    ensure_ascii=False)`, spelled out key by key with the json module's own
    string escaper: several times faster, and this is the inner loop of both
    appending and verifying. `metadata_text` is `metadata_json(metadata)`.
    """
    return (
        f'{{"action":{_string(action)},"error":{_string(error)},"event_type":{_string(event_type)},'
        f'"ip_address":{_string(ip_address)},"metadata":{metadata_text},"prev_hash":{_string(prev_hash)},'
        f'"resource":{_string(resource)},"sequence_num":{int(sequence_num)},'
        f'"success":{"true" if success else "false"},"timestamp":{_string(timestamp_text)},'
        f'"user_id":{_string(user_id)}}}'
    ).encode()


def canonical_bytes(fields: dict[str, Any]) -> bytes:
    timestamp = fields["timestamp"]
    if isinstance(timestamp, datetime):
        timestamp = format_timestamp(timestamp)
    return assemble(
        fields["action"],
        fields["error"],
        fields["event_type"],
        fields["ip_address"],
        metadata_json(fields["metadata"]),
        fields["prev_hash"],
        fields["resource"],
        fields["sequence_num"],
        fields["success"],
        timestamp,
        fields["user_id"],
    )


def event_hash(fields: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_bytes(fields)).hexdigest()


def is_hex_digest(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
