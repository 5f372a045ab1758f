"""Many-row INSERTs without the ORM's per-row cost (a dispatch round's assignments, the audit chain's events).

On PostgreSQL the rows travel as one JSON parameter expanded by
`jsonb_to_recordset`: Django's client-side parameter merging of a multi-row
VALUES list (or `bulk_create`'s per-row SQL compilation) costs more than the
insert itself. Elsewhere, multi-row VALUES in chunks that stay under every
backend's parameter limit.
"""

import functools
import json
import uuid
from datetime import datetime
from typing import Any

from django.db import connection
from django.db.models import Model

_MAX_PARAMETERS = 999  # SQLite's historical limit, the lowest of the supported backends


class RowEncoder(json.JSONEncoder):
    """Column values as PostgreSQL parses them from JSON text: full-precision times, UUIDs as text
    (their 32 hex digits, which PostgreSQL reads as well as the hyphenated form, for less work)."""

    def default(self, o: Any) -> Any:
        if isinstance(o, uuid.UUID):
            return o.hex
        if isinstance(o, datetime):
            return o.isoformat()
        return super().default(o)


def insert_rows(objects: list[Model], *, then: tuple[str, list[Any]] | None = None) -> None:
    """INSERT unsaved instances of one model (every concrete field set, primary key included).

    `then`: a statement (SQL, parameters) to run right after, in the same
    round trip on PostgreSQL (the insert becomes a data-modifying WITH).
    """
    if not objects:
        return
    model = type(objects[0])
    fields = model._meta.concrete_fields
    if connection.vendor == "postgresql":
        payload = [{f.column: getattr(obj, f.attname) for f in fields} for obj in objects]
        _insert_recordset(model, json.dumps(payload, cls=RowEncoder, ensure_ascii=False), then)
        return
    with connection.cursor() as cursor:
        per_chunk = max(1, _MAX_PARAMETERS // len(fields))
        for start in range(0, len(objects), per_chunk):
            chunk = objects[start : start + per_chunk]
            params = [f.get_db_prep_save(getattr(obj, f.attname), connection) for obj in chunk for f in fields]
            cursor.execute(_values_sql(model, len(chunk)), params)
        if then is not None:
            cursor.execute(*then)


def insert_json_rows(model: type[Model], rows: list[str], *, then: tuple[str, list[Any]] | None = None) -> None:
    """PostgreSQL only: INSERT rows given already encoded, each a JSON object of every column's
    value as PostgreSQL parses it from JSON text (for rows whose JSON the caller has at hand)."""
    if rows:
        _insert_recordset(model, "[" + ",".join(rows) + "]", then)


def _insert_recordset(model: type[Model], payload: str, then: tuple[str, list[Any]] | None) -> None:
    with connection.cursor() as cursor:
        if then is None:
            cursor.execute(_recordset_sql(model), [payload])
        else:
            cursor.execute(f"WITH inserted AS ({_recordset_sql(model)}) {then[0]}", [payload, *then[1]])


@functools.cache
def _values_sql(model: type[Model], rows: int) -> str:
    quote = connection.ops.quote_name
    fields = model._meta.concrete_fields
    columns = ", ".join(quote(f.column) for f in fields)
    values = ", ".join(["(" + ", ".join(["%s"] * len(fields)) + ")"] * rows)
    return f"INSERT INTO {quote(model._meta.db_table)} ({columns}) VALUES {values}"


@functools.cache
def _recordset_sql(model: type[Model]) -> str:
    quote = connection.ops.quote_name
    fields = model._meta.concrete_fields
    columns = ", ".join(quote(f.column) for f in fields)
    types = ", ".join(f"{quote(f.column)} {f.db_type(connection)}" for f in fields)
    table = quote(model._meta.db_table)
    return f"INSERT INTO {table} ({columns}) SELECT {columns} FROM jsonb_to_recordset(%s::jsonb) AS r({types})"
