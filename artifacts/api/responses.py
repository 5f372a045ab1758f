"""Raw bodies in, stored files out: the HTTP side of streaming bytes.

Downloads honour a single `Range: bytes=a-b` (206 + Content-Range; 416 when
it cannot be served; ignored when it asks for nothing) and stream in chunks.
Under ASGI the chunks come from an async iterator: Django would otherwise
collect a synchronous iterator into a list, i.e. hold the whole file in memory.
"""

import io
import posixpath
import re
from collections.abc import AsyncIterator, Iterator
from typing import IO, BinaryIO

from asgiref.sync import sync_to_async
from django.core.handlers.asgi import ASGIRequest
from django.http import HttpResponseBase, StreamingHttpResponse
from django.utils.http import content_disposition_header
from rest_framework.parsers import BaseParser
from rest_framework.request import Request

from artifacts.storage import CHUNK_BYTES, file_storage
from fetchml.errors import error_response

_RANGE = re.compile(r"^(\d*)-(\d*)$")
_BYTES = "bytes="


class RawStreamParser(BaseParser):
    """Hands the view the request stream itself; nothing is read here.

    DRF's parsers (and `request.body`) read a body whole into memory; uploads
    are instead copied chunk by chunk by `artifacts.storage.receive`.
    """

    media_type = "application/octet-stream"

    def parse(self, stream: BinaryIO | None, media_type: str | None = None, parser_context: dict | None = None):
        return stream


def body_stream(request: Request) -> BinaryIO:
    data = request.data  # the stream from RawStreamParser; {} for an empty body
    return data if hasattr(data, "read") else io.BytesIO(b"")


def declared_length(request: Request) -> int | None:
    try:
        return int(request.META.get("CONTENT_LENGTH") or "")
    except ValueError:
        return None


class UnsatisfiableRange(Exception):
    pass


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte of a single range, None for the whole file.

    A header in a unit other than bytes (units are case-insensitive), or empty, or `bytes=` with no
    range after it, is ignored (RFC 9110 14.2: a server must ignore a range unit it does not
    understand, and may ignore a Range it cannot use); a byte range it cannot serve is refused.
    """
    value = (header or "").strip()
    if value[: len(_BYTES)].lower() != _BYTES:
        return None
    ranges = value[len(_BYTES) :].strip()
    if not ranges:
        return None
    match = _RANGE.match(ranges)
    if match is None or match[1] == match[2] == "":
        raise UnsatisfiableRange
    if match[1] == "":  # suffix: the last N bytes
        suffix = int(match[2])
        if suffix == 0 or size == 0:
            raise UnsatisfiableRange
        return max(size - suffix, 0), size - 1
    first = int(match[1])
    last = int(match[2]) if match[2] else size - 1
    if first >= size or last < first:
        raise UnsatisfiableRange
    return first, min(last, size - 1)


def _sync_chunks(handle: IO[bytes], length: int) -> Iterator[bytes]:
    try:
        while length > 0 and (chunk := handle.read(min(CHUNK_BYTES, length))):
            length -= len(chunk)
            yield chunk
    finally:
        handle.close()


async def _async_chunks(handle: IO[bytes], length: int) -> AsyncIterator[bytes]:
    read = sync_to_async(handle.read, thread_sensitive=False)
    try:
        while length > 0 and (chunk := await read(min(CHUNK_BYTES, length))):
            length -= len(chunk)
            yield chunk
    finally:
        await sync_to_async(handle.close, thread_sensitive=False)()


def stored_file_response(
    request: Request,
    *,
    storage_key: str,
    size: int,
    sha256: str,
    filename: str,
    content_type: str = "application/octet-stream",
) -> HttpResponseBase:
    """Stream a stored file (or one range of it) as an attachment."""
    try:
        byte_range = parse_range(request.headers.get("Range"), size)
    except UnsatisfiableRange:
        return error_response(416, "Range not satisfiable", Content_Range=f"bytes */{size}")
    first, last = byte_range or (0, size - 1)
    length = last - first + 1 if size else 0
    handle = file_storage().open(storage_key, "rb")
    if first:
        handle.seek(first)
    django_request = request._request  # DRF's documented way to the HttpRequest
    chunks = _async_chunks(handle, length) if isinstance(django_request, ASGIRequest) else _sync_chunks(handle, length)
    response = StreamingHttpResponse(chunks, status=206 if byte_range else 200, content_type=content_type)
    # Closed by the response too, as FileResponse does, in case it is never iterated.
    response._resource_closers.append(handle.close)
    response["Content-Length"] = str(length)
    response["Accept-Ranges"] = "bytes"
    response["ETag"] = f'"{sha256}"'
    response["Content-Disposition"] = content_disposition_header(True, posixpath.basename(filename))
    if byte_range:
        response["Content-Range"] = f"bytes {first}-{last}/{size}"
    return response
