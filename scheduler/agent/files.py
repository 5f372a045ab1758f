"""What runs share for moving files: the server's file API, the blob cache, limits, and bounded retries."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from scheduler.agent.cache import BlobCache
from scheduler.agent.http import ServerFiles, TransientError

logger = logging.getLogger(__name__)

T = TypeVar("T")

GIB = 1024**3
DEFAULT_MAX_UNPACK_BYTES = 4 * GIB
DEFAULT_MAX_UNPACK_MEMBERS = 100_000
DEFAULT_DATASET_CACHE_BYTES = 50 * GIB


@dataclass
class FileServices:
    server: ServerFiles
    cache: BlobCache
    max_unpack_bytes: int = DEFAULT_MAX_UNPACK_BYTES
    max_unpack_members: int = DEFAULT_MAX_UNPACK_MEMBERS
    # How long one transfer (a download, one artifact's upload, the commit) keeps retrying transient errors.
    retry_seconds: float = 120.0
    backoff_initial: float = 0.5
    backoff_max: float = 10.0
    upload_artifacts: bool = True


async def with_retries(files: FileServices, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
    """Run `attempt` until it does not raise TransientError, with jittered exponential back-off,
    waiting at least as long as the server asked (its Retry-After).

    Gives up (re-raising the last TransientError) once `files.retry_seconds` have passed.
    """
    deadline = time.monotonic() + files.retry_seconds
    delay = files.backoff_initial
    while True:
        try:
            return await attempt()
        except TransientError as exc:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise
            pause = min(max(delay * random.uniform(0.5, 1.0), exc.retry_after or 0.0), remaining)
            logger.warning("%s: %s; retrying in %.1f s", what, exc, pause)
            await asyncio.sleep(pause)
            delay = min(delay * 2, files.backoff_max)
