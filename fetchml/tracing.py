"""Trace ids: one per request, on the response, in every log line and error body."""

import contextvars
import logging
import re
import uuid
from collections.abc import Callable

_trace_id: contextvars.ContextVar[str] = contextvars.ContextVar("fetchml_trace_id", default="-")
_VALID_INCOMING = re.compile(r"^[A-Za-z0-9._-]{8,64}$")


def new_trace_id(incoming: str | None = None) -> str:
    """Reuse a well-formed X-Request-ID from a proxy, else mint one."""
    if incoming and _VALID_INCOMING.match(incoming):
        return incoming
    return str(uuid.uuid4())


def set_trace_id(value: str) -> contextvars.Token:
    return _trace_id.set(value)


def reset_trace_id(token: contextvars.Token) -> None:
    _trace_id.reset(token)


def current_trace_id() -> str:
    value = _trace_id.get()
    return value if value != "-" else str(uuid.uuid4())


class TraceIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "trace_id"):
            record.trace_id = _trace_id.get()
        return True


def install_log_record_factory() -> None:
    """Stamp the trace id on every log record at creation.

    A handler filter alone only stamps records that reach that handler; the
    factory makes the id part of the record itself, for every handler.
    """
    previous: Callable[..., logging.LogRecord] = logging.getLogRecordFactory()
    if getattr(previous, "_fetchml_trace_id", False):
        return

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        record.trace_id = _trace_id.get()
        return record

    factory._fetchml_trace_id = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)
