"""Request plumbing: trace ids, body-size limit, the error format outside DRF, rate-limit headers,
HEAD without a body."""

import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.core.handlers.asgi import ASGIRequest
from django.http import HttpRequest, HttpResponse, HttpResponseBase, StreamingHttpResponse
from django.urls import Resolver404, resolve
from django.views import defaults

from fetchml.conf import app_settings
from fetchml.errors import code_for_status, error_response, is_error_body, suspicious_request_message
from fetchml.jsonbody import CompactJsonResponse
from fetchml.ratelimits import apply_headers
from fetchml.tracing import new_trace_id, reset_trace_id, set_trace_id

access_log = logging.getLogger("fetchml.request")
_REASONS = {
    400: "Invalid request",
    401: "Invalid or missing API key",
    403: "Insufficient permissions",
    404: "Resource not found",
    405: "Method not allowed",
    413: "Request body too large",
    415: "Unsupported media type",
    429: "Rate limit exceeded",
    500: "An internal error occurred",
    503: "Service temporarily unavailable",
}
_KEPT_HEADERS = (
    "Allow",
    "Retry-After",
    "WWW-Authenticate",
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
)
# Bodies of this type are streamed to storage by the upload routes below, under their own limits;
# every other body, and a body of this type sent anywhere else, is held to DATA_UPLOAD_MAX_MEMORY_SIZE.
_STREAMED_TYPE = "application/octet-stream"
# The routes that take a streamed upload, by URL name and method: the most each may be sent.
_UPLOAD_ROUTES: dict[tuple[str, str], Callable[[], int]] = {
    ("snapshot-upload", "POST"): lambda: app_settings.MAX_SNAPSHOT_BYTES,
    ("dataset-list", "POST"): lambda: app_settings.MAX_DATASET_BYTES,
    ("artifact-file", "PUT"): lambda: app_settings.MAX_ARTIFACT_BYTES_PER_TASK,
    ("artifact-commit", "PUT"): lambda: app_settings.MAX_ARTIFACT_BYTES_PER_TASK,  # a file named "commit"
}


class BothWays:
    """A middleware Django may call synchronously (the test client, a WSGI server) or as a
    coroutine (daphne). Every middleware of the stack is both: one that is only synchronous
    makes Django run the stack in a thread that hands each request back to the event loop
    to reach the view, and daphne stopped on SIGTERM would then wait forever on a thread that
    had not handed its request back before the loop stopped."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)


class TraceIdMiddleware(BothWays):
    """Gives each request a trace id: in logs, in error bodies, as X-Request-ID."""

    def __call__(self, request: HttpRequest) -> Any:
        if self.is_async:
            return self.__acall__(request)
        token, started = self._begin(request)
        try:
            return self._end(request, self.get_response(request), started)
        finally:
            reset_trace_id(token)

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        token, started = self._begin(request)
        try:
            return self._end(request, await self.get_response(request), started)
        finally:
            reset_trace_id(token)

    @staticmethod
    def _begin(request: HttpRequest) -> tuple[Any, float]:
        trace_id = new_trace_id(request.META.get("HTTP_X_REQUEST_ID"))
        request.trace_id = trace_id
        return set_trace_id(trace_id), time.monotonic()

    @staticmethod
    def _end(request: HttpRequest, response: HttpResponseBase, started: float) -> HttpResponseBase:
        response["X-Request-ID"] = request.trace_id
        elapsed_ms = (time.monotonic() - started) * 1000
        access_log.info("%s %s %s %.1fms", request.method, request.path, response.status_code, elapsed_ms)
        return response


class HeadWithoutBodyMiddleware(BothWays):
    """The answer to a HEAD: the GET's status and headers, no body.

    Django passes a HEAD's body on, and daphne drops only its first chunk: the rest went out
    after the headers (a schema or a log page over 64 KiB, a download), and an event stream kept
    writing heartbeats to the connection, holding its channel-layer groups, for as long as the
    client stayed. A streaming body is replaced before it starts, so a stream never runs.
    """

    def __call__(self, request: HttpRequest) -> Any:
        if self.is_async:
            return self.__acall__(request)
        return _without_body(request, self.get_response(request))

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        return _without_body(request, await self.get_response(request))


def _without_body(request: HttpRequest, response: HttpResponseBase) -> HttpResponseBase:
    if request.method != "HEAD":
        return response
    if isinstance(response, StreamingHttpResponse):
        # Of the same kind: ASGI warns when it must consume a synchronous iterator. A file's
        # closer stays registered with the response.
        response.streaming_content = _no_frames() if response.is_async else ()
    elif isinstance(response, HttpResponse) and response.content:
        if not response.has_header("Content-Length"):  # the GET's length, not the emptied body's
            response["Content-Length"] = str(len(response.content))
        response.content = b""
    return response


async def _no_frames() -> AsyncIterator[bytes]:
    return
    yield  # an async generator that yields nothing


def _is_json(response: HttpResponse) -> bool:
    return response.get("Content-Type", "").startswith("application/json")


def _declare_chunked_length(request: HttpRequest) -> None:
    """Give a body sent without Content-Length (chunked) the length it has.

    The ASGI handler has the whole body in its spooled file before the request exists, but DRF
    reads only as many bytes as Content-Length declares: with none it would parse an empty body.
    """
    if "CONTENT_LENGTH" in request.META or not isinstance(request, ASGIRequest):
        return
    body_file = request._stream  # the handler's spooled file, not read yet
    if not (hasattr(body_file, "seekable") and body_file.seekable()):
        return  # a test client's payload, which always declares its length
    size = body_file.seek(0, os.SEEK_END)
    body_file.seek(0)
    if size:
        request.META["CONTENT_LENGTH"] = str(size)


def upload_limit(content_type: str, *, method: str, path: str) -> int | None:
    """The limit of the streamed upload a request is, None when it is none: its body is of the
    streamed type and `path` (as Django resolves it, without the query string) is a route that takes
    one by `method`. Resolved as Django will resolve it (trailing slash, an id in either case): an
    unknown path is a 404 whose body nothing reads."""
    if content_type.partition(";")[0].strip().lower() != _STREAMED_TYPE:
        return None
    try:
        match = resolve(path)
    except Resolver404:
        return None
    limit = _UPLOAD_ROUTES.get((match.url_name or "", method.upper()))
    return None if limit is None else limit()


def body_ceiling(content_type: str, *, method: str, path: str) -> int:
    """The most a request body may hold, checked as it arrives (`fetchml.daphne_bodies`): an upload
    route's own limit for the upload it streams (`upload_limit`), DATA_UPLOAD_MAX_MEMORY_SIZE for
    every other body, of whatever type, on whatever route."""
    limit = upload_limit(content_type, method=method, path=path)
    return _memory_ceiling() if limit is None else limit


def _memory_ceiling() -> int:
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    return sys.maxsize if limit is None else limit


def _exceeded_ceiling(request: HttpRequest) -> int | None:
    """The ceiling the declared body exceeds (`body_ceiling`), 0 when it does not; None if
    Content-Length is not a number.

    DRF reads JSON bodies as a stream, which bypasses Django's own
    DATA_UPLOAD_MAX_MEMORY_SIZE check (made only by `request.body`), so the
    limit is enforced here, before any view reads a byte. An upload route's
    view holds the upload it streams to its own limit itself, and says why.
    """
    content_type, method, path = request.content_type or "", request.method or "", request.path_info
    if upload_limit(content_type, method=method, path=path) is not None:
        return 0
    try:
        length = int(request.META.get("CONTENT_LENGTH") or "0")
    except ValueError:
        return None
    ceiling = _memory_ceiling()  # `body_ceiling` of a body that is no upload
    return ceiling if length > ceiling else 0


class ApiErrorMiddleware(BothWays):
    """Errors produced outside DRF (unknown URL, 405 of a plain view) get the
    standard JSON body; every authenticated API response gets X-RateLimit-*."""

    def __call__(self, request: HttpRequest) -> Any:
        if self.is_async:
            return self.__acall__(request)
        return _refused_body(request) or _in_the_error_format(request, self.get_response(request))

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        return _refused_body(request) or _in_the_error_format(request, await self.get_response(request))


def _refused_body(request: HttpRequest) -> HttpResponse | None:
    """The answer to a request whose declared body is malformed or over its limit, if it is."""
    _declare_chunked_length(request)
    exceeded = _exceeded_ceiling(request)
    if exceeded is None:
        return error_response(400, "Invalid Content-Length header")
    if exceeded:
        return error_response(413, f"Request body too large (limit {exceeded} bytes)")
    return None


def _in_the_error_format(request: HttpRequest, response: HttpResponseBase) -> HttpResponseBase:
    apply_headers(response, getattr(request, "fetchml_ratelimit", None))
    if response.status_code < 400 or _is_json(response) or _in_the_console(request):
        return response
    status = response.status_code
    said = getattr(response, "data", None)  # an API error rendered for a browser (the browsable API)
    if is_error_body(said):
        replacement = CompactJsonResponse(said, status=status)
    else:
        replacement = error_response(status, _REASONS.get(status, "Request failed"), code_for_status(status))
    for header in _KEPT_HEADERS:
        if header in response:
            replacement[header] = response[header]
    return replacement


def bad_request(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    if _in_the_console(request):
        return defaults.bad_request(request, exception)
    if isinstance(exception, RequestDataTooBig):
        return error_response(413, "Request body too large")
    return error_response(400, suspicious_request_message(exception))


def permission_denied(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    if _in_the_console(request):
        return defaults.permission_denied(request, exception)
    return error_response(403, "Insufficient permissions")


def page_not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    if _in_the_console(request):
        return defaults.page_not_found(request, exception)
    return error_response(404, "Resource not found")


def _in_the_console(request: HttpRequest) -> bool:
    """A page of the operator console, read in a browser: its refusals are pages, not the API's JSON."""
    return request.path.startswith("/admin/")


def server_error(request: HttpRequest) -> HttpResponse:
    return error_response(500, "An internal error occurred")
