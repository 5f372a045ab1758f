"""A client cannot forge a log line: messages are written on one line."""

import logging
import sys

from django.conf import settings
from django.utils.module_loading import import_string

from fetchml.logformat import ClientMistakeFilter, OneLineFormatter

FORMAT = "%(levelname)s %(message)s"


def _record(message: str, *args: object, exc_info: object = None) -> logging.LogRecord:
    return logging.LogRecord("fetchml.request", logging.INFO, __file__, 1, message, args, exc_info)


def test_a_newline_in_a_logged_path_is_escaped_not_a_new_line():
    line = OneLineFormatter(FORMAT).format(_record("%s %s", "GET", "/x\n2026-12-02 00:00:00,000 ERROR forged"))

    assert line == "INFO GET /x\\n2026-12-02 00:00:00,000 ERROR forged"


def test_carriage_returns_and_other_control_characters_are_escaped():
    line = OneLineFormatter(FORMAT).format(_record("name %s", "a\rb\x1b[31mc\x00d\x7f"))

    assert line == "INFO name a\\rb\\x1b[31mc\\x00d\\x7f"


def test_a_traceback_keeps_its_lines():
    try:
        raise ValueError("boom")
    except ValueError:
        line = OneLineFormatter(FORMAT).format(_record("failed", exc_info=sys.exc_info()))

    assert line.startswith("INFO failed\nTraceback (most recent call last):\n")


def test_the_servers_log_lines_use_the_one_line_formatter():
    plain = settings.LOGGING["formatters"]["plain"]

    assert import_string(plain["class"]) is OneLineFormatter


def _refused_host_record() -> logging.LogRecord:
    try:
        raise ValueError("Invalid HTTP_HOST header: 'evil'.")
    except ValueError:
        exc_info = sys.exc_info()
    return logging.LogRecord(
        "django.security.DisallowedHost", logging.ERROR, __file__, 1, "Invalid HTTP_HOST header: 'evil'.", (), exc_info
    )


def test_a_request_refused_as_suspicious_is_one_warning_line_without_its_traceback():
    record = _refused_host_record()

    assert ClientMistakeFilter().filter(record)
    line = OneLineFormatter(FORMAT).format(record)

    assert line == "WARNING Invalid HTTP_HOST header: 'evil'."


def test_other_errors_keep_their_level_and_traceback():
    record = _refused_host_record()
    record.name = "django.request"

    ClientMistakeFilter().filter(record)

    assert (record.levelno, record.exc_info is not None) == (logging.ERROR, True)


def test_the_servers_console_handler_filters_client_mistakes():
    console = settings.LOGGING["handlers"]["console"]
    filters = settings.LOGGING["filters"]

    assert any(import_string(filters[name]["()"]) is ClientMistakeFilter for name in console["filters"])
