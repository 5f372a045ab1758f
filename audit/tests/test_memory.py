"""Verification streams the chain: memory stays flat however long it is."""

import tracemalloc

import pytest

from audit import verification
from audit.canonical import HASHED_FIELDS
from audit.models import AuditEvent
from audit.tests.factories import append_events
from audit.verification import verify_chain

EVENTS = 100_000
SAMPLE = 10_000
# Smaller than the production page, so two pages in memory are a small part of the chain.
PAGE_SIZE = 5_000


def _peak_bytes(action) -> tuple[object, int]:
    tracemalloc.start()
    try:
        result = action()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture
def small_pages(monkeypatch):
    monkeypatch.setattr(verification, "PAGE_SIZE", PAGE_SIZE)
    verification._page_sql.cache_clear()
    yield
    verification._page_sql.cache_clear()


@pytest.mark.django_db
def test_verifying_100000_events_uses_a_fraction_of_the_memory_loading_them_would(small_pages) -> None:
    append_events(EVENTS, batch=2000)
    # What loading rows costs, measured on a sample and scaled: it grows linearly.
    _, sample_peak = _peak_bytes(lambda: list(AuditEvent.objects.values_list(*HASHED_FIELDS, "event_hash")[:SAMPLE]))
    load_all_estimate = sample_peak * (EVENTS // SAMPLE)

    result, verify_peak = _peak_bytes(verify_chain)

    assert (result.valid, result.total_events) == (True, EVENTS)
    assert verify_peak < load_all_estimate / 10, (verify_peak, load_all_estimate)
    # Bounded by the page size, not the chain length.
    assert verify_peak < sample_peak * (PAGE_SIZE / SAMPLE) * 2, (verify_peak, sample_peak)
