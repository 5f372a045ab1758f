"""Golden vectors: the canonical form is a published format and must never drift."""

import hashlib
import json
from datetime import UTC, datetime, timedelta, timezone

import pytest

from audit.canonical import (
    GENESIS_HASH,
    HASHED_FIELDS,
    canonical_bytes,
    event_hash,
    format_timestamp,
    normalise_metadata,
)
from tasks.states import TaskStatus

VECTOR = {
    "sequence_num": 7,
    "timestamp": datetime(2025, 3, 4, 5, 6, 7, 89, tzinfo=timezone(timedelta(hours=2))),
    "event_type": "file_access",
    "user_id": "zoë",
    "resource": "file:données/日.csv",
    "action": "read",
    "success": True,
    "ip_address": "10.0.0.1",
    "error": "",
    "metadata": {"z": 1, "a": {"y": [1, 2.5, "\u2028"], "b": None}, "é": '"q"\n'},
    "prev_hash": "ab" * 32,
}
VECTOR_BYTES = (
    '{"action":"read","error":"","event_type":"file_access","ip_address":"10.0.0.1",'
    '"metadata":{"a":{"b":null,"y":[1,2.5,"\u2028"]},"z":1,"é":"\\"q\\"\\n"},'
    '"prev_hash":"abababababababababababababababababababababababababababababababab",'
    '"resource":"file:données/日.csv","sequence_num":7,"success":true,'
    '"timestamp":"2025-03-04T03:06:07.000089Z","user_id":"zoë"}'
).encode()
VECTOR_HASH = "f248fcbfff1541d9828fc3ecdd7dc4b94ec7d77188b5277e4c5198b21ad2bf69"


def test_canonical_bytes_match_the_golden_vector_exactly() -> None:
    assert canonical_bytes(VECTOR) == VECTOR_BYTES


def test_event_hash_is_sha256_of_the_canonical_bytes() -> None:
    assert hashlib.sha256(VECTOR_BYTES).hexdigest() == VECTOR_HASH
    assert event_hash(VECTOR) == VECTOR_HASH


def test_keys_are_sorted_at_every_level_whatever_the_input_order() -> None:
    shuffled = dict(reversed(list(VECTOR.items())))
    shuffled["metadata"] = {"é": '"q"\n', "a": {"b": None, "y": [1, 2.5, "\u2028"]}, "z": 1}
    assert canonical_bytes(shuffled) == VECTOR_BYTES


def test_non_ascii_is_kept_as_utf8_not_escaped() -> None:
    assert "zoë".encode() in VECTOR_BYTES
    assert b"\\u" not in VECTOR_BYTES


def test_fields_outside_the_hashed_set_are_ignored() -> None:
    assert canonical_bytes({**VECTOR, "event_hash": "f" * 64}) == VECTOR_BYTES


def test_timestamps_are_utc_with_six_digit_microseconds() -> None:
    assert format_timestamp(datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)) == "2024-01-02T03:04:05.000000Z"
    assert format_timestamp(datetime(2024, 1, 2, 0, 30, tzinfo=timezone(timedelta(hours=1)))) == (
        "2024-01-01T23:30:00.000000Z"
    )


def test_naive_timestamps_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        format_timestamp(datetime(2024, 1, 2, 3, 4, 5))


def test_genesis_hash_is_64_zeros() -> None:
    assert GENESIS_HASH == "0" * 64


def test_metadata_is_reduced_to_what_the_database_gives_back() -> None:
    assert normalise_metadata({"big": 1e20, "zero": -0.0, "one": 1.0, "n": {1: (2, 3)}}) == {
        "big": 100000000000000000000,
        "zero": 0.0,
        "one": 1.0,
        "n": {"1": [2, 3]},
    }


def test_a_text_choice_in_metadata_becomes_its_plain_string() -> None:
    normalised = normalise_metadata({"status": TaskStatus.RUNNING, "attempt": 2, "ok": True, "none": None})

    assert normalised == {"status": "running", "attempt": 2, "ok": True, "none": None}
    assert type(normalised["status"]) is str


def test_flat_metadata_is_copied_not_shared() -> None:
    metadata = {"status": "running"}

    normalise_metadata(metadata)["status"] = "changed"

    assert metadata == {"status": "running"}


def test_metadata_that_json_cannot_spell_is_refused() -> None:
    with pytest.raises(ValueError, match="not representable"):
        normalise_metadata({"x": float("nan")})


@pytest.mark.parametrize(
    "text",
    [
        "plain",
        'quote " and \\ backslash',
        "control \x00\x01\x1f\x7f",
        "tab\tnew\nline\r",
        "emoji 🙂 ä 日本",
        "\u2028\u2029",
    ],
)
def test_canonical_bytes_equal_sorted_compact_json_dumps(text: str) -> None:
    fields = {**VECTOR, "resource": text, "error": text, "metadata": {text: [text, 1e-7, -3, True, None]}}
    fields["timestamp"] = "2025-03-04T03:06:07.000089Z"
    expected = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert canonical_bytes(fields) == expected


def test_the_canonical_document_has_exactly_the_hashed_fields() -> None:
    assert tuple(sorted(json.loads(VECTOR_BYTES))) == tuple(sorted(HASHED_FIELDS))


def test_lists_of_plain_values_in_metadata_are_copied_as_json_reads_them() -> None:
    metadata = {"workers": ["gpu-1", TaskStatus.RUNNING], "gpu_indices": [[0, 1], []], "attempt": 1}

    normalised = normalise_metadata(metadata)
    normalised["gpu_indices"][0].append(2)

    assert normalised == {"workers": ["gpu-1", "running"], "gpu_indices": [[0, 1, 2], []], "attempt": 1}
    assert type(normalised["workers"][1]) is str
    assert metadata["gpu_indices"] == [[0, 1], []]


def test_a_list_holding_a_value_json_would_change_is_normalised_through_json() -> None:
    normalised = normalise_metadata({"values": [1, 1e20, (2, 3)], "when": [datetime(2025, 1, 2, tzinfo=UTC)]})

    assert normalised == {"values": [1, 100000000000000000000, [2, 3]], "when": ["2025-01-02T00:00:00Z"]}
