"""A stream's table in a database destination: its columns, their types, and each record
checked and turned into a row, the same way for SQLite and PostgreSQL.

Columns come from the stream's JSON Schema where it gives `properties`, else from the
records (a field's type is inferred from its values in the batch where it first appears).
A column is added, never dropped or narrowed; a value that does not fit its column fails
the run naming stream, field, column type and the record's key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

from runner.codec import json_dumps_line
from runner.errors import InvalidRecordError, RunError
from runner.expressions import parse_datetime

from .records import StreamSpec, short

# The kinds of column the runner writes; OTHER is a column of a type it did not create (a
# user's VARCHAR, UUID, NUMERIC): values go as they are and the database judges them.
INTEGER: Final = "integer"
NUMBER: Final = "number"
BOOLEAN: Final = "boolean"
DATETIME: Final = "datetime"
TEXT: Final = "text"
JSON: Final = "json"
OTHER: Final = "other"

RUN_ID_COLUMN: Final = "_runner_run_id"
LOADED_AT_COLUMN: Final = "_runner_loaded_at"
RESERVED_PREFIX: Final = "_runner_"
MAX_NAME_BYTES: Final = 63  # PostgreSQL cuts longer identifiers silently: refused for both

_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1

Converter = Callable[[Any], Any]


def quote(name: str) -> str:
    """An SQL identifier, double-quoted (the same rule for SQLite and PostgreSQL)."""
    return '"' + name.replace('"', '""') + '"'


def check_name(stream: str, name: str, what: str = "field") -> None:
    """RunError (exit 1) for a name that cannot be a column (or table) of its own."""
    where = f"stream '{stream}': {what} {name!r}"
    if not name or "\x00" in name:
        raise RunError(f"{where} cannot be a column name", kind="invalid_record")
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise RunError(
            f"{where} is longer than {MAX_NAME_BYTES} bytes, the limit of a column name",
            kind="invalid_record",
        )
    if what == "field" and name.lower().startswith(RESERVED_PREFIX):
        raise RunError(
            f"{where}: names starting with {RESERVED_PREFIX} are the runner's own columns",
            kind="invalid_record",
        )


def kind_of_schema(schema: Any) -> str:
    """The column kind for a property's JSON Schema: a type list with null maps to its other
    type; any other union, `anyOf`, `oneOf`, `$ref` or no type at all to JSON."""
    if not isinstance(schema, Mapping):
        return JSON
    kind = schema.get("type")
    if isinstance(kind, list):
        others = [k for k in kind if k != "null"]
        kind = others[0] if len(others) == 1 else None
    if kind == "integer":
        return INTEGER
    if kind == "number":
        return NUMBER
    if kind == "boolean":
        return BOOLEAN
    if kind == "string":
        return DATETIME if schema.get("format") == "date-time" else TEXT
    return JSON


def kind_of_values(values: Iterable[Any]) -> str | None:
    """The kind inferred from a field's values in one batch; None when all are null."""
    seen: set[type] = set()
    for value in values:
        if value is not None:
            seen.add(type(value))
    if not seen:
        return None
    if seen == {bool}:
        return BOOLEAN
    if seen == {int}:
        return INTEGER
    if seen <= {int, float}:
        return NUMBER
    if seen == {str}:
        return TEXT
    return JSON


# -- converters: check a value against its column and give what the driver sends -----------


class _Misfit(Exception):
    """A value that does not fit its column; the table adds stream, field and key."""


def _to_integer(value: Any) -> Any:
    if type(value) is int:
        if _INT64_MIN <= value <= _INT64_MAX:
            return value
        raise _Misfit("out of the 64-bit range")
    if type(value) is float and value.is_integer() and _INT64_MIN <= value <= _INT64_MAX:
        return int(value)
    raise _Misfit


def _to_number(value: Any) -> Any:
    if type(value) is float or type(value) is int:
        if type(value) is int and not -(2**1023) < value < 2**1023:
            raise _Misfit("too large for a double")
        return value
    raise _Misfit


def _to_boolean(value: Any) -> Any:
    if type(value) is bool:
        return value
    raise _Misfit


def _to_text(value: Any) -> Any:
    if type(value) is str:
        if "\x00" in value:
            raise _Misfit("it holds a NUL character")
        return value
    raise _Misfit


def _to_datetime(value: Any) -> Any:
    if type(value) is not str:
        raise _Misfit
    try:
        parse_datetime(value)
    except ValueError:
        raise _Misfit("not an ISO 8601 datetime") from None
    return value


def _to_json(value: Any) -> Any:
    try:
        text = json_dumps_line(value)
    except (TypeError, ValueError) as exc:
        raise _Misfit(str(exc)) from None
    if "\\u0000" in text:
        raise _Misfit("it holds a NUL character")
    return text


def _to_other(value: Any) -> Any:
    if isinstance(value, dict | list):
        return _to_json(value)
    return value


CONVERTERS: Final[dict[str, Converter]] = {
    INTEGER: _to_integer,
    NUMBER: _to_number,
    BOOLEAN: _to_boolean,
    TEXT: _to_text,
    DATETIME: _to_datetime,
    JSON: _to_json,
    OTHER: _to_other,
}


class Column:
    """One column: its name, kind, the SQL type it was found with or is created with."""

    __slots__ = ("convert", "kind", "name", "sql_type")

    def __init__(self, name: str, kind: str, sql_type: str) -> None:
        self.name = name
        self.kind = kind
        self.sql_type = sql_type
        self.convert = CONVERTERS[kind]


class Table:
    """One stream's table as this run sees it: the columns found when the run opened the
    destination, then those that the schema and the records add, in order."""

    def __init__(
        self,
        spec: StreamSpec,
        found: Sequence[tuple[str, str]],
        kind_of_sql: Callable[[str], str],
        sql_of_kind: Callable[[str], str],
    ) -> None:
        self.stream = spec.name
        self.spec = spec
        self.primary_key = spec.primary_key
        self.exists = bool(found)
        self._sql_of_kind = sql_of_kind
        self.columns: list[Column] = []
        self.by_name: dict[str, Column] = {}
        self._folded: dict[str, str] = {}
        self.new: list[Column] = []  # columns the table does not have yet
        self._convert: Callable[[Sequence[Mapping[str, Any]]], list[tuple[Any, ...]]] | None = None
        self._converted_columns = 0
        for name, sql_type in found:
            if name.lower().startswith(RESERVED_PREFIX):
                continue
            self._add(Column(name, kind_of_sql(sql_type), sql_type), new=False)
        properties = (spec.schema or {}).get("properties")
        if isinstance(properties, Mapping):
            for name, prop in properties.items():
                if name not in self.by_name:
                    self.add(name, kind_of_schema(prop))

    def add(self, name: str, kind: str) -> Column:
        check_name(self.stream, name)
        folded = name.lower()
        other = self._folded.get(folded)
        if other is not None and other != name:
            raise RunError(
                f"stream '{self.stream}': fields {other!r} and {name!r} differ only in case; "
                "a database column name cannot tell them apart",
                kind="invalid_record",
            )
        return self._add(Column(name, kind, self._sql_of_kind(kind)), new=True)

    def _add(self, column: Column, new: bool) -> Column:
        self.columns.append(column)
        self.by_name[column.name] = column
        self._folded[column.name.lower()] = column.name
        if new:
            self.new.append(column)
        return column

    def take_new(self) -> list[Column]:
        """The columns added since the last call (the staging table adds them too)."""
        new, self.new = self.new, []
        return new

    def rows(self, records: Sequence[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
        """Each record as a row in column order; a field first seen here adds a column."""
        by_name = self.by_name
        unseen: dict[str, None] = {}
        for record in records:
            for name in record:
                if name not in by_name and name not in unseen:
                    unseen[name] = None
        for name in unseen:
            kind = kind_of_values(record.get(name) for record in records)
            if kind is not None:  # a field that is only ever null gets no column yet
                self.add(name, kind)
        if self._convert is None or self._converted_columns != len(self.columns):
            self._convert = _compile_rows(self.columns)
            self._converted_columns = len(self.columns)
        try:
            out = self._convert(records)
        except _Misfit:
            for record in records:  # find the record, and say which field of it
                self._raise_misfit(record)
            raise
        if self.primary_key:
            self._check_keys(records)
        return out

    def _check_keys(self, records: Sequence[Mapping[str, Any]]) -> None:
        for name in self.primary_key:
            for record in records:
                if record.get(name) is None:
                    raise InvalidRecordError(
                        f"stream '{self.stream}': a record has no value for the primary key "
                        f"field '{name}': {short(dict(record))}"
                    )

    def key_of(self, record: Mapping[str, Any]) -> str:
        if not self.primary_key:
            return "(no primary key)"
        return ", ".join(f"{name}={short(record.get(name))}" for name in self.primary_key)

    def _raise_misfit(self, record: Mapping[str, Any]) -> None:
        for column in self.columns:
            value = record.get(column.name)
            if value is None:
                continue
            try:
                column.convert(value)
            except _Misfit as exc:
                why = f" ({exc})" if str(exc) else ""
                raise InvalidRecordError(
                    f"stream '{self.stream}': field '{column.name}' of the record with "
                    f"{self.key_of(record)}: {short(value)} does not fit the column's type "
                    f"{column.sql_type}{why}"
                ) from None


# Checks inlined for the common case; anything else goes to the column's converter, which
# converts (an integral float to an int) or raises _Misfit.
_INLINE: Final = {
    INTEGER: "v{i} if type(v{i}) is int and {lo} <= v{i} <= {hi} else c{i}(v{i})",
    NUMBER: "v{i} if type(v{i}) is float else c{i}(v{i})",
    BOOLEAN: "v{i} if type(v{i}) is bool else c{i}(v{i})",
    TEXT: "v{i} if type(v{i}) is str and NUL not in v{i} else c{i}(v{i})",
}


def _compile_rows(
    columns: Sequence[Column],
) -> Callable[[Sequence[Mapping[str, Any]]], list[tuple[Any, ...]]]:
    """A function that turns records into rows for these columns, compiled once per column
    layout: a loop with each column's check written out is several times faster than a
    loop over the columns. Column names enter the source only as string literals (repr)."""
    namespace: dict[str, Any] = {"NUL": "\x00"}
    parts = []
    for i, column in enumerate(columns):
        namespace[f"c{i}"] = column.convert
        check = _INLINE.get(column.kind, "c{i}(v{i})").format(i=i, lo=_INT64_MIN, hi=_INT64_MAX)
        parts.append(f"(None if (v{i} := get({column.name!r})) is None else {check})")
    body = ", ".join(parts) + ("," if len(parts) == 1 else "")
    source = (
        "def rows(records):\n"
        "    out = []\n"
        "    append = out.append\n"
        "    for record in records:\n"
        "        get = record.get\n"
        f"        append(({body}))\n"
        "    return out\n"
    )
    exec(compile(source, "<runner.outputs.tables>", "exec"), namespace)
    rows: Callable[[Sequence[Mapping[str, Any]]], list[tuple[Any, ...]]] = namespace["rows"]
    return rows
