"""Code snapshots: download (through the blob cache, verified against the id), check, unpack.

The server only checks that a snapshot opens as a .tar.gz, so the agent treats it as hostile:
every member header is checked *before* anything is written — absolute names, `..` components,
symbolic or hard links leading out of the work directory, devices, FIFOs and other special
members are refused, as are archives with more than `max_members` members or expanding past
`max_bytes` (reading stops as soon as a limit is passed, so a small gzip bomb costs little).
Extraction then still goes through tarfile's ``filter="data"`` as a second line of defence.
"""

from __future__ import annotations

import asyncio
import posixpath
import re
import tarfile
import threading
from pathlib import Path

from scheduler.agent.cache import DigestMismatch
from scheduler.agent.files import FileServices, with_retries
from scheduler.agent.http import Aborted, HttpStatusError, TooLarge, TransferError

_DIGEST = re.compile(r"^[0-9a-f]{64}$")


class UnsafeArchive(Exception):
    """The archive may not be unpacked; the message names the member and why."""


def _escapes(name: str) -> bool:
    return ".." in name.replace("\\", "/").split("/")


def check_member(member: tarfile.TarInfo) -> None:
    name = member.name
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise UnsafeArchive(f"member {name!r} is an absolute path")
    if _escapes(name):
        raise UnsafeArchive(f"member {name!r} escapes the work directory")
    if member.issym():
        target = member.linkname
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
        if target.startswith("/") or resolved == ".." or resolved.startswith("../"):
            raise UnsafeArchive(f"symlink {name!r} -> {target!r} points outside the work directory")
    elif member.islnk():
        target = member.linkname
        if target.startswith("/") or _escapes(target):
            raise UnsafeArchive(f"hard link {name!r} -> {target!r} points outside the work directory")
    elif member.ischr() or member.isblk() or member.isfifo():
        raise UnsafeArchive(f"member {name!r} is a device file or FIFO")
    elif not (member.isfile() or member.isdir()):
        raise UnsafeArchive(f"member {name!r} has an unsupported type")


def safe_extract(archive: Path, dest: Path, *, max_bytes: int, max_members: int) -> None:
    """Check every member of a .tar.gz, then extract it into `dest`; UnsafeArchive when refused."""
    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            members: list[tarfile.TarInfo] = []
            total = 0
            for member in tar:  # headers only, read one by one so a limit stops the walk early
                members.append(member)
                if len(members) > max_members:
                    raise UnsafeArchive(f"more than {max_members} members")
                check_member(member)
                total += member.size if member.isfile() else 0
                if total > max_bytes:
                    raise UnsafeArchive(f"expands past {max_bytes} bytes (the agent's --max-unpack-bytes)")
            tar.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, EOFError, OSError) as exc:
        if isinstance(exc, tarfile.FilterError):
            raise UnsafeArchive(str(exc)) from None
        raise UnsafeArchive(f"cannot be unpacked: {exc}") from None


async def unpack_snapshot(files: FileServices, snapshot_id: str, dest: Path, *, abort: threading.Event) -> None:
    """Fetch (or reuse) the snapshot and unpack it into `dest`; raises ValueError with the message to report."""
    what = f"snapshot {snapshot_id}"
    if not _DIGEST.match(snapshot_id):
        raise ValueError(f"{what}: not a sha256 id")

    async def fetch(target: Path, limit: int) -> None:
        async def attempt() -> None:
            await asyncio.to_thread(
                files.server.download, f"/v1/snapshots/{snapshot_id}", target, max_bytes=limit, abort=abort
            )

        await with_retries(files, f"downloading {what}", attempt)

    try:
        digest = await files.cache.acquire(key=snapshot_id, sha256=snapshot_id, fetch=fetch)
    except DigestMismatch as exc:
        raise ValueError(f"{what}: {exc}") from None
    except HttpStatusError as exc:
        reason = "not found or not readable for this task" if exc.status == 404 else exc.message
        raise ValueError(f"{what}: download refused (HTTP {exc.status}): {reason}") from None
    except TooLarge as exc:
        raise ValueError(f"{what}: too large for the cache: {exc}") from None
    except (Aborted, TransferError) as exc:
        raise ValueError(f"{what}: download failed: {exc}") from None
    try:
        await asyncio.to_thread(
            safe_extract,
            files.cache.path(digest),
            dest,
            max_bytes=files.max_unpack_bytes,
            max_members=files.max_unpack_members,
        )
    except UnsafeArchive as exc:
        raise ValueError(f"{what}: {exc}") from None
    finally:
        files.cache.release(digest)
