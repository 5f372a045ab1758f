"""Blocking HTTP transfers for the agent, standard library only: the server's /v1 file API and dataset URLs.

Every function here blocks; callers run it with ``asyncio.to_thread`` so the event loop never
waits on the network. Every socket operation has a timeout, and long transfers check an abort
flag between 64 KiB chunks so a cancelled run stops its transfer within one chunk.

Errors fall in three classes: `TransientError` (network trouble, 429, 5xx: try again later),
`HttpStatusError` (the server refused: trying again cannot help) and `Aborted`.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

from scheduler.agent import AGENT_VERSION

CHUNK = 64 * 1024
USER_AGENT = f"fetchml-agent/{AGENT_VERSION}"


class TransferError(Exception):
    """A transfer did not complete."""


# The longest wait a server's Retry-After may ask of a retry (a larger one is held to it).
MAX_RETRY_AFTER_SECONDS = 60.0


class TransientError(TransferError):
    """Worth retrying: the network failed, or the server is overloaded or broken for now.
    `retry_after`: the seconds the server asked to wait (its Retry-After), if it said."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _retry_after(value: str | None) -> float | None:
    """A Retry-After of whole seconds, held to MAX_RETRY_AFTER_SECONDS; None for anything else."""
    if value is None or not value.strip().isdigit():
        return None
    return min(float(value.strip()), MAX_RETRY_AFTER_SECONDS)


class HttpStatusError(TransferError):
    """The server answered with a refusal that a retry would not change."""

    def __init__(self, status: int, message: str, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.details = details or []


class Aborted(TransferError):
    """The run this transfer was for went away."""


class TooLarge(TransferError):
    """The body is larger than the caller allows."""


def sha256_file(path: Path, abort: threading.Event | None = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(CHUNK):
            if abort is not None and abort.is_set():
                raise Aborted("aborted")
            digest.update(chunk)
    return digest.hexdigest()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """The server's API never redirects; following one would hand the API key to another host."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_SERVER_OPENER = urllib.request.build_opener(_NoRedirect)
_PUBLIC_OPENER = urllib.request.build_opener()


def _refusal(exc: urllib.error.HTTPError) -> TransferError:
    """Classify an HTTP error response, reading its `{error, details}` body when it has one."""
    try:
        body = json.loads(exc.read(CHUNK) or b"{}")
    except (ValueError, OSError):
        body = {}
    finally:
        exc.close()
    message = str(body.get("error") or exc.reason) if isinstance(body, dict) else str(exc.reason)
    details = body.get("details") if isinstance(body, dict) and isinstance(body.get("details"), list) else []
    if exc.code == 429 or exc.code >= 500:
        return TransientError(f"HTTP {exc.code}: {message}", retry_after=_retry_after(exc.headers.get("Retry-After")))
    return HttpStatusError(exc.code, message, details)


def _open(opener: urllib.request.OpenerDirector, request: urllib.request.Request, timeout: float) -> Any:
    request.add_header("User-Agent", USER_AGENT)
    try:
        return opener.open(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        raise _refusal(exc) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise TransientError(f"{request.get_method()} {request.full_url}: {exc}") from None


def fetch_to_file(
    url: str,
    dest: Path,
    *,
    timeout: float,
    max_bytes: int,
    abort: threading.Event,
    headers: Mapping[str, str] | None = None,
    server: bool = False,
) -> None:
    """Download `url` into `dest`, resuming from what `dest` already holds (Range) when it exists.

    A server that ignores the Range gets the file rewritten from the start. A connection that ends
    before the announced length raises TransientError and leaves the partial file for the next try.
    """
    offset = dest.stat().st_size if dest.exists() else 0
    request = urllib.request.Request(url, headers=dict(headers or {}))
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = _open(_SERVER_OPENER if server else _PUBLIC_OPENER, request, timeout)
    except HttpStatusError as exc:
        if exc.status == 416 and offset:  # what we hold is no prefix of the file any more
            dest.unlink()
            raise TransientError("the partial download does not match the source; starting over") from None
        raise
    with response:
        resumed = offset and response.status == 206
        if resumed and not str(response.headers.get("Content-Range", "")).startswith(f"bytes {offset}-"):
            raise TransientError(f"unexpected Content-Range {response.headers.get('Content-Range')!r}")
        written = offset if resumed else 0
        length = response.headers.get("Content-Length")
        expected_end = written + int(length) if length and length.isdigit() else None
        if expected_end is not None and expected_end > max_bytes:
            raise TooLarge(f"{expected_end} bytes, over the limit of {max_bytes}")
        try:
            with dest.open("ab" if resumed else "wb") as target:
                while True:
                    if abort.is_set():
                        raise Aborted("aborted")
                    chunk = response.read(CHUNK)
                    if not chunk:
                        break
                    written += len(chunk)
                    if written > max_bytes:
                        raise TooLarge(f"over the limit of {max_bytes} bytes")
                    target.write(chunk)
        except (OSError, http.client.HTTPException) as exc:
            raise TransientError(f"GET {url}: {exc}") from None
    if expected_end is not None and written < expected_end:
        raise TransientError(f"GET {url}: the connection closed after {written} of {expected_end} bytes")


class _AbortableReader:
    """A file wrapper for request bodies: http.client reads it in blocks; each read checks `abort`."""

    def __init__(self, source: BinaryIO, abort: threading.Event) -> None:
        self._source = source
        self._abort = abort

    def read(self, size: int = CHUNK) -> bytes:
        if self._abort.is_set():
            raise Aborted("aborted")
        return self._source.read(size)


@dataclass(frozen=True)
class ServerFiles:
    """The server's file API, authenticated with the worker's API key."""

    base_url: str
    api_key: str
    timeout: float = 30.0

    @staticmethod
    def from_worker_url(url: str) -> str:
        """`ws(s)://host:port[/prefix]/ws/worker` -> `http(s)://host:port[/prefix]`."""
        parts = urlsplit(url)
        scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
        return urlunsplit((scheme, parts.netloc, parts.path.removesuffix("/ws/worker").rstrip("/"), "", ""))

    def url(self, path: str, query: Mapping[str, str] | None = None) -> str:
        return f"{self.base_url.rstrip('/')}{path}" + (f"?{urlencode(dict(query))}" if query else "")

    def _headers(self, **extra: str) -> dict[str, str]:
        return {"X-API-Key": self.api_key, **extra}

    def get_json(self, path: str, *, query: Mapping[str, str] | None = None) -> Any:
        request = urllib.request.Request(self.url(path, query), headers=self._headers(Accept="application/json"))
        return self._json(request)

    def download(
        self, path: str, dest: Path, *, max_bytes: int, abort: threading.Event, query: Mapping[str, str] | None = None
    ) -> None:
        fetch_to_file(
            self.url(path, query),
            dest,
            timeout=self.timeout,
            max_bytes=max_bytes,
            abort=abort,
            headers=self._headers(),
            server=True,
        )

    def put_file(
        self, path: str, source: Path, *, size: int, sha256: str, token: str, abort: threading.Event
    ) -> dict[str, Any]:
        """Stream `source` as the body of a PUT (http.client sends a file object in blocks)."""
        headers = self._headers(
            **{
                "Content-Type": "application/octet-stream",
                "Content-Length": str(size),
                "X-Content-SHA256": sha256,
                "X-Fetchml-Token": token,
            }
        )
        with source.open("rb") as body:
            request = urllib.request.Request(
                self.url(path), data=_AbortableReader(body, abort), headers=headers, method="PUT"
            )
            return self._json(request)

    def post_json(self, path: str, body: Any, *, token: str) -> Any:
        headers = self._headers(**{"Content-Type": "application/json", "X-Fetchml-Token": token})
        request = urllib.request.Request(self.url(path), data=json.dumps(body).encode(), headers=headers, method="POST")
        return self._json(request)

    def _json(self, request: urllib.request.Request) -> Any:
        response = _open(_SERVER_OPENER, request, self.timeout)
        try:
            with response:
                return json.loads(response.read() or b"null")
        except (ValueError, OSError, http.client.HTTPException) as exc:
            raise TransientError(f"{request.get_method()} {request.full_url}: {exc}") from None


def quote_path(relative: str) -> str:
    """A relative POSIX path for a URL, each segment percent-encoded."""
    return "/".join(quote(segment, safe="") for segment in relative.split("/"))
