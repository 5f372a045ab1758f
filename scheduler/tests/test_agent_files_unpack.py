"""Crafted snapshot archives are refused before anything is written; the blob cache's LRU eviction."""

from __future__ import annotations

import asyncio
import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from scheduler.agent.cache import BlobCache
from scheduler.agent.snapshots import UnsafeArchive, safe_extract


def archive(tmp_path: Path, *members: tuple[tarfile.TarInfo, bytes]) -> Path:
    path = tmp_path / "snapshot.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        ok = tarfile.TarInfo("train.py")
        ok.size = 5
        tar.addfile(ok, io.BytesIO(b"print"))
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)
    return path


def member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


@pytest.mark.parametrize(
    ("crafted", "message"),
    [
        (member("/etc/cron.d/x"), "member '/etc/cron.d/x' is an absolute path"),
        (member("src/../../x"), "member 'src/../../x' escapes the work directory"),
        (member("link", tarfile.SYMTYPE, "../../outside"), "symlink 'link' -> '../../outside' points outside"),
        (member("abs", tarfile.SYMTYPE, "/etc/passwd"), "symlink 'abs' -> '/etc/passwd' points outside"),
        (member("hard", tarfile.LNKTYPE, "../outside"), "hard link 'hard' -> '../outside' points outside"),
        (member("null", tarfile.CHRTYPE), "member 'null' is a device file or FIFO"),
        (member("disk", tarfile.BLKTYPE), "member 'disk' is a device file or FIFO"),
        (member("pipe", tarfile.FIFOTYPE), "member 'pipe' is a device file or FIFO"),
    ],
)
def test_unsafe_member_is_refused_and_nothing_is_extracted(tmp_path: Path, crafted, message: str) -> None:
    path = archive(tmp_path, (crafted, b""))
    dest = tmp_path / "work"
    dest.mkdir()
    with pytest.raises(UnsafeArchive, match="^" + message.replace("(", r"\(")):
        safe_extract(path, dest, max_bytes=1 << 20, max_members=100)
    assert list(dest.iterdir()) == []


def test_archive_expanding_past_the_limit_is_refused_before_extraction(tmp_path: Path) -> None:
    path = archive(tmp_path, (member("zeros.bin"), bytes(2 << 20)))  # 2 MiB of zeros gzip to ~2 KiB
    assert path.stat().st_size < 10_000
    dest = tmp_path / "work"
    dest.mkdir()
    with pytest.raises(UnsafeArchive, match=r"expands past 1048576 bytes"):
        safe_extract(path, dest, max_bytes=1 << 20, max_members=100)
    assert list(dest.iterdir()) == []


def test_archive_with_too_many_members_is_refused(tmp_path: Path) -> None:
    path = archive(tmp_path, *[(member(f"f{i}"), b"x") for i in range(10)])
    with pytest.raises(UnsafeArchive, match="more than 5 members"):
        safe_extract(path, tmp_path, max_bytes=1 << 20, max_members=5)


def test_safe_archive_with_inner_links_is_extracted(tmp_path: Path) -> None:
    path = archive(
        tmp_path,
        (member("pkg/data.txt"), b"hello"),
        (member("pkg/alias.txt", tarfile.SYMTYPE, "data.txt"), b""),
        (member("copy.txt", tarfile.LNKTYPE, "pkg/data.txt"), b""),
    )
    dest = tmp_path / "work"
    dest.mkdir()
    safe_extract(path, dest, max_bytes=1 << 20, max_members=100)
    assert (dest / "train.py").read_bytes() == b"print"
    assert (dest / "pkg" / "alias.txt").read_text() == "hello"
    assert (dest / "copy.txt").read_text() == "hello"


# -- the blob cache --------------------------------------------------------------------------


def blob(n: int) -> bytes:
    return bytes([n]) * 1000


async def lease(cache: BlobCache, data: bytes) -> str:
    async def fetch(target: Path, limit: int) -> None:
        target.write_bytes(data)

    digest = hashlib.sha256(data).hexdigest()
    return await cache.acquire(key=digest, sha256=digest, fetch=fetch)


def test_least_recently_used_entries_are_evicted_to_stay_within_the_limit(tmp_path: Path) -> None:
    async def scenario() -> None:
        cache = BlobCache(tmp_path, max_bytes=2500)
        a, b = await lease(cache, blob(1)), await lease(cache, blob(2))
        cache.release(a)
        cache.release(b)
        cache.release(await lease(cache, blob(1)))  # a is now more recent than b
        c = await lease(cache, blob(3))
        cache.release(c)
        assert (a in cache, b in cache, c in cache) == (True, False, True)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([a, c])
        assert cache.total_bytes <= 2500

    asyncio.run(scenario())


def test_entries_in_use_are_never_evicted(tmp_path: Path) -> None:
    async def scenario() -> None:
        cache = BlobCache(tmp_path, max_bytes=1500)
        a = await lease(cache, blob(1))
        b = await lease(cache, blob(2))  # over the limit, but both are leased
        assert (a in cache, b in cache) == (True, True)
        cache.release(a)  # a is free and over the limit: it goes
        assert (a in cache, b in cache) == (False, True)
        cache.release(b)
        assert b in cache

    asyncio.run(scenario())


def test_a_restarted_cache_keeps_its_entries_and_drops_leftover_temporary_files(tmp_path: Path) -> None:
    async def scenario() -> None:
        cache = BlobCache(tmp_path, max_bytes=10_000)
        cache.release(await lease(cache, blob(1)))

    asyncio.run(scenario())
    (tmp_path / ".tmp-crashed").write_bytes(b"partial")
    reopened = BlobCache(tmp_path, max_bytes=10_000)
    assert hashlib.sha256(blob(1)).hexdigest() in reopened
    assert not (tmp_path / ".tmp-crashed").exists()
