"""Datasets from http(s):// and file:// sources through the real agent: cache, sharing, verification, resume.

A small local HTTP server stands for the outside web server (it counts requests and can hold or
cut responses); the agent speaks to a WebSocket peer and uploads no artifacts here (the live
server tests cover the file API).
"""

from __future__ import annotations

import hashlib
import stat
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from scheduler.agent.datasets import parse_specs
from scheduler.tests.agent_peer import FINAL, Peer, assign, python, run_async, running_agent, until

DATA = b"".join(f"row {i},{i * i}\n".encode() for i in range(20_000))  # ~250 KB
DATA_SHA = hashlib.sha256(DATA).hexdigest()
READ = "import os\nprint(open(os.path.join('data', 'rows.csv'), 'rb').read().count(b'\\n'))"


class Origin:
    """An HTTP server with one file: counts GETs, can hold the first response or cut it halfway."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.requests: list[dict[str, str]] = []
        self.release = threading.Event()
        self.release.set()
        self.cut_first = False
        origin = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                origin.requests.append({"path": self.path, "range": self.headers.get("Range", "")})
                origin.release.wait(30)
                start = 0
                if rng := self.headers.get("Range"):
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(origin.body) - 1}/{len(origin.body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(origin.body) - start))
                self.end_headers()
                body = origin.body[start:]
                if origin.cut_first and len(origin.requests) == 1:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(2)  # the connection drops mid-body
                    return
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/rows.csv"

    @contextmanager
    def serving(self) -> Iterator[Origin]:
        thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.release.set()
            self._server.shutdown()
            self._server.server_close()
            thread.join(10)


def spec(source: str, sha256: str | None = DATA_SHA, mount_path: str = "data/rows.csv") -> dict[str, str]:
    entry = {"name": "rows", "source": source, "mount_path": mount_path}
    return {**entry, "sha256": sha256} if sha256 else entry


async def all_finals(peer: Peer, tokens: list[str]) -> list[dict]:
    """The final statuses of several runs, whatever order they arrive in."""

    def finals() -> list[dict]:
        found = {m["token"]: m for m in peer.messages if m["type"] == "status" and m["status"] in FINAL}
        return [found[t] for t in tokens if t in found]

    await until(lambda: len(finals()) == len(tokens), what="every final status")
    return finals()


def cache_files(work: Path) -> list[str]:
    return sorted(p.name for p in (work / ".cache" / "blobs").iterdir())


def test_dataset_used_by_three_tasks_in_turn_is_downloaded_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        with Origin(DATA).serving() as origin:
            async with Peer() as peer, running_agent(peer.url, tmp_path / "work"):
                for _ in range(3):
                    message = assign(python(READ), dataset_specs=[spec(origin.url)])
                    await peer.send(message)
                    final = await peer.final(message["token"])
                    assert (final["status"], final["output"]) == ("completed", "20000")
        assert len(origin.requests) == 1

    run_async(scenario())


def test_concurrent_tasks_needing_the_same_dataset_download_it_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        with Origin(DATA).serving() as origin:
            origin.release.clear()  # hold the download until all three runs wait for it
            async with Peer() as peer, running_agent(peer.url, tmp_path / "work") as agent:
                messages = [assign(python(READ), dataset_specs=[spec(origin.url)]) for _ in range(3)]
                for message in messages:
                    await peer.send(message)
                pending = agent.files.cache._pending
                await until(lambda: DATA_SHA in pending and pending[DATA_SHA].waiters == 3, what="three waiters")
                origin.release.set()
                finals = await all_finals(peer, [m["token"] for m in messages])
        assert [(f["status"], f["output"]) for f in finals] == [("completed", "20000")] * 3
        assert len(origin.requests) == 1

    run_async(scenario())


def test_wrong_sha256_fails_the_task_as_preparation_and_leaves_nothing_in_the_cache(tmp_path: Path) -> None:
    async def scenario() -> None:
        with Origin(DATA).serving() as origin:
            async with Peer() as peer, running_agent(peer.url, tmp_path / "work"):
                message = assign(python("print('never')"), dataset_specs=[spec(origin.url, sha256="0" * 64)])
                await peer.send(message)
                final = await peer.final(message["token"])
        assert (final["status"], final["failure_reason"]) == ("failed", "preparation")
        assert final["error"].startswith("dataset rows: sha256 mismatch")
        assert DATA_SHA in final["error"]
        assert "running" not in [m.get("status") for m in peer.about(message["token"])]
        assert cache_files(tmp_path / "work") == []

    run_async(scenario())


def test_interrupted_download_resumes_where_it_stopped(tmp_path: Path) -> None:
    async def scenario() -> None:
        with Origin(DATA).serving() as origin:
            origin.cut_first = True
            async with Peer() as peer, running_agent(peer.url, tmp_path / "work"):
                message = assign(python(READ), dataset_specs=[spec(origin.url)])
                await peer.send(message)
                final = await peer.final(message["token"])
        assert (final["status"], final["output"]) == ("completed", "20000")
        assert [r["range"] for r in origin.requests] == ["", f"bytes={len(DATA) // 2}-"]
        assert cache_files(tmp_path / "work") == [DATA_SHA]

    run_async(scenario())


def test_dataset_appears_as_a_read_only_link_into_the_cache(tmp_path: Path) -> None:
    code = (
        "import os, stat\n"
        "path = os.path.join('data', 'rows.csv')\n"
        "print(os.path.islink(path), oct(stat.S_IMODE(os.stat(path).st_mode)), os.path.realpath(path))"
    )

    async def scenario() -> None:
        with Origin(DATA).serving() as origin:
            async with Peer() as peer, running_agent(peer.url, tmp_path / "work"):
                message = assign(python(code), dataset_specs=[spec(origin.url)])
                await peer.send(message)
                final = await peer.final(message["token"])
        entry = tmp_path / "work" / ".cache" / "blobs" / DATA_SHA
        assert final["output"] == f"True 0o444 {entry.resolve()}"
        assert stat.S_IMODE(entry.stat().st_mode) == 0o444

    run_async(scenario())


def test_file_source_without_sha256_is_copied_hashed_and_cached(tmp_path: Path) -> None:
    shared = tmp_path / "shared fs" / "rows.csv"
    shared.parent.mkdir()
    shared.write_bytes(DATA)

    async def scenario() -> None:
        async with Peer() as peer, running_agent(peer.url, tmp_path / "work"):
            source = shared.as_uri()
            message = assign(python(READ), dataset_specs=[spec(source, sha256=None)])
            await peer.send(message)
            assert (await peer.final(message["token"]))["output"] == "20000"
        assert cache_files(tmp_path / "work") == [DATA_SHA]

    run_async(scenario())


def test_unsupported_source_or_escaping_mount_path_fails_as_preparation(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Peer() as peer, running_agent(peer.url, tmp_path / "work"):
            bad = [
                (spec("s3://bucket/rows.csv"), "dataset rows: unsupported source 's3://bucket/rows.csv'"),
                (spec("file:///x", mount_path="../x"), "dataset rows: mount_path '../x' must stay inside"),
                (spec("file:///nonexistent-fetchml/rows.csv", sha256=None), "dataset rows: file:///nonexistent"),
            ]
            errors = Counter()
            for entry, expected in bad:
                message = assign(python("print('never')"), dataset_specs=[entry])
                await peer.send(message)
                final = await peer.final(message["token"])
                assert (final["status"], final["failure_reason"]) == ("failed", "preparation")
                assert final["error"].startswith(expected), final["error"]
                errors[final["error"]] += 1
            assert len(errors) == len(bad)

    run_async(scenario())


def test_server_datasets_list_mounts_each_name_under_datasets() -> None:
    specs = parse_specs((), ("mnist", "fetchml://datasets/cifar.tar"))
    assert [(s.source, str(s.mount_path), s.sha256) for s in specs] == [
        ("fetchml://datasets/mnist", "datasets/mnist", None),
        ("fetchml://datasets/cifar.tar", "datasets/cifar.tar", None),
    ]
