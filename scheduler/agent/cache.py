"""A content-addressed blob cache (by sha256) with a size limit and least-recently-used eviction.

Layout: ``<root>/<sha256>`` per blob, read-only (0444); downloads go to ``<root>/.tmp-<random>``
in the same directory, are hashed, and only a verified file is renamed into place (an atomic
rename), so a failed or corrupt download never appears as an entry. Temporary files left by a
crash are removed at start.

Concurrency: one download per key at a time — tasks asking for a blob already being fetched wait
for that fetch. Entries leased by running tasks (`acquire` … `release`) are never evicted; the
others go, least recently used first, whenever the total exceeds the limit. Recency survives a
restart through the files' modification times.

All state is touched only from the event loop; hashing runs in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import uuid
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from scheduler.agent.http import TooLarge, sha256_file

logger = logging.getLogger(__name__)

_DIGEST = re.compile(r"^[0-9a-f]{64}$")
TMP_PREFIX = ".tmp-"

Fetch = Callable[[Path, int], Awaitable[None]]
"""Downloads into the given path (which may hold a partial earlier try), at most the given bytes."""


class DigestMismatch(Exception):
    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(f"sha256 mismatch (expected {expected}, got {actual})")
        self.expected = expected
        self.actual = actual


@dataclass
class _Pending:
    task: asyncio.Task[str]
    waiters: int = 0


class BlobCache:
    def __init__(self, root: Path, *, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._sizes: OrderedDict[str, int] = OrderedDict()  # least recently used first
        self._users: Counter[str] = Counter()
        self._pending: dict[str, _Pending] = {}
        root.mkdir(parents=True, exist_ok=True)
        entries = []
        for path in root.iterdir():
            if path.name.startswith(TMP_PREFIX):
                path.unlink(missing_ok=True)
            elif _DIGEST.match(path.name) and path.is_file():
                stat = path.stat()
                entries.append((stat.st_mtime, path.name, stat.st_size))
        for _, digest, size in sorted(entries):
            self._sizes[digest] = size

    def path(self, digest: str) -> Path:
        return self.root / digest

    def __contains__(self, digest: str) -> bool:
        return digest in self._sizes

    @property
    def total_bytes(self) -> int:
        return sum(self._sizes.values())

    def in_use(self, digest: str) -> bool:
        return self._users[digest] > 0

    async def acquire(self, *, key: str, sha256: str | None, fetch: Fetch) -> str:
        """Lease the blob (downloading it if needed) and return its digest; `release` it when done.

        `key` identifies the download for sharing: the expected sha256 when known, else the source.
        Raises DigestMismatch, TooLarge or what `fetch` raised.
        """
        if sha256 is not None and sha256 in self._sizes:
            self._lease(sha256)
            return sha256
        pending = self._pending.get(key)
        if pending is None:
            pending = _Pending(task=asyncio.create_task(self._download(key, sha256, fetch)))
            self._pending[key] = pending
        pending.waiters += 1
        try:
            return await asyncio.shield(pending.task)
        except asyncio.CancelledError:
            task = pending.task
            if task.done() and not task.cancelled() and task.exception() is None:
                self.release(task.result())  # it was leased for us just as we were cancelled
            else:
                pending.waiters -= 1
            raise

    def release(self, digest: str) -> None:
        if self._users[digest] > 0:
            self._users[digest] -= 1
        self._evict()

    def _lease(self, digest: str, count: int = 1) -> None:
        self._users[digest] += count
        self._sizes.move_to_end(digest)
        with contextlib.suppress(OSError):
            os.utime(self.path(digest))

    async def _download(self, key: str, expected: str | None, fetch: Fetch) -> str:
        temporary = self.root / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        try:
            await fetch(temporary, self.max_bytes)
            size = temporary.stat().st_size
            if size > self.max_bytes:
                raise TooLarge(f"{size} bytes, larger than the whole cache ({self.max_bytes} bytes)")
            actual = await asyncio.to_thread(sha256_file, temporary)
            if expected is not None and actual != expected:
                raise DigestMismatch(expected, actual)
            if actual not in self._sizes:
                temporary.chmod(0o444)
                os.replace(temporary, self.path(actual))
                self._sizes[actual] = size
            # In the same step as the insertion, so no eviction can run between them.
            self._lease(actual, self._pending[key].waiters)
            return actual
        finally:
            self._pending.pop(key, None)
            temporary.unlink(missing_ok=True)
            self._evict()

    def _evict(self) -> None:
        total = self.total_bytes
        for digest in list(self._sizes):
            if total <= self.max_bytes:
                break
            if self._users[digest] > 0:
                continue
            size = self._sizes.pop(digest)
            total -= size
            self._users.pop(digest, None)
            try:
                self.path(digest).unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                logger.warning("cache: cannot remove %s: %s", digest, exc)
            logger.info("cache: evicted %s (%d bytes)", digest, size)
