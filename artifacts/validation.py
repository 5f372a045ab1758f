"""Checks of names, paths and digests that arrive outside a JSON body (URL, query, headers)."""

import posixpath
import re
import uuid

from artifacts.models import ARTIFACT_PATH_MAX_BYTES
from fetchml.errors import ApplicationError, Invalid
from scheduler.agent.protocol import PATH_CONTROL_CHARACTERS

SHA256 = re.compile(r"^[0-9a-f]{64}$")
DATASET_NAME = re.compile(r"^[a-zA-Z0-9_.-]{1,128}$")


def _invalid(field: str, message: str) -> Invalid:
    return Invalid(f"Invalid {field}: {message}", details=[{"field": field, "message": message}])


def sha256_hex(value: str | None, *, field: str) -> str:
    """A lowercase 64-hex digest (uppercase accepted and folded)."""
    digest = (value or "").strip().lower()
    if not SHA256.match(digest):
        raise _invalid(field, "must be a sha256 digest of 64 hexadecimal characters")
    return digest


def dataset_name(value: str | None) -> str:
    if not value or not DATASET_NAME.match(value) or value in {".", ".."}:
        raise _invalid("name", "must match ^[a-zA-Z0-9_.-]{1,128}$ (and not be . or ..)")
    return value


def artifact_path(value: str) -> str:
    """A relative, normalized POSIX path inside the task's output directory.

    Refused rather than repaired: the agent sends what it found on disk, and
    silently rewriting a path could make two files collide.
    """
    if not value:
        raise _invalid("path", "must not be empty")
    if len(value.encode("utf-8", "surrogatepass")) > ARTIFACT_PATH_MAX_BYTES:
        raise _invalid("path", f"must be at most {ARTIFACT_PATH_MAX_BYTES} bytes")
    if PATH_CONTROL_CHARACTERS.search(value):
        raise _invalid("path", "must not contain NUL or other control characters")
    if value.startswith("/"):
        raise _invalid("path", "must be relative")
    parts = value.split("/")
    if any(part in {"", ".", ".."} for part in parts) or posixpath.normpath(value) != value:
        raise _invalid("path", "must be normalized: no empty, '.' or '..' components")
    return value


def fencing_token(value: str | None) -> uuid.UUID:
    """The X-Fetchml-Token header: missing or malformed is a bad request, not a stale token."""
    try:
        return uuid.UUID(value or "")
    except ValueError:
        raise ApplicationError(
            "Missing or malformed X-Fetchml-Token header",
            details=[{"field": "X-Fetchml-Token", "message": "must be the assignment's token (a UUID)"}],
        ) from None
