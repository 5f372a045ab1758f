"""Appending: gap-free sequence, links, one lock per batch, same transaction as the change."""

import contextlib
import itertools

import pytest
from django.core.management import call_command
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from audit.canonical import GENESIS_HASH, HASHED_FIELDS, event_hash
from audit.models import AuditEvent, ChainHead
from audit.services import Entry, appended_together, record, record_many, unrecorded_if_rolled_back
from audit.tests.factories import append_events
from audit.verification import verify_chain
from tasks.states import TaskStatus


def _record(**kwargs) -> AuditEvent:
    with transaction.atomic():
        return record(event_type="file_access", **kwargs)


@pytest.mark.django_db
def test_first_event_is_number_one_and_links_to_genesis() -> None:
    event = _record(user="alice", resource="file:a")
    assert event.sequence_num == 1
    assert event.prev_hash == GENESIS_HASH


@pytest.mark.django_db
def test_sequence_is_gap_free_and_each_event_links_to_the_one_before() -> None:
    append_events(10, batch=3)
    events = list(AuditEvent.objects.order_by("sequence_num"))
    assert [e.sequence_num for e in events] == list(range(1, 11))
    for before, after in itertools.pairwise(events):
        assert after.prev_hash == before.event_hash


@pytest.mark.django_db
def test_stored_hash_is_recomputable_from_the_stored_row() -> None:
    _record(user="zoë", resource="file:日", metadata={"size": 1.5, "tags": ["x"]}, ip_address="::1")
    stored = AuditEvent.objects.get(sequence_num=1)
    assert event_hash({name: getattr(stored, name) for name in HASHED_FIELDS}) == stored.event_hash


@pytest.mark.django_db
def test_chain_head_follows_the_last_event() -> None:
    append_events(5, batch=2)
    head = ChainHead.objects.get()
    last = AuditEvent.objects.order_by("-sequence_num").first()
    assert (head.sequence_num, head.event_hash) == (5, last.event_hash)


@pytest.mark.django_db
def test_a_batch_of_32_takes_the_chain_head_lock_once() -> None:
    _record()  # the head row exists, as it does in a running system
    entries = [Entry(event_type="job_started", resource=f"task:{i}") for i in range(32)]
    with transaction.atomic(), CaptureQueriesContext(connection) as queries:
        record_many(entries)
    statements = [q["sql"] for q in queries.captured_queries]
    head_reads = [s for s in statements if ChainHead._meta.db_table in s and s.lstrip().startswith("SELECT")]
    assert len(head_reads) == 1
    # Lock the head, insert the 32 events, move the head; the last two in one statement on PostgreSQL.
    assert len(statements) == (2 if connection.vendor == "postgresql" else 3)
    assert AuditEvent.objects.count() == 33


@pytest.mark.django_db
def test_events_of_one_batch_share_a_timestamp_and_stay_in_order() -> None:
    with transaction.atomic():
        record_many([Entry(event_type="job_started", resource=f"task:{i}") for i in range(3)])
    events = list(AuditEvent.objects.order_by("sequence_num"))
    assert [e.resource for e in events] == ["task:0", "task:1", "task:2"]
    assert len({e.timestamp for e in events}) == 1


@pytest.mark.django_db
def test_timestamps_never_go_backwards_along_the_chain() -> None:
    append_events(20, batch=1)
    times = list(AuditEvent.objects.order_by("sequence_num").values_list("timestamp", flat=True))
    assert times == sorted(times)


@pytest.mark.django_db(transaction=True)
def test_record_outside_a_transaction_raises() -> None:
    with pytest.raises(RuntimeError, match="inside the transaction"):
        record(event_type="file_access")
    assert not AuditEvent.objects.exists()


@pytest.mark.django_db
def test_a_rolled_back_change_leaves_no_audit_event(user) -> None:
    before = AuditEvent.objects.count()
    with pytest.raises(ZeroDivisionError), transaction.atomic():
        user.first_name = "changed"
        user.save()
        record(event_type="file_access", user=user, resource="file:x")
        1 / 0  # noqa: B018  (the change fails after its audit event was written)
    user.refresh_from_db()
    assert user.first_name != "changed"
    assert AuditEvent.objects.count() == before


@pytest.mark.django_db
def test_a_committed_change_always_has_its_event(user) -> None:
    with transaction.atomic():
        user.first_name = "changed"
        user.save()
        event = record(event_type="file_access", user=user, resource="file:x")
    assert AuditEvent.objects.filter(sequence_num=event.sequence_num, user_id="alice").exists()


@pytest.mark.django_db
def test_unknown_event_type_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown audit event type"), transaction.atomic():
        record(event_type="job_exploded")


@pytest.mark.django_db
def test_over_long_fields_are_cut_before_hashing_so_the_row_verifies() -> None:
    _record(user="u" * 500, resource="r" * 500, action="a" * 100, ip_address="1" * 100)
    stored = AuditEvent.objects.get()
    assert (len(stored.user_id), len(stored.resource), len(stored.action)) == (150, 255, 64)
    assert verify_chain().valid


@pytest.mark.django_db
def test_text_choices_and_quotes_in_fields_still_verify() -> None:
    _record(user='o"neil', resource="task:\u2028", metadata={"status": TaskStatus.COMPLETED, "note": 'say "hi"\n'})
    stored = AuditEvent.objects.get()
    assert stored.metadata == {"status": "completed", "note": 'say "hi"\n'}
    assert verify_chain().valid


@pytest.mark.django_db
def test_numbers_the_database_rewrites_still_verify() -> None:
    _record(metadata={"huge": 1e20, "negzero": -0.0, "tiny": 1.5e-7, "when": "x"})
    assert verify_chain().valid


@pytest.mark.django_db
def test_a_missing_head_is_rebuilt_from_the_last_event() -> None:
    append_events(4, batch=4)
    ChainHead.objects.all().delete()
    event = _record()
    assert event.sequence_num == 5
    assert verify_chain().valid


@pytest.mark.django_db(transaction=True)
def test_after_flush_the_next_append_starts_a_fresh_valid_chain() -> None:
    append_events(3)
    call_command("flush", interactive=False, verbosity=0)
    assert not AuditEvent.objects.exists()
    assert _record().sequence_num == 1
    assert verify_chain().valid


@pytest.mark.django_db
def test_events_recorded_together_are_appended_once_at_the_end_in_order() -> None:
    with transaction.atomic():
        with appended_together():
            for name in ("a", "b", "c"):
                assert record(event_type="file_access", resource=f"file:{name}") is None
            assert not AuditEvent.objects.exists()  # nothing appended, the head not yet locked
        assert [e.resource for e in AuditEvent.objects.order_by("sequence_num")] == ["file:a", "file:b", "file:c"]
    assert verify_chain().valid


@pytest.mark.django_db
def test_several_events_recorded_in_a_block_join_its_others_in_order() -> None:
    with transaction.atomic():
        with appended_together():
            record(event_type="file_access", resource="file:a")
            record_many([Entry(event_type="file_access", resource=f"file:{name}") for name in ("b", "c")])
            record(event_type="file_access", resource="file:d")
            assert not AuditEvent.objects.exists()
        resources = [e.resource for e in AuditEvent.objects.order_by("sequence_num")]
    assert resources == ["file:a", "file:b", "file:c", "file:d"]
    assert verify_chain().valid


@pytest.mark.django_db
def test_events_recorded_together_are_discarded_with_a_failing_block() -> None:
    with pytest.raises(RuntimeError), transaction.atomic(), appended_together():
        record(event_type="file_access", resource="file:a")
        raise RuntimeError("the change failed")

    assert not AuditEvent.objects.exists()
    _record(resource="file:b")  # and recording works normally afterwards
    assert AuditEvent.objects.get().sequence_num == 1


@pytest.mark.django_db
def test_events_of_a_savepoint_rolled_back_inside_a_block_are_not_appended() -> None:
    with transaction.atomic(), appended_together():
        record(event_type="file_access", resource="file:kept")
        with contextlib.suppress(RuntimeError), transaction.atomic(), unrecorded_if_rolled_back():
            record(event_type="file_access", resource="file:dropped")
            raise RuntimeError("the savepoint's change failed")
        record(event_type="file_access", resource="file:after")

    assert [e.resource for e in AuditEvent.objects.order_by("sequence_num")] == ["file:kept", "file:after"]
    assert verify_chain().valid


@pytest.mark.django_db
def test_events_of_a_savepoint_rolled_back_outside_a_block_roll_back_with_it() -> None:
    with transaction.atomic():
        with contextlib.suppress(RuntimeError), transaction.atomic(), unrecorded_if_rolled_back():
            record(event_type="file_access", resource="file:dropped")
            raise RuntimeError("the savepoint's change failed")
        record(event_type="file_access", resource="file:kept")

    assert [e.resource for e in AuditEvent.objects.order_by("sequence_num")] == ["file:kept"]
    assert verify_chain().valid


@pytest.mark.django_db(transaction=True)
def test_recording_together_outside_a_transaction_raises() -> None:
    with pytest.raises(RuntimeError), appended_together():
        pass
