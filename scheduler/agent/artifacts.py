"""Artifacts: upload what a run left in its output directory, plus its full logs, then commit.

Order (docs/files-protocol.md): ``PUT /v1/tasks/<id>/artifacts/<path>`` for each file (the logs
first, then the output directory's regular files by path), then one ``POST .../artifacts/commit``
with the manifest of everything stored. Names the server refuses for their characters (not UTF-8,
control characters) are skipped before any request, as links and special files are. Each request
retries transient failures (network, 429, 5xx) with back-off for a bounded time; what the server
refuses is handled per status:

* 413 (over the task's budget) and 422 (a path the server does not accept): that file is left out
  of the manifest and reported in the final status (`skipped_artifacts`);
* 409: the token is no longer this run's (`StaleRun`): stop, say nothing more about the run;
* anything else, or retries exhausted: `UploadFailed`.

Once a run's end is acknowledged, `RunDirs` removes its work directory (the unpacked snapshot and
outputs, stored on the server by then), but for the few most recent and any holding files stored
nowhere else. Those it keeps on purpose carry a marker in their `.fetchml/`, so that an agent
starting later (`remove_unfinished`) removes only what an agent that stopped before finishing its
runs left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import stat
import sys
import threading
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scheduler.agent.files import FileServices, with_retries
from scheduler.agent.http import HttpStatusError, TransferError, quote_path, sha256_file
from scheduler.agent.protocol import PATH_CONTROL_CHARACTERS

logger = logging.getLogger(__name__)

SHA256_HEADER = "X-Content-SHA256"
_ON_ERROR = "onexc" if sys.version_info >= (3, 12) else "onerror"  # shutil.rmtree's handler, by version
NOT_UPLOADING = "this worker does not upload artifacts"  # --no-artifacts: said of every run, so not a warning
RUN_FILES = ".fetchml"  # a run's own files inside its work directory: its full logs, the markers below
# Markers in a run's RUN_FILES: its directory was kept on purpose and outlives the agent that kept it.
KEPT_MARKER = "kept"  # files stored nowhere else; holds the reason. Never removed by an agent
RECENT_MARKER = "recent"  # one of the --keep-run-dirs most recent; holds the agent's name, whose successor adopts it


class StaleRun(Exception):
    """The server no longer takes uploads for this token (409)."""


class UploadFailed(Exception):
    """The artifacts could not be stored; the message says why."""


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}


@dataclass
class Collected:
    manifest: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def note(self) -> str:
        """One line for the final status' `error` text naming what was left out."""
        if not self.skipped:
            return ""
        over = [s.path for s in self.skipped if s.reason == "over_budget"]
        other = [f"{s.path} ({s.reason})" for s in self.skipped if s.reason != "over_budget"]
        parts = ([f"artifacts skipped (over budget): {', '.join(over)}"] if over else []) + (
            [f"artifacts skipped: {', '.join(other)}"] if other else []
        )
        return "; ".join(parts)


def output_files(output_dir: Path) -> tuple[list[tuple[str, Path]], list[Skipped]]:
    """Regular files under `output_dir` by relative POSIX path; links, special files and names the
    server cannot take are skipped."""
    found: list[tuple[str, Path]] = []
    skipped: list[Skipped] = []
    for path in sorted(output_dir.rglob("*")):
        relative = path.relative_to(output_dir).as_posix()
        if path.is_dir() and not path.is_symlink():
            continue
        unsendable = _unsendable_name(relative)
        if unsendable:
            skipped.append(Skipped(_shown_name(relative), unsendable))
        elif path.is_symlink():
            skipped.append(Skipped(relative, "symbolic link"))
        elif path.is_file():
            found.append((relative, path))
        else:
            skipped.append(Skipped(relative, "not a regular file"))
    return found, skipped


def _unsendable_name(relative: str) -> str:
    """Why the server would refuse `relative` for its characters ("" if it would not).

    Decided here rather than left to the upload's 422, so that a refusal arriving as anything else
    (a route or proxy that rejects the URL) cannot fail the whole run and lose its other files.
    """
    try:
        relative.encode("utf-8")
    except UnicodeEncodeError:  # bytes the file system could not decode, held as surrogates
        return "name is not UTF-8"
    if PATH_CONTROL_CHARACTERS.search(relative):
        return "name contains a control character"
    return ""


def _shown_name(relative: str) -> str:
    """`relative` as printable UTF-8 for the final status: undecodable bytes and control characters
    escaped as Python writes them (a lone surrogate could not be stored, a newline would break the line)."""
    printable = relative.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return PATH_CONTROL_CHARACTERS.sub(lambda match: repr(match.group())[1:-1], printable)


async def collect(
    files: FileServices,
    *,
    task_id: str,
    token: str,
    output_dir: Path,
    logs: dict[str, Path],
    abort: threading.Event,
) -> Collected:
    """Upload the logs and outputs, commit the manifest; the manifest and what was skipped."""
    outputs, skipped = output_files(output_dir)
    result = Collected(skipped=skipped)
    for relative, _ in outputs:
        if relative in logs:
            result.skipped.append(Skipped(relative, "path reserved for the run's log"))
    uploads = [*logs.items(), *((r, p) for r, p in outputs if r not in logs)]
    for relative, path in uploads:
        entry = await _upload(files, task_id=task_id, token=token, relative=relative, path=path, abort=abort)
        if isinstance(entry, Skipped):
            result.skipped.append(entry)
        else:
            result.manifest.append(entry)

    async def commit() -> Any:
        return await asyncio.to_thread(
            files.server.post_json,
            f"/v1/tasks/{task_id}/artifacts/commit",
            {"artifacts": result.manifest},
            token=token,
        )

    await _refusals(with_retries(files, f"task {task_id}: committing artifacts", commit), "commit")
    return result


async def _upload(
    files: FileServices, *, task_id: str, token: str, relative: str, path: Path, abort: threading.Event
) -> dict[str, Any] | Skipped:
    url_path = f"/v1/tasks/{task_id}/artifacts/{quote_path(relative)}"
    for _ in range(2):  # a second try only if the file changed while it was being sent
        try:
            size = path.stat().st_size
            sha256 = await asyncio.to_thread(sha256_file, path, abort)
        except FileNotFoundError:
            return Skipped(relative, "removed before it could be uploaded")

        async def put(size: int = size, sha256: str = sha256) -> Any:
            return await asyncio.to_thread(
                files.server.put_file, url_path, path, size=size, sha256=sha256, token=token, abort=abort
            )

        try:
            await _refusals(with_retries(files, f"task {task_id}: uploading {relative}", put), relative)
        except HttpStatusError as exc:
            if exc.status == 413:
                return Skipped(relative, "over_budget")
            if any(detail.get("field") == SHA256_HEADER for detail in exc.details):
                continue
            return Skipped(relative, f"refused by the server: {exc.message}")
        return {"path": relative, "size": size, "sha256": sha256}
    return Skipped(relative, "the file kept changing while it was uploaded")


async def _refusals(call: Any, what: str) -> Any:
    """Await an upload or commit, turning the server's answers into this module's outcomes.

    413 and 422 pass through as HttpStatusError for the caller to record as skipped.
    """
    try:
        return await call
    except HttpStatusError as exc:
        if exc.status == 409:
            raise StaleRun(exc.message) from None
        if exc.status in (413, 422) and what != "commit":
            raise
        raise UploadFailed(f"artifact {what}: {exc}") from None
    except TransferError as exc:
        raise UploadFailed(f"artifact {what}: {exc}") from None


class RunDirs:
    """The work directories of finished runs: all but the `keep` most recent are removed, except
    those holding files stored nowhere else (an upload that failed, a worker that does not upload)."""

    def __init__(self, *, keep: int, name: str = "") -> None:
        self.keep = keep
        self.name = name  # the agent's: a restarted agent of this name takes over its most recent directories
        self._recent: deque[Path] = deque()
        self._removals: set[asyncio.Task[None]] = set()

    def ended(self, *, work_dir: Path, unstored: str) -> None:
        """A run's final status was made: a directory holding files stored nowhere else is marked
        kept now, so that it outlives an agent that dies before the end is acknowledged."""
        if unstored:
            _mark(work_dir, KEPT_MARKER, unstored)

    def finished(self, *, task_id: str, work_dir: Path, unstored: str) -> None:
        """A run's end was acknowledged; `unstored` says why its directory must stay ("" if it need not)."""
        if unstored:
            level = logging.INFO if unstored == NOT_UPLOADING else logging.WARNING
            logger.log(level, "task %s: keeping its work directory %s: %s", task_id, work_dir, unstored)
            return  # marked kept when the run ended (`ended`)
        if work_dir in self._recent:
            return
        self._recent.append(work_dir)
        self._trim()
        if work_dir in self._recent:
            _mark(work_dir, RECENT_MARKER, self.name)

    def adopt(self, work_root: Path) -> None:
        """Count the most recent directories an earlier agent of this name kept (`RECENT_MARKER`)
        as this agent's, oldest first: across restarts no more than `keep` stay."""
        kept = []
        for work_dir in run_dirs(work_root):
            marker = work_dir / RUN_FILES / RECENT_MARKER
            with contextlib.suppress(OSError, UnicodeDecodeError):
                if marker.read_text() == self.name:
                    kept.append((marker.stat().st_mtime, work_dir))
        self._recent.extendleft(work_dir for _, work_dir in sorted(kept, reverse=True))
        self._trim()

    def _trim(self) -> None:
        while len(self._recent) > self.keep:
            removal = asyncio.create_task(asyncio.to_thread(_remove, self._recent.popleft()))
            self._removals.add(removal)
            removal.add_done_callback(self._removals.discard)

    async def wait(self) -> None:
        """Until the removals under way are done."""
        if self._removals:
            await asyncio.wait(self._removals)


def remove_unfinished(work_root: Path) -> list[Path]:
    """Remove the run directories under `work_root` that no agent kept on purpose: those of runs an
    agent was still running when it stopped without finishing them (killed, crashed). The server
    has re-queued or ended those runs; their files, possibly large, would otherwise stay for good.
    Only for an agent that knows no other live agent uses `work_root` (orphans.claimed)."""
    removed = []
    for work_dir in run_dirs(work_root):
        if any((work_dir / RUN_FILES / marker).exists() for marker in (KEPT_MARKER, RECENT_MARKER)):
            continue
        logger.warning(
            "removing the work directory %s: an earlier agent stopped before it finished task %s there "
            "(the server has re-queued or ended that run)",
            work_dir,
            work_dir.parent.name,
        )
        _remove(work_dir)
        removed.append(work_dir)
    return removed


def run_dirs(work_root: Path) -> Iterator[Path]:
    """The runs' work directories under `work_root`: `<task_id>/<attempt>/` holding `RUN_FILES`,
    never anything else kept there (the blob cache, Jupyter workspaces, the agents' lock)."""
    for task_dir in _subdirectories(work_root):
        if not _is_task_id(task_dir.name):
            continue
        for work_dir in _subdirectories(task_dir):
            if work_dir.name.isascii() and work_dir.name.isdigit() and _is_real_dir(work_dir / RUN_FILES):
                yield work_dir


def _subdirectories(path: Path) -> list[Path]:
    """Directories in `path`, not links to them: nothing outside the work root is looked into."""
    try:
        with os.scandir(path) as entries:
            return [Path(entry.path) for entry in entries if entry.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def _is_task_id(name: str) -> bool:
    try:
        uuid.UUID(name)
    except ValueError:
        return False
    return True


def _is_real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _mark(work_dir: Path, marker: str, text: str) -> None:
    try:
        (work_dir / RUN_FILES / marker).write_text(text)
    except FileNotFoundError:
        pass  # no directory left to keep (a run that failed before it was made)
    except OSError as exc:
        logger.warning("cannot mark the work directory %s as kept: %s", work_dir, exc)


def _remove(work_dir: Path) -> None:
    """Remove a run's directory, and its task's directory when that is left empty (no other attempt)."""
    try:
        shutil.rmtree(work_dir, **{_ON_ERROR: _unlocked_and_again})
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.warning("cannot remove the work directory %s: %s", work_dir, exc)
        return
    with contextlib.suppress(OSError):
        os.rmdir(work_dir.parent)


def _unlocked_and_again(function: Any, path: str, _: Any) -> None:
    """What a task made read-only (a directory without write permission) is its to remove all the same."""
    os.chmod(os.path.dirname(path), stat.S_IRWXU)
    function(path)
