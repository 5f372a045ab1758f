"""Tampering behind the application's back must be found, at the right event."""

import pytest

from audit.checkpoints import Checkpoint
from audit.selectors import chain_checkpoint
from audit.tests import tampering
from audit.tests.factories import append_events, event
from audit.verification import verify_chain

pytestmark = pytest.mark.django_db


@pytest.fixture
def chain() -> None:
    append_events(20, batch=7)


def test_an_untouched_chain_is_valid(chain) -> None:
    result = verify_chain()
    assert (result.valid, result.total_events, result.first_tampered) == (True, 20, None)
    assert result.chain_root_hash == event(20).event_hash


def test_an_empty_chain_is_valid() -> None:
    result = verify_chain()
    assert (result.valid, result.total_events, result.chain_root_hash) == (True, 0, "0" * 64)


def test_a_changed_field_is_found_at_its_event(chain) -> None:
    tampering.set_field(12, "resource", "file:innocent.csv")
    result = verify_chain()
    assert (result.valid, result.first_tampered) == (False, 12)
    assert result.total_events == 20


def test_a_flipped_success_flag_is_found(chain) -> None:
    tampering.set_field(3, "success", False)
    assert verify_chain().first_tampered == 3


def test_a_deleted_row_in_the_middle_is_found_at_the_gap(chain) -> None:
    tampering.delete(8)
    result = verify_chain()
    assert (result.valid, result.first_tampered, result.total_events) == (False, 8, 19)


def test_two_swapped_rows_are_found_at_the_first_of_them(chain) -> None:
    tampering.swap(5, 9)
    result = verify_chain()
    assert (result.valid, result.first_tampered) == (False, 5)


def test_a_forged_row_with_a_recomputed_hash_is_found_by_the_next_link(chain) -> None:
    tampering.forge(10, resource="file:forged.csv")
    result = verify_chain()
    assert (result.valid, result.first_tampered) == (False, 10)
    assert "event 11 does not link to event 10" in result.reason


def test_a_forged_first_row_is_found(chain) -> None:
    tampering.forge(1, user_id="mallory")
    assert verify_chain().first_tampered == 1


def test_a_deleted_tail_is_found_when_the_head_was_left_behind(chain) -> None:
    tampering.delete_after(15, fix_head=False)
    result = verify_chain()
    assert (result.valid, result.first_tampered) == (False, 16)


def test_a_deleted_tail_with_a_rewound_head_is_found_against_an_earlier_root(chain) -> None:
    earlier = chain_checkpoint()
    tampering.delete_after(15, fix_head=True)
    assert verify_chain().valid  # on its own the shorter chain is consistent
    result = verify_chain(checkpoint=Checkpoint(sequence_num=earlier.sequence_num, root_hash=earlier.root_hash))
    assert (result.valid, result.first_tampered, result.total_events) == (False, 16, 15)
    assert "truncated or rolled back" in result.reason


def test_a_rehashed_suffix_is_found_against_an_earlier_checkpoint(chain, settings) -> None:
    settings.FETCHML_AUDIT_SIGNING_KEY = "k" * 40
    earlier = chain_checkpoint()
    tampering.rehash_from(14, resource="file:rewritten.csv")
    assert verify_chain().valid  # self-consistent: only the checkpoint can tell
    result = verify_chain(checkpoint=earlier)
    assert (result.valid, result.first_tampered) == (False, 20)
    assert "rewritten" in result.reason


def test_a_fully_recomputed_chain_is_found_against_an_earlier_checkpoint(chain, settings) -> None:
    settings.FETCHML_AUDIT_SIGNING_KEY = "k" * 40
    append_events(5)
    earlier = chain_checkpoint()  # at 25; the chain keeps growing afterwards
    append_events(5)
    tampering.rehash_from(1, user_id="mallory")
    assert verify_chain().valid
    result = verify_chain(checkpoint=earlier)
    assert (result.valid, result.first_tampered, result.total_events) == (False, 25, 30)


def test_a_rollback_to_an_older_backup_is_found_against_a_later_checkpoint(chain) -> None:
    later = chain_checkpoint()
    tampering.delete_after(10, fix_head=True)
    append_events(15)  # life goes on after the restore: the count is back above the checkpoint
    result = verify_chain(checkpoint=Checkpoint(sequence_num=later.sequence_num, root_hash=later.root_hash))
    assert (result.valid, result.first_tampered) == (False, 20)


def test_an_intact_chain_passes_its_earlier_checkpoint_after_growing(chain) -> None:
    earlier = chain_checkpoint()
    append_events(30)
    result = verify_chain(checkpoint=earlier)
    assert (result.valid, result.total_events, result.checkpoint_checked) == (True, 50, True)


def test_a_wrong_checkpoint_before_a_later_tampered_event_moves_first_tampered_back_to_it(chain) -> None:
    tampering.set_field(15, "resource", "file:innocent.csv")
    result = verify_chain(checkpoint=Checkpoint(sequence_num=3, root_hash="f" * 64))
    assert (result.valid, result.first_tampered, result.checkpoint_checked) == (False, 3, True)
    assert "rewritten" in result.reason


def test_a_matching_checkpoint_before_a_later_tampered_event_is_checked_and_leaves_the_walks_finding(chain) -> None:
    tampering.set_field(15, "resource", "file:innocent.csv")
    result = verify_chain(checkpoint=Checkpoint(sequence_num=3, root_hash=event(3).event_hash))
    assert (result.valid, result.first_tampered, result.checkpoint_checked) == (False, 15, True)


def test_a_checkpoint_past_the_first_tampered_event_is_not_reported_as_checked(chain) -> None:
    tampering.set_field(5, "resource", "file:innocent.csv")
    result = verify_chain(checkpoint=Checkpoint(sequence_num=10, root_hash="f" * 64))
    assert (result.valid, result.first_tampered, result.checkpoint_checked) == (False, 5, False)
