"""Datasets of a run: parse the assignment's specs, fetch each blob into the cache once, mount it.

Sources:

* ``fetchml://datasets/<name>``: the task owner's dataset on the server the agent is connected
  to, ``GET /v1/datasets/<name>/content?task_id=<task>`` (resumed with Range after a network
  error). Without a sha256 in the spec the agent first asks ``GET /v1/datasets/<name>?task_id=``
  for the digest, so a cached copy is found without downloading it again.
* ``http://`` / ``https://``: downloaded by the agent (resumed with Range when the server allows).
* ``file:///path``: a file on a shared file system, copied into the cache.
* An empty source means ``fetchml://datasets/<name>``. Entries of the assignment's ``datasets``
  list (a name, or ``fetchml://datasets/<name>``) are the same as a spec with that source and
  ``mount_path`` ``datasets/<name>``.

A dataset is one file (the blob as stored); archives are not unpacked. It appears at
``mount_path`` (relative to the work directory) as a symbolic link to the read-only cache entry:
no copy per run, and a run cannot change the bytes other runs share by accident. (Runs use the
agent's own uid, so this is not a barrier against a hostile task.)

A spec without sha256 is verified against nothing, but its digest is computed after the download
and the blob cached under it. http(s) and file sources without sha256 are fetched again for each
run (what is behind a URL may change), though concurrent runs share one fetch.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

from scheduler.agent.cache import DigestMismatch, Fetch
from scheduler.agent.files import FileServices, with_retries
from scheduler.agent.http import CHUNK, Aborted, HttpStatusError, TooLarge, TransferError, fetch_to_file

_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_SERVER_NAME = re.compile(r"^[a-zA-Z0-9_.-]{1,128}$")
SERVER_PREFIX = "fetchml://datasets/"


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    source: str
    sha256: str | None
    mount_path: PurePosixPath


def _mount_path(value: str, name: str) -> PurePosixPath:
    if not value or value.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", value) or "\x00" in value:
        raise ValueError(f"dataset {name}: mount_path {value!r} must be a relative path")
    path = PurePosixPath(value.replace("\\", "/"))
    if ".." in path.parts or path.parts[:1] in ((".fetchml",), ("output",)):
        raise ValueError(f"dataset {name}: mount_path {value!r} must stay inside the work directory")
    return path


def parse_specs(raw_specs: tuple[Any, ...], names: tuple[Any, ...]) -> list[DatasetSpec]:
    """The run's datasets, validated; ValueError with the message to report."""
    specs: list[DatasetSpec] = []
    for entry in names:
        if not isinstance(entry, str) or not entry:
            raise ValueError(f"datasets: {entry!r} is not a dataset name")
        name = entry.removeprefix(SERVER_PREFIX)
        specs.append(DatasetSpec(name, SERVER_PREFIX + name, None, _mount_path(f"datasets/{name}", name)))
    for raw in raw_specs:
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not raw["name"]:
            raise ValueError(f"dataset_specs: {raw!r} has no name")
        name = raw["name"]
        source = raw.get("source") or SERVER_PREFIX + name
        sha256 = raw.get("sha256") or None
        if not isinstance(source, str) or (sha256 is not None and not _DIGEST.match(str(sha256))):
            raise ValueError(f"dataset {name}: source must be a string and sha256 64 lowercase hex digits")
        mount = raw.get("mount_path") or f"datasets/{name}"
        specs.append(DatasetSpec(name, source, sha256, _mount_path(str(mount), name)))
    seen: set[PurePosixPath] = set()
    for spec in specs:
        _check_source(spec)
        if spec.mount_path in seen:
            raise ValueError(f"dataset {spec.name}: mount_path {str(spec.mount_path)!r} is used twice")
        seen.add(spec.mount_path)
    return specs


def _check_source(spec: DatasetSpec) -> None:
    parts = urlsplit(spec.source)
    if spec.source.startswith(SERVER_PREFIX):
        if not _SERVER_NAME.match(spec.source.removeprefix(SERVER_PREFIX)) or spec.source.endswith(("/.", "/..")):
            raise ValueError(f"dataset {spec.name}: {spec.source!r} does not name a server dataset")
    elif parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ValueError(f"dataset {spec.name}: {spec.source!r} must be file:///absolute/path")
    elif parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"dataset {spec.name}: unsupported source {spec.source!r} (fetchml://, http(s)://, file://)")


def _copy_file(source: Path, target: Path, max_bytes: int, abort: threading.Event) -> None:
    copied = 0
    with source.open("rb") as reader, target.open("wb") as writer:
        while chunk := reader.read(CHUNK):
            if abort.is_set():
                raise Aborted("aborted")
            copied += len(chunk)
            if copied > max_bytes:
                raise TooLarge(f"over the limit of {max_bytes} bytes")
            writer.write(chunk)


class DatasetFetcher:
    """Fetches the datasets of one run, leasing their cache entries until `release()`."""

    def __init__(self, files: FileServices, *, task_id: str, abort: threading.Event) -> None:
        self._files = files
        self._task_id = task_id
        self._abort = abort
        self.leased: list[str] = []

    async def prepare(self, spec: DatasetSpec, work_dir: Path) -> None:
        """Fetch (or reuse) `spec` and link it into `work_dir`; ValueError with the message to report."""
        try:
            sha256 = spec.sha256 or await self._server_digest(spec)
            key = sha256 or spec.source
            digest = await self._files.cache.acquire(key=key, sha256=sha256, fetch=self._fetcher(spec))
        except DigestMismatch as exc:
            raise ValueError(f"dataset {spec.name}: {exc}") from None
        except HttpStatusError as exc:
            reason = "not found or not readable for this task" if exc.status == 404 else exc.message
            raise ValueError(f"dataset {spec.name}: download refused (HTTP {exc.status}): {reason}") from None
        except TooLarge as exc:
            raise ValueError(f"dataset {spec.name}: too large for the dataset cache: {exc}") from None
        except FileNotFoundError:
            raise ValueError(f"dataset {spec.name}: {spec.source} does not exist") from None
        except (TransferError, OSError) as exc:
            raise ValueError(f"dataset {spec.name}: download failed: {exc}") from None
        self.leased.append(digest)
        self._mount(spec, work_dir, self._files.cache.path(digest))

    def release(self) -> None:
        leased, self.leased = self.leased, []
        for digest in leased:
            self._files.cache.release(digest)

    async def _server_digest(self, spec: DatasetSpec) -> str | None:
        if not spec.source.startswith(SERVER_PREFIX):
            return None
        name = spec.source.removeprefix(SERVER_PREFIX)

        async def attempt() -> Any:
            return await asyncio.to_thread(
                self._files.server.get_json, f"/v1/datasets/{name}", query={"task_id": self._task_id}
            )

        meta = await with_retries(self._files, f"dataset {spec.name}: metadata", attempt)
        digest = meta.get("sha256") if isinstance(meta, dict) else None
        return digest if isinstance(digest, str) and _DIGEST.match(digest) else None

    def _fetcher(self, spec: DatasetSpec) -> Fetch:
        files, abort = self._files, self._abort
        parts = urlsplit(spec.source)

        async def fetch(target: Path, limit: int) -> None:
            if spec.source.startswith(SERVER_PREFIX):
                path = f"/v1/datasets/{spec.source.removeprefix(SERVER_PREFIX)}/content"
                query = {"task_id": self._task_id}

                def call() -> None:
                    files.server.download(path, target, max_bytes=limit, abort=abort, query=query)
            elif parts.scheme == "file":

                def call() -> None:
                    _copy_file(Path(unquote(parts.path)), target, limit, abort)
            else:

                def call() -> None:
                    timeout = files.server.timeout
                    fetch_to_file(spec.source, target, timeout=timeout, max_bytes=limit, abort=abort)

            async def attempt() -> None:
                await asyncio.to_thread(call)

            await with_retries(files, f"dataset {spec.name}: download", attempt)

        return fetch

    @staticmethod
    def _mount(spec: DatasetSpec, work_dir: Path, entry: Path) -> None:
        link = work_dir / spec.mount_path
        try:
            link.parent.mkdir(parents=True, exist_ok=True)
            # A snapshot may hold symbolic links; the link itself must still land inside the work directory.
            if not link.parent.resolve().is_relative_to(work_dir.resolve()):
                raise ValueError(f"dataset {spec.name}: mount_path {str(spec.mount_path)!r} leaves the work directory")
            if link.is_symlink() or link.exists():
                raise ValueError(f"dataset {spec.name}: mount_path {str(spec.mount_path)!r} already exists")
            os.symlink(entry, link)
        except OSError as exc:
            raise ValueError(f"dataset {spec.name}: cannot mount at {str(spec.mount_path)!r}: {exc}") from None
