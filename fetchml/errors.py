"""The one error format of FetchML: {"error", "code", "trace_id"} (+ "details").

Services raise ApplicationError subclasses; `exception_handler` (DRF) and
`error_response` (plain Django: 404/405/500, middleware) render every error in
the system through `error_body`.
"""

import logging
import math
from typing import Any

from django.conf import settings
from django.core.exceptions import (
    DisallowedHost,
    PermissionDenied,
    RequestDataTooBig,
    SuspiciousOperation,
    TooManyFieldsSent,
    TooManyFilesSent,
)
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import InterfaceError, InternalError, OperationalError
from django.http import Http404
from rest_framework import exceptions as drf_exceptions
from rest_framework.response import Response
from rest_framework.views import set_rollback

from fetchml.jsonbody import CompactJsonResponse
from fetchml.tracing import current_trace_id

logger = logging.getLogger("fetchml.errors")

DATABASE_RETRY_AFTER_SECONDS = 1


class ApplicationError(Exception):
    status_code = 400
    code = "BAD_REQUEST"
    default_message = "Invalid request"

    def __init__(self, message: str | None = None, *, details: list[dict] | None = None):
        self.message = message or self.default_message
        self.details = details
        super().__init__(self.message)


class Invalid(ApplicationError):
    status_code = 422
    code = "VALIDATION_ERROR"
    default_message = "Validation failed"


class NotFound(ApplicationError):
    status_code = 404
    code = "NOT_FOUND"
    default_message = "Resource not found"


class Conflict(ApplicationError):
    status_code = 409
    code = "CONFLICT"
    default_message = "Conflict with the current state of the resource"


class Forbidden(ApplicationError):
    status_code = 403
    code = "FORBIDDEN"
    default_message = "Insufficient permissions"


class Unavailable(ApplicationError):
    status_code = 503
    code = "SERVICE_UNAVAILABLE"
    default_message = "Service temporarily unavailable"


class RateLimited(ApplicationError):
    status_code = 429
    code = "RATE_LIMITED"
    default_message = "Rate limit exceeded"

    def __init__(self, message: str | None = None, *, retry_after: int | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class PayloadTooLarge(ApplicationError):
    status_code = 413
    code = "BAD_REQUEST"
    default_message = "Request body too large"


_CODES_BY_STATUS = {
    400: "BAD_REQUEST",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "BAD_REQUEST",
    406: "BAD_REQUEST",
    409: "CONFLICT",
    413: "BAD_REQUEST",
    415: "BAD_REQUEST",
    422: "VALIDATION_ERROR",
    429: "RATE_LIMITED",
    500: "INTERNAL_ERROR",
    503: "SERVICE_UNAVAILABLE",
}


def error_body(message: str, code: str, details: list[dict] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"error": message, "code": code, "trace_id": current_trace_id()}
    if details:
        body["details"] = details
    return body


def is_error_body(data: object) -> bool:
    """Whether `data` is a body `error_body` made (a DRF response's data, before rendering)."""
    return isinstance(data, dict) and {"error", "code", "trace_id"} <= data.keys()


def code_for_status(status: int) -> str:
    return _CODES_BY_STATUS.get(status, "INTERNAL_ERROR" if status >= 500 else "BAD_REQUEST")


def error_response(status: int, message: str, code: str | None = None, **headers: str) -> CompactJsonResponse:
    response = CompactJsonResponse(error_body(message, code or code_for_status(status)), status=status)
    for name, value in headers.items():
        response[name.replace("_", "-")] = value
    return response


# PostgreSQL ended the session of a transaction left idle too long (a process frozen in it): its
# SQLSTATE is of the class "invalid transaction state", which the driver raises as InternalError.
_SESSION_ENDED_IDLE_IN_TRANSACTION = "25P03"


def database_unavailable(exc: BaseException) -> bool:
    """Whether `exc` says the database could not be used, not that the request was wrong: out of
    reach, restarting, a wait given up on, or the session ended by the server."""
    if isinstance(exc, OperationalError | InterfaceError):
        return True
    cause = exc.__cause__
    return isinstance(exc, InternalError) and getattr(cause, "sqlstate", None) == _SESSION_ENDED_IDLE_IN_TRANSACTION


def suspicious_request_message(exc: Exception | None) -> str:
    """What a request Django refuses as suspicious is told (never what it sent: a Host, a path)."""
    if isinstance(exc, TooManyFieldsSent):
        return f"Too many query parameters or form fields (at most {settings.DATA_UPLOAD_MAX_NUMBER_FIELDS})"
    if isinstance(exc, TooManyFilesSent):
        return f"Too many files (at most {settings.DATA_UPLOAD_MAX_NUMBER_FILES})"
    if isinstance(exc, DisallowedHost):
        return "The Host header names no host this server answers for (ALLOWED_HOSTS)"
    return "Invalid request"


EMPTY_NAME = '""'


def _flatten_validation(detail: Any, prefix: str | None = None) -> list[dict]:
    """DRF's nested error dict -> [{"field": "a.b[0]", "message": "..."}]; a body-wide error has field null.

    A field named "" (an unknown field of that name) keeps its name, so that it stays told apart from a
    body-wide error."""
    items: list[dict] = []
    if isinstance(detail, dict):
        for key, value in detail.items():
            if key == "non_field_errors":
                field = prefix
            else:
                # A nested field named "" is spelled `a.""`: `a.` would read as a slip.
                field = f"{prefix}.{EMPTY_NAME if key == '' else key}" if prefix is not None else str(key)
            items.extend(_flatten_validation(value, field))
    elif isinstance(detail, list):
        if all(not isinstance(v, (dict, list)) for v in detail):
            items.extend({"field": prefix, "message": str(v)} for v in detail)
        else:
            for index, value in enumerate(detail):
                if value:
                    items.extend(_flatten_validation(value, f"{prefix or ''}[{index}]"))
    else:
        items.append({"field": prefix, "message": str(detail)})
    return items


def _summary(details: list[dict]) -> str:
    named = [EMPTY_NAME if d["field"] == "" else d["field"] for d in details if d["field"] is not None]
    return "Validation failed: " + ", ".join(dict.fromkeys(named)) if named else details[0]["message"]


def exception_handler(exc: Exception, context: dict) -> Response:
    """DRF's EXCEPTION_HANDLER: every API error leaves through here."""
    # As DRF's own handler does: a failed request must not commit half its work
    # when ATOMIC_REQUESTS is on.
    set_rollback()
    return _error_for(exc, context)


def _error_for(exc: Exception, context: dict) -> Response:
    headers: dict[str, str] = {}
    if isinstance(exc, ApplicationError):
        return Response(error_body(exc.message, exc.code, exc.details), status=exc.status_code)
    if isinstance(exc, DjangoValidationError):
        exc = drf_exceptions.ValidationError(exc.message_dict if hasattr(exc, "error_dict") else exc.messages)
    if isinstance(exc, Http404):
        return Response(error_body("Resource not found", "NOT_FOUND"), status=404)
    if isinstance(exc, PermissionDenied):
        return Response(error_body("Insufficient permissions", "FORBIDDEN"), status=403)
    if isinstance(exc, RequestDataTooBig):
        return Response(error_body("Request body too large", "BAD_REQUEST"), status=413)
    if isinstance(exc, SuspiciousOperation):
        # Raised while DRF reads the query or body (more than DATA_UPLOAD_MAX_NUMBER_FIELDS
        # parameters), before authentication: one line, not a traceback any client could repeat.
        logger.warning("refused a suspicious request: %s", type(exc).__name__)
        return Response(error_body(suspicious_request_message(exc), "BAD_REQUEST"), status=400)
    if isinstance(exc, drf_exceptions.ValidationError):
        details = _flatten_validation(exc.detail)
        return Response(error_body(_summary(details), "VALIDATION_ERROR", details), status=422)
    if isinstance(exc, drf_exceptions.ParseError):
        return Response(error_body(f"Malformed request body: {exc.detail}", "BAD_REQUEST"), status=400)
    if isinstance(exc, drf_exceptions.NotAuthenticated | drf_exceptions.AuthenticationFailed):
        if getattr(exc, "auth_header", None):
            headers["WWW-Authenticate"] = exc.auth_header
        return Response(error_body("Invalid or missing API key", "UNAUTHORIZED"), status=401, headers=headers)
    if isinstance(exc, drf_exceptions.Throttled):
        if exc.wait is not None:
            headers["Retry-After"] = str(max(math.ceil(exc.wait), 1))
        # A Throttled with a `message` of its own (fetchml.auth.TooManyFailedAuthentications) says it.
        message = getattr(exc, "message", None) or "Rate limit exceeded"
        return Response(error_body(message, "RATE_LIMITED"), status=429, headers=headers)
    if isinstance(exc, drf_exceptions.APIException):
        status = exc.status_code
        message = exc.detail if isinstance(exc.detail, str) else "Request failed"
        return Response(error_body(str(message), code_for_status(status)), status=status)
    if database_unavailable(exc):
        # Out of reach, restarting, or a lock or write wait given up on: a retry soon may succeed.
        logger.warning("database unavailable: %s", exc)
        body = error_body("The database is unavailable; try again shortly", "SERVICE_UNAVAILABLE")
        return Response(body, status=503, headers={"Retry-After": str(DATABASE_RETRY_AFTER_SECONDS)})
    # The details go to the log (with the trace id), never to the client.
    logger.exception("unhandled error in %s", context.get("view").__class__.__name__ if context else "?")
    return Response(error_body("An internal error occurred", "INTERNAL_ERROR"), status=500)
