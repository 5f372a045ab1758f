"""The agent waits as long as the server asks (Retry-After) before trying a transfer again."""

import asyncio
import email.message
import io
import urllib.error
from types import SimpleNamespace

import pytest

from scheduler.agent import files, http
from scheduler.agent.files import with_retries
from scheduler.agent.http import MAX_RETRY_AFTER_SECONDS, TransientError


def _refused(status: int, retry_after: str | None) -> urllib.error.HTTPError:
    headers = email.message.Message()
    if retry_after is not None:
        headers["Retry-After"] = retry_after
    body = io.BytesIO(b'{"error": "Rate limit exceeded", "code": "RATE_LIMITED"}')
    return urllib.error.HTTPError("http://127.0.0.1/v1/x", status, "refused", headers, body)


@pytest.mark.parametrize(
    ("status", "retry_after", "expected"),
    [(429, "7", 7.0), (503, "2", 2.0), (429, None, None), (429, "soon", None), (429, "86400", MAX_RETRY_AFTER_SECONDS)],
)
def test_a_refusal_worth_retrying_carries_the_wait_the_server_asked(status, retry_after, expected):
    refusal = http._refusal(_refused(status, retry_after))
    assert isinstance(refusal, TransientError)
    assert refusal.retry_after == expected


def test_a_retry_waits_at_least_as_long_as_the_server_asked(monkeypatch):
    pauses = []

    async def recorded(seconds: float) -> None:
        pauses.append(seconds)

    monkeypatch.setattr(files.asyncio, "sleep", recorded)
    outcomes = [TransientError("HTTP 429", retry_after=7.0), "committed"]

    async def attempt() -> str:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    services = SimpleNamespace(retry_seconds=120.0, backoff_initial=0.5, backoff_max=10.0)  # what with_retries reads
    assert asyncio.run(with_retries(services, "commit", attempt)) == "committed"
    assert pauses == [7.0]
