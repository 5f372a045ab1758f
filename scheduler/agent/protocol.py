"""Worker protocol, agent side: building outgoing messages and validating incoming ones.

The contract is docs/worker-protocol.md. Incoming messages are checked strictly so that a
malformed `assign` is refused with a clear log line instead of half-starting a run.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from typing import Any

from scheduler.agent import AGENT_VERSION

VERSION = 1
# A `batch` frame's limits: messages, and characters, well under the 1 MiB message limit of daphne and
# of the websockets client (a message larger than that travels in a frame of its own).
MAX_BATCH = 1_000
MAX_BATCH_CHARACTERS = 256 * 1024
# What either end of this protocol accepts beyond one message per frame, listed in `hello` and in
# `welcome`: each end sends `batch` frames only to a peer that listed it.
BATCH = "batch"
# `log` messages carry `seq`, and the server answers each it stored with `log_ack`: the agent
# holds a batch of lines until then and sends it again, the server storing it once.
LOG_ACK = "log_ack"
FEATURES = (BATCH, LOG_ACK)
# The longest `error` of a `plugin_status`: why a sidecar is unhealthy, in a line or two.
MAX_PLUGIN_ERROR = 1_000
# The characters no artifact path may hold: the server refuses them (artifacts.validation) and the
# agent skips such files before it sends a byte.
PATH_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")
FINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})
# A connection that can no longer keep the worker's lease (the server does not answer the agent's
# pings, or cannot store its heartbeats) is given up after this share of the lease: time is left
# to be heard through a new connection, to another copy behind the load balancer, before the lease
# runs out and the worker's runs are taken away.
LEASE_SHARE_TO_RECONNECT = 1 / 3
# Close codes of /ws/worker. Beyond these, `CLOSE_NOT_FOUND` answers any path with no endpoint.
CLOSE_BAD_HELLO = 4400
CLOSE_BAD_KEY = 4401
CLOSE_NOT_WORKER = 4403
CLOSE_NOT_FOUND = 4404
CLOSE_NAME_IN_USE = 4409
# The worker name is registered to a usable key of another account (HTTP's 423, Locked).
CLOSE_NAME_OWNED = 4423
# The server cannot reach its database (HTTP's 503): try again, with back-off.
CLOSE_UNAVAILABLE = 4503
# 1012 (service restart) says it best, but daphne (autobahn) closes only with 1000 or 3000-4999.
CLOSE_RECONNECT = 4012
SERVER_TYPES = frozenset({"welcome", "assign", "cancel", "stop", "status_ack", "log_ack", "drain", "error", "config"})


class ProtocolError(ValueError):
    """An incoming message that does not follow the protocol."""


class CommandLineError(ValueError):
    """`entrypoint` and `args` make no command line; `field_name` says which is at fault."""

    def __init__(self, field_name: str, reason: str) -> None:
        super().__init__(f"{field_name}: {reason}")
        self.field_name, self.reason = field_name, reason


def command_argv(entrypoint: str, args: str) -> list[str]:
    """A batch run's argv: `entrypoint`, then `args`, each split into words as a POSIX shell
    would (quotes, backslashes) but run without a shell. The API checks submissions with it,
    so a command the agent could not start is refused when it is submitted."""
    argv: list[str] = []
    for field_name, text in (("entrypoint", entrypoint), ("args", args)):
        try:
            argv += shlex.split(text)
        except ValueError as exc:
            raise CommandLineError(field_name, f"Cannot be split into words ({str(exc).lower()}).") from None
    if not argv:
        raise CommandLineError("entrypoint", "There is no command to run: entrypoint and args are both empty.")
    return argv


@dataclass(frozen=True)
class NodeInfo:
    rank: int = 0
    count: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500


@dataclass(frozen=True)
class Assignment:
    task_id: str
    token: str
    attempt: int
    kind: str
    entrypoint: str
    args: str
    env: dict[str, str]
    gpu_indices: tuple[int, ...]
    timeout_seconds: float | None
    cancel_grace_seconds: float
    node: NodeInfo = field(default_factory=NodeInfo)
    # Inputs, checked when the run is prepared (a bad one fails the run instead of going unacknowledged).
    snapshot_id: str = ""
    datasets: tuple[Any, ...] = ()
    dataset_specs: tuple[Any, ...] = ()
    # Plugin sidecars (scheduler.agent.sidecars) and, for service runs, what to serve (scheduler.agent.services);
    # checked when the run starts them, so a bad one is reported rather than refusing the assignment.
    sidecars: tuple[Any, ...] = ()
    service: dict[str, Any] | None = None
    # Why this agent cannot run it (a field it cannot read); the run then fails its preparation.
    defect: str = ""


@dataclass(frozen=True)
class Welcome:
    worker_id: str
    heartbeat_seconds: float
    lease_seconds: float
    keep: tuple[str, ...]
    kill: tuple[str, ...]
    # What the server accepts from this agent; an older server lists nothing (then one message per frame).
    features: tuple[str, ...] = ()


def encode(message: dict[str, Any]) -> str:
    # Non-ASCII output stays UTF-8 rather than six-byte escapes, keeping log batches under frame limits.
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False)


def frames(messages: list[dict[str, Any]], *, batches: bool) -> list[tuple[str, int]]:
    """Text frames carrying `messages` in order, each with how many it carries: one message per
    frame, or (`batches`) as many per `batch` frame as its limits allow."""
    encoded = [encode(message) for message in messages]
    if not batches:
        return [(text, 1) for text in encoded]
    grouped: list[tuple[str, int]] = []
    group: list[str] = []
    size = 0
    for text in encoded:
        if group and (len(group) == MAX_BATCH or size + len(text) > MAX_BATCH_CHARACTERS):
            grouped.append((_batch_text(group), len(group)))
            group, size = [], 0
        group.append(text)
        size += len(text)
    if group:
        grouped.append((_batch_text(group), len(group)))
    return grouped


def encode_all(messages: list[dict[str, Any]]) -> str:
    """The JSON list of `messages`, each spelled as `encode` spells it (what `frames_of_encoded` takes)."""
    return "[" + ",".join(map(encode, messages)) + "]"


def frames_of_encoded(listed: str, count: int, *, batches: bool) -> list[tuple[str, int]]:
    """`frames` for the `count` messages `encode_all` wrote as `listed`: the text itself wrapped, with
    no decoding, when one frame carries them all; else decoded and framed as `frames` does."""
    if count == 1:
        return [(listed[1:-1], 1)]
    if batches and count <= MAX_BATCH and len(listed) <= MAX_BATCH_CHARACTERS:
        return [(_batch_frame(listed), count)]
    return frames(json.loads(listed), batches=batches)


def _batch_text(encoded: list[str]) -> str:
    return encoded[0] if len(encoded) == 1 else _batch_frame(f"[{','.join(encoded)}]")


def _batch_frame(listed: str) -> str:
    """The `batch` frame around messages given as the JSON text of their list."""
    return f'{{"type":"batch","version":{VERSION},"messages":{listed}}}'


def decode(raw: str | bytes) -> dict[str, Any]:
    """Parse a frame of one message; raise ProtocolError unless it is a known server message of this version."""
    try:
        message = json.loads(raw)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"not JSON: {exc}") from None
    return _checked(message)


def decode_frame(raw: str | bytes) -> list[dict[str, Any] | ProtocolError]:
    """The messages of one frame, in order (a `batch` holds several); a bad one is its ProtocolError."""
    try:
        message = json.loads(raw)
        if not (isinstance(message, dict) and message.get("type") == "batch"):
            return [_checked(message)]
        if message.get("version") != VERSION:
            raise ProtocolError(f"unsupported version {message.get('version')!r}")
        inner = message.get("messages")
        if not isinstance(inner, list):
            raise ProtocolError("field 'messages': a list is required")
    except (TypeError, ValueError) as exc:  # ProtocolError is a ValueError
        return [exc if isinstance(exc, ProtocolError) else ProtocolError(f"not JSON: {exc}")]
    return [_checked_or_error(item) for item in inner]


def _checked_or_error(message: Any) -> dict[str, Any] | ProtocolError:
    try:
        if isinstance(message, dict) and message.get("type") == "batch":
            raise ProtocolError("a batch inside a batch")
        return _checked(message)
    except ProtocolError as exc:
        return exc


def _checked(message: Any) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise ProtocolError("not a JSON object")
    if message.get("version") != VERSION:
        raise ProtocolError(f"unsupported version {message.get('version')!r}")
    if message.get("type") not in SERVER_TYPES:
        raise ProtocolError(f"unknown type {message.get('type')!r}")
    return message


def _str(message: dict[str, Any], key: str, *, required: bool = True) -> str:
    value = message.get(key, None if required else "")
    if not isinstance(value, str) or (required and not value):
        raise ProtocolError(f"field {key!r}: a non-empty string is required")
    return value


def _number(message: dict[str, Any], key: str, default: float | None) -> float | None:
    value = message.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ProtocolError(f"field {key!r}: a non-negative number is required")
    return float(value)


def _int(source: dict[str, Any], key: str, default: int) -> int:
    value = source.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"field {key!r}: an integer is required")
    return value


def token_of(message: dict[str, Any]) -> tuple[str, str]:
    """(task_id, token) of a message about one run."""
    return _str(message, "task_id"), _str(message, "token")


def log_ack_of(message: dict[str, Any]) -> tuple[str, int]:
    """(token, seq) of a `log_ack`."""
    return _str(message, "token"), _int(message, "seq", -1)


def parse_assign(message: dict[str, Any]) -> Assignment:
    """The assignment; one whose other fields cannot be read still names its run, so that the run
    is answered (a failed preparation) instead of holding its slot unanswered."""
    task_id, token = token_of(message)
    try:
        return _assignment(message, task_id, token)
    except ProtocolError as exc:
        attempt = message.get("attempt")
        return Assignment(
            task_id=task_id,
            token=token,
            attempt=attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else 1,
            kind="batch",
            entrypoint="",
            args="",
            env={},
            gpu_indices=(),
            timeout_seconds=None,
            cancel_grace_seconds=0.0,
            defect=str(exc),
        )


def _assignment(message: dict[str, Any], task_id: str, token: str) -> Assignment:
    env = message.get("env") or {}
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise ProtocolError("field 'env': an object of strings is required")
    resources = message.get("resources") or {}
    if not isinstance(resources, dict):
        raise ProtocolError("field 'resources': an object is required")
    gpu_indices = resources.get("gpu_indices") or []
    if not isinstance(gpu_indices, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in gpu_indices
    ):
        raise ProtocolError("field 'resources.gpu_indices': a list of GPU indices is required")
    node = message.get("node") or {}
    if not isinstance(node, dict):
        raise ProtocolError("field 'node': an object is required")
    timeout = _number(message, "timeout_seconds", None)
    datasets, dataset_specs = message.get("datasets") or [], message.get("dataset_specs") or []
    sidecars, service = message.get("sidecars") or [], message.get("service")
    if not isinstance(sidecars, list) or not (service is None or isinstance(service, dict)):
        raise ProtocolError("fields 'sidecars' and 'service': a list and an object (or null) are required")
    if not isinstance(datasets, list) or not isinstance(dataset_specs, list):
        raise ProtocolError("fields 'datasets' and 'dataset_specs': lists are required")
    return Assignment(
        task_id=task_id,
        token=token,
        attempt=_int(message, "attempt", 1),
        kind=_str(message, "kind", required=False) or "batch",
        entrypoint=_str(message, "entrypoint", required=False),
        args=_str(message, "args", required=False),
        env=dict(env),
        gpu_indices=tuple(gpu_indices),
        # 0 means "no limit" on the server side too.
        timeout_seconds=timeout or None,
        cancel_grace_seconds=_number(message, "cancel_grace_seconds", 30.0) or 0.0,
        node=NodeInfo(
            rank=_int(node, "rank", 0),
            count=_int(node, "count", 1),
            master_addr=str(node.get("master_addr") or "127.0.0.1"),
            master_port=_int(node, "master_port", 29500),
        ),
        snapshot_id=_str(message, "snapshot_id", required=False),
        datasets=tuple(datasets),
        dataset_specs=tuple(dataset_specs),
        sidecars=tuple(sidecars),
        service=service,
    )


def parse_welcome(message: dict[str, Any]) -> Welcome:
    if message.get("type") != "welcome":
        raise ProtocolError(f"expected welcome, got {message.get('type')!r}")
    reconcile = message.get("reconcile") or {}
    if not isinstance(reconcile, dict):
        raise ProtocolError("field 'reconcile': an object is required")
    keep, kill = reconcile.get("keep") or [], reconcile.get("kill") or []
    if not all(isinstance(t, str) for t in [*keep, *kill]):
        raise ProtocolError("field 'reconcile': lists of tokens are required")
    heartbeat = _number(message, "heartbeat_seconds", 5.0) or 5.0
    features = message.get("features") or []
    if not isinstance(features, list):
        raise ProtocolError("field 'features': a list is required")
    return Welcome(
        worker_id=str(message.get("worker_id", "")),
        heartbeat_seconds=heartbeat,
        lease_seconds=_number(message, "lease_seconds", heartbeat * 6) or heartbeat * 6,
        keep=tuple(keep),
        kill=tuple(kill),
        features=tuple(f for f in features if isinstance(f, str)),
    )


def _message(type_: str, **fields: Any) -> dict[str, Any]:
    return {"type": type_, "version": VERSION, **fields}


def hello(
    *, name: str, instance: str, hostname: str, capabilities: dict[str, Any], running: list[dict[str, str]]
) -> dict[str, Any]:
    return _message(
        "hello",
        name=name,
        instance=instance,
        agent_version=AGENT_VERSION,
        hostname=hostname,
        capabilities=capabilities,
        running=running,
        features=list(FEATURES),
    )


def ack(*, task_id: str, token: str) -> dict[str, Any]:
    return _message("ack", task_id=task_id, token=token)


def status(*, task_id: str, token: str, status: str, **details: Any) -> dict[str, Any]:
    return _message("status", task_id=task_id, token=token, status=status, **details)


def log(*, task_id: str, token: str, lines: list[dict[str, str]], seq: int) -> dict[str, Any]:
    """`seq`: the place of the first line in the run's output (0 for its first line)."""
    return _message("log", task_id=task_id, token=token, lines=lines, seq=seq)


def plugin_status(
    *, task_id: str, token: str, name: str, status: str, url: str = "", error: str = ""
) -> dict[str, Any]:
    """`error`: why a sidecar is `unhealthy`, in a line its user can act on (bounded)."""
    details = {"error": error[:MAX_PLUGIN_ERROR]} if error else {}
    return _message("plugin_status", task_id=task_id, token=token, name=name, status=status, url=url, **details)


def service_ready(*, task_id: str, token: str, url: str, service_token: str) -> dict[str, Any]:
    return _message("service_ready", task_id=task_id, token=token, url=url, service_token=service_token)


def service_activity(*, task_id: str, token: str, last_activity: str) -> dict[str, Any]:
    return _message("service_activity", task_id=task_id, token=token, last_activity=last_activity)


def draining() -> dict[str, Any]:
    return _message("draining")


def heartbeat(*, running: list[dict[str, str]]) -> dict[str, Any]:
    return _message("heartbeat", running=running)
