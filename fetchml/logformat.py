"""Log lines that a client cannot forge.

A request path, a header, a job or worker name goes into log messages as the
client sent it; a newline in one (`/x%0A... ERROR forged`) would start a line
of its own that reads like the server's. Every message is written on one line,
its control characters escaped; a traceback keeps its lines.
"""

import logging

# Every C0 control character and DEL, but the tab, as Python writes it in a string literal.
_ESCAPES = {code: repr(chr(code))[1:-1] for code in [*range(32), 127] if code != ord("\t")}


def one_line(message: str) -> str:
    return message.translate(_ESCAPES)


def brief(exc: BaseException) -> str:
    """An exception in one line, for a failure logged again without its traceback: its type and
    the first line of its message."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


class OneLineFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = one_line(record.message)
        return super().formatMessage(record)


class ClientMistakeFilter(logging.Filter):
    """Django logs a request it refuses as suspicious (a Host not in ALLOWED_HOSTS, a path that
    escapes the static root, too many fields) at ERROR with its traceback, under
    `django.security.*`. The client already got its 400 in the error format; the traceback says
    nothing about the server, and a client could fill the log with them. Logged as one WARNING line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("django.security.") and record.exc_info:
            record.exc_info = None
            record.exc_text = None
            if record.levelno > logging.WARNING:
                record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
        return True
