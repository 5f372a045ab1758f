"""Querysets compiled to SQL once per process, for hot paths.

Building and compiling a queryset costs Django more CPU than PostgreSQL spends
running a small query (about 1 ms against 0.1 to 0.5 ms here); a dispatch
round and a batch of run reports run a dozen each. A query is compiled on its
first use (inside a transaction, for a locking one) and run as raw SQL
afterwards: as it is (`compiled_once`), or with new values in the places of
the first call's (`compiled_per_shape`, `compiled_update_per_shape` for an
UPDATE and `compiled_count_per_shape` for a count).
"""

import re
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from django.core.exceptions import EmptyResultSet, FieldDoesNotExist
from django.db import connection, transaction
from django.db.models import Model, QuerySet
from django.db.models.sql import Query, UpdateQuery

from fetchml.instances import instance_builder


def compiled_once(build: Callable[[], QuerySet]) -> Callable[[], list[Model]]:
    """A function running `build()`'s query; its values must not change between calls."""
    compiled: dict[str, tuple[Any, str, tuple]] = {}

    def run() -> list[Model]:
        # Per database backend: a process uses one, but tests may compile for either.
        if connection.vendor not in compiled:
            queryset = build()
            compiled[connection.vendor] = (queryset.model, *queryset.query.sql_with_params())
        model, sql, params = compiled[connection.vendor]
        return _instances(model, sql, params)

    return run


def compiled_per_shape(build: Callable[..., QuerySet]) -> Callable[..., Iterable[Model]]:
    """A function running `build(**values)`'s query, compiled once per shape of `values`.

    The shape is the length of each list among the values (an `IN` list has one
    placeholder per item) and the keyword arguments given in `fixed`, passed to
    `build` as they are (a LIMIT is written into the SQL, not a parameter).
    Every list is taken for an `IN` list, a set: it is padded to a power of two
    by repeating its last item, so that a query has a few shapes, each compiled
    (and prepared by PostgreSQL) once, instead of one per length.
    On PostgreSQL the query is compiled with a marker for each value, and
    later calls put their values where the markers were: ints, strings,
    aware datetimes and UUIDs, each of the type its field stores, reach
    psycopg unchanged, so that is what Django would have sent. Elsewhere,
    or if a marker does not show in the compiled parameters (Django folded
    it into the SQL), it runs the queryset itself.
    """
    return _per_shape(build, _select_sql, _run_select, fallback=lambda queryset: queryset)


def compiled_update_per_shape(build: Callable[..., tuple[QuerySet, dict[str, Any]]]) -> Callable[..., int]:
    """A function running `rows.update(**changes)` for `(rows, changes) = build(**values)`, compiled
    once per shape of `values` as `compiled_per_shape` does; returns how many rows it changed.

    Only an UPDATE of one table is compiled (no filter through a relation);
    anything else, and every call off PostgreSQL, runs `update()` itself.
    """
    return _per_shape(build, _update_sql, _run_update, fallback=lambda built: built[0].update(**built[1]))


def compiled_count_per_shape(build: Callable[..., QuerySet]) -> Callable[..., int]:
    """How many rows `build(**values)`'s query has, compiled once per shape of `values` as
    `compiled_per_shape` does (`count()` itself off PostgreSQL)."""
    return _per_shape(build, _count_sql, _run_count, fallback=lambda queryset: queryset.count())


def _per_shape(build: Callable[..., Any], to_sql: Callable, execute: Callable, *, fallback: Callable) -> Callable:
    """`build(**values)` compiled by `to_sql` once per shape and run by `execute` on PostgreSQL;
    `fallback(build(**values))` elsewhere, or when the values cannot be marked."""
    compiled: dict[tuple, tuple[Any, str, list[tuple[str, int | None] | Any]] | None] = {}

    def run(*, fixed: dict[str, Any] | None = None, **values: Any) -> Any:
        fixed = fixed or {}
        if connection.vendor == "postgresql" and all(map(_markable, values.values())):
            values = {name: _padded(value) if isinstance(value, list) else value for name, value in values.items()}
            shape = _shape(fixed, values)
            if shape not in compiled:
                compiled[shape] = _compile(lambda **marked: build(**fixed, **marked), values, to_sql)
            if compiled[shape] is not None:
                model, sql, slots = compiled[shape]
                return execute(model, sql, [_value_for(slot, values) for slot in slots])
        return fallback(build(**fixed, **values))

    return run


def _run_select(model: type[Model], sql: str, params: list[Any]) -> list[Model]:
    return _instances(model, sql, params)


def _instances(model: type[Model], sql: str, params: Any) -> list[Model]:
    """The rows of a compiled SELECT as `model` instances, as `Model.objects.raw()` makes them.

    `raw()` works out again on every run which column is which field and how
    to convert it (about a third of a millisecond a query); a compiled query's
    columns never change, so that is worked out on its first run only.
    """
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        key = (connection.vendor, model, sql)
        if key not in _row_shapes:
            _row_shapes[key] = _RowShape(model, [column[0] for column in cursor.description])
        rows = cursor.fetchall()
    return _row_shapes[key].instances(rows)


class _RowShape:
    """Which column of a compiled SELECT's rows is which field of its model, the converters of
    those fields, and which columns are annotations (set as attributes, unconverted, as by `raw()`)."""

    def __init__(self, model: type[Model], columns: list[str]) -> None:
        name_of = connection.introspection.identifier_converter
        position = {name_of(column): index for index, column in enumerate(columns)}
        fields = [field for field in model._meta.fields if name_of(field.column) in position]
        if model._meta.pk not in fields:
            raise FieldDoesNotExist("a compiled query must select the primary key")
        known = {name_of(field.column) for field in fields}
        self.model = model
        self.field_names = [field.attname for field in fields]
        self.field_positions = [position[name_of(field.column)] for field in fields]
        self.annotations = [(column, index) for index, column in enumerate(columns) if name_of(column) not in known]
        compiler = connection.ops.compiler("SQLCompiler")(Query(model), connection, connection.alias)
        columns_of_fields = [field.get_col(model._meta.db_table) for field in fields]
        self.converters = list(compiler.get_converters(columns_of_fields).items())

    def instances(self, rows: list[tuple]) -> list[Model]:
        db, converters, annotations = connection.alias, self.converters, self.annotations
        build = instance_builder(self.model)
        instances = []
        for row in rows:
            values = [row[index] for index in self.field_positions]
            for index, (convert, expression) in converters:
                value = values[index]
                for converter in convert:
                    value = converter(value, expression, connection)
                values[index] = value
            instance = build(self.model, db, self.field_names, values)
            for column, index in annotations:
                setattr(instance, column, row[index])
            instances.append(instance)
        return instances


_row_shapes: dict[tuple[str, type[Model], str], _RowShape] = {}


def _run_update(model: type[Model], sql: str, params: list[Any]) -> int:
    # As QuerySet.update(): an error inside an atomic block marks it for rollback.
    with transaction.mark_for_rollback_on_error(), connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.rowcount


def _padded(items: list[Any]) -> list[Any]:
    """`items` with its last one repeated up to a power of two (the same set of values)."""
    if not items:
        return items
    return items + items[-1:] * ((1 << (len(items) - 1).bit_length()) - len(items))


def _shape(fixed: dict[str, Any], values: dict[str, Any]) -> tuple:
    lengths = sorted((name, len(value) if isinstance(value, list) else None) for name, value in values.items())
    return (tuple(sorted(fixed.items())), tuple(lengths))


def _select_sql(queryset: QuerySet) -> tuple[Any, str, tuple] | None:
    return (queryset.model, *queryset.query.sql_with_params())


def _count_sql(queryset: QuerySet) -> tuple[Any, str, tuple]:
    model, sql, params = _select_sql(queryset.order_by().values("pk"))
    return model, f"SELECT COUNT(*) FROM ({sql}) AS counted", params


def _run_count(model: type[Model], sql: str, params: list[Any]) -> int:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone()[0]


def _update_sql(built: tuple[QuerySet, dict[str, Any]]) -> tuple[Any, str, tuple] | None:
    rows, changes = built
    query = rows.query.chain(UpdateQuery)
    query.add_update_values(changes)
    query.get_initial_alias()
    if query.related_updates or query.count_active_tables() != 1:
        return None  # Django would first select the rows' keys: left to update()
    return (rows.model, *query.get_compiler(connection.alias).as_sql())


class _Slot(tuple):
    """Where a marker stood: (the value's name, its index in a list, or None; `_WHOLE_LIST` for an
    array parameter holding the whole list)."""


def _compile(build: Callable[..., Any], values: dict[str, Any], to_sql: Callable[[Any], Any]) -> tuple | None:
    markers: dict[Any, _Slot] = {}
    marked: dict[str, Any] = {}
    for name, value in values.items():
        if isinstance(value, list):
            marked[name] = [_marker(item, len(markers) + index) for index, item in enumerate(value)]
            markers.update({marker: _Slot((name, index)) for index, marker in enumerate(marked[name])})
        else:
            marked[name] = _marker(value, len(markers))
            markers[marked[name]] = _Slot((name, None))
    try:
        compiled = to_sql(build(**marked))
    except EmptyResultSet:
        return None
    if compiled is None:
        return None
    model, sql, params = compiled
    slots = [markers.get(param, param) if _hashable(param) else param for param in params]
    if {slot for slot in slots if isinstance(slot, _Slot)} != set(markers.values()):
        return None
    return (model, *_lists_as_arrays(sql, slots, values))


# A placeholder, an escaped percent sign, or a list of placeholders after IN.
_PLACEHOLDERS = re.compile(r"%%|IN \(%s(?:, %s)*\)|%s")
_WHOLE_LIST = -1  # the index of a slot standing for all of a list's items


def _lists_as_arrays(sql: str, slots: list[Any], values: dict[str, Any]) -> tuple[str, list[Any]]:
    """`IN (%s, ..., %s)` holding every item of a list value, in order, becomes `= ANY(%s)` with
    the list as one array parameter: psycopg caches how it reads a statement only up to 50
    parameters, and a batch's lists hold a hundred ids or more."""
    pieces: list[str] = []
    rewritten: list[Any] = []
    position = index = 0
    for match in _PLACEHOLDERS.finditer(sql):
        text = match.group()
        count = text.count("%s")
        if text.startswith("IN"):
            taken = slots[index : index + count]
            name = taken[0][0] if isinstance(taken[0], _Slot) else None
            whole = name is not None and isinstance(values[name], list)
            if whole and taken == [_Slot((name, item)) for item in range(len(values[name]))]:
                pieces.append(sql[position : match.start()] + "= ANY(%s)")
                rewritten.append(_Slot((name, _WHOLE_LIST)))
                position, index = match.end(), index + count
                continue
        pieces.append(sql[position : match.end()])
        rewritten.extend(slots[index : index + count])
        position, index = match.end(), index + count
    if index != len(slots):  # placeholders that are not the parameters': leave the statement as it is
        return sql, slots
    pieces.append(sql[position:])
    return "".join(pieces), rewritten


def _value_for(slot: Any, values: dict[str, Any]) -> Any:
    if not isinstance(slot, _Slot):
        return slot
    name, index = slot
    if index is None or index == _WHOLE_LIST:
        return values[name]
    return values[name][index]


_EPOCH = datetime(2001, 2, 3, 4, 5, 6, tzinfo=UTC)


def _marker(example: Any, number: int) -> Any:
    """A value of `example`'s type that no real argument is (they are compared, never sent)."""
    if isinstance(example, datetime):
        return _EPOCH + timedelta(microseconds=number)
    if isinstance(example, uuid.UUID):
        return uuid.UUID(int=(0xF1 << 120) + number)
    if isinstance(example, str):
        return f"\x00marker-{number}"
    # An int inside every integer column's range, a small integer's too (up to 32,767): Django
    # leaves out a comparison it knows the answer of, and the query would never compile.
    return 32_000 + number


def _markable(value: Any) -> bool:
    # Strings include the choices' enum members (a status); ints exclude bools (True == 1).
    items = value if isinstance(value, list) else [value]
    return all(type(item) is int or isinstance(item, str | uuid.UUID | datetime) for item in items)


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True
