"""Typed settings schemas of plugins: validation, defaults and masking of secrets.

A plugin declares `settings_schema = {"api_key": Setting(str, secret=True), ...}`.
The same schema validates an admin's PUT, fills defaults for the task env,
masks secrets wherever settings leave the server (API, audit, logs) and says
which settings a task may choose for itself.
"""

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from fetchml.sealing import Unsealable, seal, unseal

logger = logging.getLogger(__name__)

MASK = "********"
ACTIVE_MODES = frozenset({"sidecar", "remote"})
MAX_STRING_LENGTH = 2048


@dataclass(frozen=True)
class Setting:
    """One setting of a plugin.

    `required_in`: the modes in which the setting must have a value (a remote
    server's URL is needed in `remote` mode only). `url`: must be an http(s)
    URL. `pattern`: a string must match it whole. `minimum`, `maximum`: a
    number's bounds, checked on every change, the plugin enabled or not.
    `overridable`: a task may choose its own value (within `choices`); secrets
    and URLs never are, so a task cannot redirect tracking data or read another
    account's credentials.
    """

    type: type
    default: Any = None
    required_in: frozenset[str] = frozenset()
    secret: bool = False
    choices: tuple[Any, ...] | None = None
    url: bool = False
    pattern: str | None = None
    overridable: bool = False
    help: str = ""
    minimum: int | None = None  # of a number
    maximum: int | None = None

    def __post_init__(self) -> None:
        if self.type not in (str, int, float, bool):
            raise TypeError(f"unsupported setting type {self.type!r}")
        if self.overridable and (self.secret or self.url):
            raise TypeError("secrets and URLs cannot be overridable by tasks")
        if not self.required_in <= ACTIVE_MODES:
            raise TypeError(f"required_in must be a subset of {sorted(ACTIVE_MODES)}")

    @property
    def type_name(self) -> str:
        return {str: "string", int: "integer", float: "number", bool: "boolean"}[self.type]


def required(*modes: str) -> frozenset[str]:
    """`required_in=required("remote")`; with no modes: required whenever the plugin is active."""
    return frozenset(modes or ACTIVE_MODES)


def check_value(setting: Setting, value: Any) -> str | None:
    """The problem with one value, or None when it is acceptable."""
    if setting.type is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif setting.type is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, setting.type)
    if not ok:
        return f"Must be of type {setting.type_name}."
    if isinstance(value, str) and len(value) > MAX_STRING_LENGTH:
        return f"Ensure this value has at most {MAX_STRING_LENGTH} characters."
    if isinstance(value, str) and (problem := _unstorable(value)):
        return problem
    if setting.minimum is not None and isinstance(value, int | float) and value < setting.minimum:
        return f"Must be at least {setting.minimum}."
    if setting.maximum is not None and isinstance(value, int | float) and value > setting.maximum:
        return f"Must be at most {setting.maximum}."
    if setting.choices is not None and value not in setting.choices:
        return "Must be one of: " + ", ".join(str(choice) for choice in setting.choices) + "."
    if setting.url and value and not is_http_url(value):
        return "Must be an http:// or https:// URL."
    if setting.pattern is not None and isinstance(value, str) and not re.fullmatch(setting.pattern, value):
        return f"Must match {setting.pattern}."
    return None


def _unstorable(value: str) -> str | None:
    """A character no database text (nor PostgreSQL's json) can hold, said as DRF's CharField says it."""
    if "\x00" in value:
        return "Null characters are not allowed."
    surrogate = next((ch for ch in value if "\ud800" <= ch <= "\udfff"), None)
    if surrogate is not None:
        return f"Surrogate characters are not allowed: U+{ord(surrogate):X}."
    return None


def is_http_url(value: str) -> bool:
    """An absolute http(s) URL with a host (malformed ones are False, never an exception)."""
    try:
        parts = urlsplit(value)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def validate_settings(
    schema: Mapping[str, Setting],
    settings: Any,
    *,
    stored: Mapping[str, Any],
    mode: str,
    active: bool,
) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """Validate an admin's settings: returns (settings to store, errors).

    Errors name the field as `settings.<name>`. A secret sent back as the mask
    keeps the stored value, so a client may PUT what it got from a GET.
    Required settings are only enforced when the plugin is active in a mode
    that needs them.
    """
    if not isinstance(settings, Mapping):
        return {}, [{"field": "settings", "message": "Must be an object."}]
    errors: list[dict[str, str]] = []
    cleaned: dict[str, Any] = {}
    for key, value in settings.items():
        setting = schema.get(key)
        if setting is None:
            errors.append({"field": f"settings.{key}", "message": "Unknown setting."})
            continue
        if value is None:
            continue  # null clears a setting back to its default
        if setting.secret and value == MASK:
            if key not in stored:
                errors.append({"field": f"settings.{key}", "message": "No stored secret to keep; send the value."})
            else:
                cleaned[key] = stored[key]
            continue
        problem = check_value(setting, value)
        if problem:
            errors.append({"field": f"settings.{key}", "message": problem})
        else:
            cleaned[key] = value
    if active:
        named = {error["field"] for error in errors}
        for key, setting in schema.items():
            if f"settings.{key}" in named:
                continue
            if mode in setting.required_in and cleaned.get(key, setting.default) in (None, ""):
                errors.append({"field": f"settings.{key}", "message": f"Required in {mode} mode."})
    return cleaned, errors


SEAL_PURPOSE = "plugin-secret"


def seal_secrets(schema: Mapping[str, Setting], settings: Mapping[str, Any]) -> dict[str, Any]:
    """Settings as they are stored: every secret set sealed (`{"sealed": token}`, fetchml.sealing), so
    that the database, and its copies, hold no plugin credential in plain text."""
    return {
        key: (
            {"sealed": seal(value.encode("utf-8"), purpose=SEAL_PURPOSE)}
            if key in schema and schema[key].secret and isinstance(value, str) and value
            else value
        )
        for key, value in settings.items()
    }


def open_secrets(name: str, stored: Mapping[str, Any]) -> dict[str, Any]:
    """Stored settings of plugin `name` with their secrets opened. A secret that cannot be opened
    (sealed under another SECRET_KEY) counts as not set, said in the log: set it again."""
    opened: dict[str, Any] = {}
    for key, value in stored.items():
        if isinstance(value, dict) and set(value) == {"sealed"}:
            try:
                value = unseal(str(value["sealed"]), purpose=SEAL_PURPOSE).decode("utf-8")
            except (Unsealable, UnicodeDecodeError):
                logger.error("plugin %s: its secret %s cannot be opened (SECRET_KEY changed?); set it again", name, key)
                continue
        opened[key] = value
    return opened


def effective_settings(schema: Mapping[str, Setting], stored: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults overlaid with the stored values (stored keys no longer in the schema are dropped)."""
    values = {key: setting.default for key, setting in schema.items()}
    values.update({key: value for key, value in stored.items() if key in schema})
    return values


def mask_settings(schema: Mapping[str, Setting], settings: Mapping[str, Any]) -> dict[str, Any]:
    """Settings safe to show: every set secret replaced by the mask."""
    return {
        key: (MASK if key in schema and schema[key].secret and value not in (None, "") else value)
        for key, value in settings.items()
    }


def settings_diff(schema: Mapping[str, Setting], before: Mapping[str, Any], after: Mapping[str, Any]) -> dict:
    """{name: {"from": old, "to": new}} for changed settings, secrets masked (a change is still visible)."""
    diff: dict[str, dict[str, Any]] = {}
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if old == new:
            continue
        if key in schema and schema[key].secret:
            old = MASK if old not in (None, "") else old
            new = MASK if new not in (None, "") else new
        diff[key] = {"from": old, "to": new}
    return diff


def task_overrides(schema: Mapping[str, Setting], overrides: Any) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """The settings a task chose for itself that the schema allows: (accepted, refused).

    Only `overridable` settings are accepted, each checked like an admin value.
    """
    if not isinstance(overrides, Mapping):
        return {}, [{"field": "settings", "message": "Must be an object."}]
    accepted: dict[str, Any] = {}
    refused: list[dict[str, str]] = []
    for key, value in overrides.items():
        setting = schema.get(key)
        if setting is None or not setting.overridable:
            refused.append({"field": f"settings.{key}", "message": "Not a setting a task may choose."})
            continue
        problem = check_value(setting, value)
        if problem:
            refused.append({"field": f"settings.{key}", "message": problem})
        else:
            accepted[key] = value
    return accepted, refused


def describe(schema: Mapping[str, Setting]) -> dict[str, dict[str, Any]]:
    """A JSON description of the schema (for the API and the admin)."""
    return {
        key: {
            "type": setting.type_name,
            "default": None if setting.secret else setting.default,
            "required_in": sorted(setting.required_in),
            "secret": setting.secret,
            "choices": list(setting.choices) if setting.choices is not None else None,
            "url": setting.url,
            "pattern": setting.pattern,
            "minimum": setting.minimum,
            "maximum": setting.maximum,
            "overridable": setting.overridable,
            "help": setting.help,
        }
        for key, setting in schema.items()
    }
