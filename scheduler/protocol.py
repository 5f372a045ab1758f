"""Worker protocol v1 (docs/worker-protocol.md): parsing and validating incoming messages.

`parse_frame()` turns one text frame into its messages (one, or those of a
`batch`), each a dict with only known, type-checked fields or the `BadMessage`
that refused it; the consumer answers a refusal with an `error` message and
keeps the connection. Every string of an accepted message has its NUL characters
and lone surrogates replaced with U+FFFD: a task may print anything, PostgreSQL
cannot store a NUL in a text column, and no UTF-8 column holds half a surrogate
pair (which JSON can escape).
"""

import re
import uuid
from typing import Any

from fetchml.jsonbody import JSONTooDeep, loads

# The framing rule and the features are the agent's (it knows no Django): one owner for both ends.
from scheduler.agent.protocol import FEATURES, MAX_BATCH, MAX_PLUGIN_ERROR

VERSION = 1
MAX_TEXT = 65_536  # error/output excerpts kept on the task row
MAX_LOG_LINES = 1_000
MAX_LOG_SEQ = 2**31 - 1  # a line's place in its node's output (a 32-bit column)
MAX_RUNNING = 10_000
MAX_CAPACITY = 1_000_000
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
RUN_STATES = frozenset({"preparing", "running", "collecting", "completed", "failed", "cancelled"})
FINAL_RUN_STATES = frozenset({"completed", "failed", "cancelled"})
WORKER_FAILURE_REASONS = frozenset({"exit_code", "timeout", "preparation", "worker_lost"})
CAPACITY_FIELDS = ("cpu_cores", "memory_gb", "gpu_count", "batch_slots", "service_slots")
MAX_FEATURES = 32
# Nesting of a frame's JSON: the deepest message (a `batch` of `log`s, its lines objects) needs 5. Fixed
# here, apart from FETCHML_MAX_JSON_DEPTH: tuning that for HTTP bodies must not refuse agents' frames.
MAX_DEPTH = 64
NUL, REPLACEMENT = "\x00", "\ufffd"
_SURROGATE = re.compile("[\ud800-\udfff]")


class BadMessage(Exception):
    def __init__(self, message: str, *, code: str = "BAD_MESSAGE", ref_type: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.ref_type = ref_type


def error_message(exc: BadMessage) -> dict[str, Any]:
    return {"type": "error", "version": VERSION, "code": exc.code, "message": str(exc), "ref_type": exc.ref_type}


def _str(message: dict, name: str, *, max_length: int, required: bool = False, tail: bool = False, ref: str) -> str:
    """A string field; `tail` keeps the last `max_length` characters instead of refusing a longer one."""
    value = message.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise BadMessage(f"field '{name}': a non-empty string is required", ref_type=ref)
    if len(value) > max_length:
        if tail:
            return value[-max_length:]
        raise BadMessage(f"field '{name}': at most {max_length} characters", ref_type=ref)
    return value


# A UUID as str(uuid.UUID(...)) spells it, as the server's own messages carry it.
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _uuid(message: dict, name: str, *, ref: str) -> str:
    """The field as a UUID in its canonical spelling (checked by a pattern when already so spelled)."""
    value = message.get(name)
    if value is None:
        return _missing(name, ref)
    if not isinstance(value, str):
        raise BadMessage(f"field '{name}': a UUID is required", ref_type=ref)
    if _CANONICAL_UUID.fullmatch(value):
        return value
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise BadMessage(f"field '{name}': a UUID is required", ref_type=ref) from None


def _missing(name: str, ref: str) -> str:
    raise BadMessage(f"field '{name}': required", ref_type=ref)


def _int(value: Any, name: str, *, ref: str, minimum: int | None = 0, maximum: int | None = MAX_CAPACITY) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadMessage(f"field '{name}': an integer is required", ref_type=ref)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise BadMessage(f"field '{name}': out of range", ref_type=ref)
    return value


def _one_of(value: Any, allowed: frozenset[str], name: str, *, ref: str, required: bool = True) -> str:
    """`value` if it is one of `allowed` (or, when not `required`, empty or absent)."""
    if not required and value in (None, ""):
        return ""
    if not isinstance(value, str) or value not in allowed:  # a list or an object is no name, nor hashable
        raise BadMessage(f"field '{name}': one of {', '.join(sorted(allowed))}", ref_type=ref)
    return value


def _runs(message: dict, *, ref: str) -> list[dict[str, str]]:
    runs = message.get("running", [])
    if not isinstance(runs, list) or len(runs) > MAX_RUNNING:
        raise BadMessage("field 'running': a list of {task_id, token} is required", ref_type=ref)
    parsed = []
    for item in runs:
        if not isinstance(item, dict):
            raise BadMessage("field 'running': a list of {task_id, token} is required", ref_type=ref)
        status = _one_of(item.get("status"), RUN_STATES, "running.status", ref=ref, required=False)
        run = {"task_id": _uuid(item, "task_id", ref=ref), "token": _uuid(item, "token", ref=ref)}
        parsed.append(run | {"status": status} if status else run)
    return parsed


def _hello(message: dict) -> dict[str, Any]:
    ref = "hello"
    name = _str(message, "name", max_length=128, required=True, ref=ref)
    if not NAME_PATTERN.match(name):
        raise BadMessage("field 'name': letters, digits, '.', '_' and '-' only", ref_type=ref)
    capabilities = message.get("capabilities")
    if not isinstance(capabilities, dict):
        raise BadMessage("field 'capabilities': an object is required", ref_type=ref)
    parsed = {key: _int(capabilities.get(key, 0), f"capabilities.{key}", ref=ref) for key in CAPACITY_FIELDS}
    parsed["gpu_type"] = _str(capabilities, "gpu_type", max_length=64, ref=ref)
    features = message.get("features", [])
    if not isinstance(features, list) or len(features) > MAX_FEATURES or not all(isinstance(f, str) for f in features):
        raise BadMessage(f"field 'features': a list of at most {MAX_FEATURES} names is required", ref_type=ref)
    return {
        "name": name,
        "features": sorted(set(features) & set(FEATURES)),
        "agent_version": _str(message, "agent_version", max_length=32, ref=ref),
        "hostname": _str(message, "hostname", max_length=255, ref=ref),
        "instance": _str(message, "instance", max_length=64, ref=ref),
        "capabilities": parsed,
        "running": _runs(message, ref=ref),
    }


def _ack(message: dict) -> dict[str, Any]:
    return {"task_id": _uuid(message, "task_id", ref="ack"), "token": _uuid(message, "token", ref="ack")}


def _status(message: dict) -> dict[str, Any]:
    ref = "status"
    status = _one_of(message.get("status"), RUN_STATES, "status", ref=ref)
    exit_code = message.get("exit_code")
    if exit_code is not None:
        exit_code = _int(exit_code, "exit_code", ref=ref, minimum=-(2**31), maximum=2**31 - 1)
    reason = _one_of(message.get("failure_reason"), WORKER_FAILURE_REASONS, "failure_reason", ref=ref, required=False)
    return {
        **_ack(message),
        "status": status,
        "exit_code": exit_code,
        "failure_reason": reason,
        "error": _str(message, "error", max_length=MAX_TEXT, tail=True, ref=ref),
        "output": _str(message, "output", max_length=MAX_TEXT, tail=True, ref=ref),
    }


def _log(message: dict) -> dict[str, Any]:
    ref = "log"
    lines = message.get("lines")
    if not isinstance(lines, list) or not 1 <= len(lines) <= MAX_LOG_LINES:
        raise BadMessage(f"field 'lines': a list of 1 to {MAX_LOG_LINES} lines is required", ref_type=ref)
    for line in lines:
        if not (
            isinstance(line, dict) and line.get("stream") in ("stdout", "stderr") and isinstance(line.get("line"), str)
        ):
            raise BadMessage("field 'lines': items are {stream: stdout|stderr, line: string}", ref_type=ref)
    seq = message.get("seq")
    if seq is not None:
        # The last line's place must fit the column too.
        seq = _int(seq, "seq", ref=ref, maximum=MAX_LOG_SEQ - len(lines) + 1)
    return {
        "task_id": _uuid(message, "task_id", ref=ref),
        "token": _uuid(message, "token", ref=ref),
        "lines": [{"stream": line["stream"], "line": line["line"]} for line in lines],
        "seq": seq,
    }


def _heartbeat(message: dict) -> dict[str, Any]:
    return {"running": _runs(message, ref="heartbeat")}


PLUGIN_STATES = frozenset({"healthy", "unhealthy", "starting", "stopped"})
MAX_URL = 2048
MAX_SERVICE_TOKEN = 256


def _plugin_status(message: dict) -> dict[str, Any]:
    ref = "plugin_status"
    status = _one_of(message.get("status"), PLUGIN_STATES, "status", ref=ref)
    return {
        **_ack(message),
        "name": _str(message, "name", max_length=128, required=True, ref=ref),
        "status": status,
        "url": _str(message, "url", max_length=MAX_URL, ref=ref),
        "error": _str(message, "error", max_length=MAX_PLUGIN_ERROR, ref=ref),
    }


def _service_ready(message: dict) -> dict[str, Any]:
    ref = "service_ready"
    return {
        **_ack(message),
        "url": _str(message, "url", max_length=MAX_URL, required=True, ref=ref),
        # The service's own access token (e.g. Jupyter's), not the fencing token.
        "service_token": _str(message, "service_token", max_length=MAX_SERVICE_TOKEN, required=True, ref=ref),
    }


def _service_activity(message: dict) -> dict[str, Any]:
    ref = "service_activity"
    return {**_ack(message), "last_activity": _str(message, "last_activity", max_length=64, required=True, ref=ref)}


def _draining(message: dict) -> dict[str, Any]:
    return {}


_PARSERS = {
    "hello": _hello,
    "draining": _draining,
    "ack": _ack,
    "status": _status,
    "log": _log,
    "heartbeat": _heartbeat,
    "plugin_status": _plugin_status,
    "service_ready": _service_ready,
    "service_activity": _service_activity,
}


def parse_frame(text: str | None) -> list[dict[str, Any] | BadMessage]:
    """The messages of one text frame, in order: the frame's own, or each of a `batch`'s.

    Each is a validated message ({"type": ..., **fields}) or the `BadMessage`
    that refused it, so one bad message in a batch does not cost the others.
    """
    try:
        message = _loaded(text)
        if message.get("type") != "batch":
            return [_validated(message)]
        _check_version(message, "batch")
        inner = message.get("messages")
        if not isinstance(inner, list) or not 1 <= len(inner) <= MAX_BATCH:
            raise BadMessage(f"field 'messages': a list of 1 to {MAX_BATCH} messages is required", ref_type="batch")
    except BadMessage as exc:
        return [exc]
    return [_batched(item) for item in inner]


def _batched(message: Any) -> dict[str, Any] | BadMessage:
    try:
        if not isinstance(message, dict):
            raise BadMessage("a message is a JSON object", ref_type="batch")
        if message.get("type") in ("batch", "hello"):
            raise BadMessage(f"a {message['type']} is sent in a frame of its own", ref_type=message["type"])
        return _validated(message)
    except BadMessage as exc:
        return exc


def _loaded(text: str | None) -> dict[str, Any]:
    if text is None:
        raise BadMessage("binary frames are not part of the protocol")
    try:
        message = loads(text, max_depth=MAX_DEPTH)
    except JSONTooDeep as exc:
        raise BadMessage(str(exc)) from None
    except ValueError:
        raise BadMessage("not valid JSON") from None
    if not isinstance(message, dict):
        raise BadMessage("a message is a JSON object")
    return message


def _validated(message: dict[str, Any]) -> dict[str, Any]:
    kind = message.get("type")
    parser = _PARSERS.get(kind) if isinstance(kind, str) else None
    if kind is None:
        raise BadMessage("field 'type': required", code="UNKNOWN_TYPE")
    if parser is None:
        # Said back cut short: the error must not echo whatever size of garbage came in.
        raise BadMessage(f"unknown message type {str(kind)[:64]!r}", code="UNKNOWN_TYPE", ref_type=str(kind)[:32])
    _check_version(message, kind)
    return {"type": kind, **_storable(parser(message))}


def _storable(value: Any) -> Any:
    """`value` with NUL and lone surrogates (a JSON escape such as \\ud800, which no UTF-8 column
    holds) replaced in each string it holds: the one place for what every agent sends, an older one
    included (a report that cannot be stored would leave its run stuck, answered a server error)."""
    if isinstance(value, str):
        if value.isascii():
            return value.replace(NUL, REPLACEMENT) if NUL in value else value
        return _SURROGATE.sub(REPLACEMENT, value.replace(NUL, REPLACEMENT))
    if isinstance(value, dict):
        return {key: _storable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_storable(item) for item in value]
    return value


def _check_version(message: dict[str, Any], kind: str) -> None:
    version = message.get("version")
    if type(version) is not int or version != VERSION:  # true and 1.0 equal 1 in Python, not in the protocol
        raise BadMessage(
            f"unsupported protocol version (this server speaks {VERSION})", code="BAD_VERSION", ref_type=kind
        )


def outgoing(message_type: str, **fields: Any) -> dict[str, Any]:
    return {"type": message_type, "version": VERSION, **fields}
