"""What every destination shares: a stream's settings, the record checks (schema,
`on_invalid`) and the cursor of each stream.

Records are never kept: each one is checked and offered to its stream's cursor.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from runner.errors import RunError, UsageError
from runner.expressions import parse_datetime

if TYPE_CHECKING:
    from jsonschema import Draft202012Validator

CURSOR_TYPES: Final = frozenset({"datetime", "number", "string"})
ON_INVALID: Final = frozenset({"fail", "skip"})
WRITE_MODES: Final = frozenset({"merge", "append", "replace"})
STATE_VERSION: Final = 1

# A stream name becomes a file name: no separators, no leading dot (hidden partials use one).
STREAM_NAME: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
MESSAGE_CHARS: Final = 300


def short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """What `outputs.<stream>` declares: identity, cursor, schema and what to do on a bad record."""

    name: str
    primary_key: tuple[str, ...] = ()
    cursor_field: str | None = None
    # None compares by JSON type (numbers as numbers, strings as strings).
    cursor_type: str | None = None
    schema: Mapping[str, Any] | None = None
    on_invalid: str = "fail"
    # merge | append | replace; None: merge with a primary key, else append.
    write: str | None = None
    # `cursor.start`: the cursor's value in templates before the first run (never stored).
    cursor_start: Any = None
    # `cursor.lookback`: an ISO 8601 duration or a number, subtracted for `state.<s>.since`.
    cursor_lookback: str | float | None = None
    # `cursor.skip_seen`: drop records below the stored cursor, and those at it already seen.
    skip_seen: bool = False

    def __post_init__(self) -> None:
        if not STREAM_NAME.fullmatch(self.name):
            raise UsageError(
                f"stream name {self.name!r}: use letters, digits, '_', '-' and '.', "
                "not starting with '.' or '-'"
            )
        if self.on_invalid not in ON_INVALID:
            raise UsageError(
                f"outputs.{self.name}.on_invalid: {self.on_invalid!r} is not one of fail, skip"
            )
        if self.write is not None and self.write not in WRITE_MODES:
            raise UsageError(
                f"outputs.{self.name}.write: {self.write!r} is not one of merge, append, replace"
            )
        if self.write == "merge" and not self.primary_key:
            raise UsageError(f"outputs.{self.name}.write: merge needs a primary_key")
        if self.cursor_type is not None and self.cursor_type not in CURSOR_TYPES:
            raise UsageError(
                f"outputs.{self.name}.cursor.type: {self.cursor_type!r} is not one of "
                "datetime, number, string"
            )
        if self.cursor_type is not None and self.cursor_field is None:
            raise UsageError(f"outputs.{self.name}.cursor: a type needs a field")
        if self.cursor_field == "":
            raise UsageError(f"outputs.{self.name}.cursor.field: must not be empty")
        if self.skip_seen and not self.primary_key:
            raise UsageError(f"outputs.{self.name}.cursor.skip_seen: needs a primary_key")
        if self.skip_seen and self.cursor_lookback is not None:
            raise UsageError(
                f"outputs.{self.name}.cursor.lookback: not with skip_seen, which would drop "
                "what lookback fetches again"
            )


# --------------------------------------------------------------------------- cursors


@dataclass(frozen=True, slots=True)
class StreamState:
    """A stream's committed state when there is more than the cursor: `{"cursor", "seen"}`."""

    cursor: Any
    seen: tuple[tuple[Any, ...], ...] = ()

    def entry(self) -> dict[str, Any]:
        return {"cursor": self.cursor, "seen": [list(key) for key in self.seen]}


def state_entry(value: Any) -> dict[str, Any]:
    """The state file's entry of a stream for a new cursor value (or a StreamState)."""
    if isinstance(value, StreamState):
        return value.entry()
    return {"cursor": value}


_MISSING: Final = object()


class _Cursor:
    """The greatest cursor value seen in one stream, kept as (comparable key, original value)."""

    __slots__ = ("best", "best_key", "field", "kind", "parts", "stream", "type")

    def __init__(self, stream: str, field: str, cursor_type: str | None) -> None:
        self.stream = stream
        self.field = field
        # A literal top-level key wins; otherwise a dotted name walks nested objects.
        self.parts = tuple(field.split(".")) if "." in field else ()
        self.type = cursor_type
        self.kind: str | None = cursor_type
        self.best: Any = None
        self.best_key: Any = None

    def read(self, record: Mapping[str, Any]) -> Any:
        value = record.get(self.field, _MISSING)
        if value is _MISSING:
            if not self.parts:
                return None
            node: Any = record
            for part in self.parts:
                if not isinstance(node, Mapping):
                    return None
                node = node.get(part)
            return node
        return value

    def key(self, value: Any, origin: str) -> tuple[str, Any]:
        """(kind, comparable) for a value; RunError if it cannot be a cursor of this stream."""
        kind = self.type
        if kind == "datetime":
            try:
                # Fractions past microseconds are cut: values differing only there are equal.
                parsed = parse_datetime(value)
            except ValueError as exc:
                raise RunError(
                    f"stream '{self.stream}': cursor field '{self.field}' {origin} "
                    f"{short(value)} is not an ISO 8601 datetime",
                    kind="cursor",
                ) from exc
            return kind, parsed
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise RunError(
                f"stream '{self.stream}': cursor field '{self.field}' {origin} "
                f"{short(value)} is not a {kind or 'number or string'}",
                kind="cursor",
            )
        found = "string" if isinstance(value, str) else "number"
        if kind is not None and found != kind:
            raise RunError(
                f"stream '{self.stream}': cursor field '{self.field}' {origin} "
                f"{short(value)} is not a {kind}",
                kind="cursor",
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise RunError(
                f"stream '{self.stream}': cursor field '{self.field}' {origin} "
                f"{short(value)} is not a finite number",
                kind="cursor",
            )
        return found, value

    def offer(self, record: Mapping[str, Any]) -> None:
        value = self.read(record)
        if value is None or (value == self.best and type(value) is type(self.best)):
            return
        kind, key = self.key(value, "value")
        self._take(kind, key, value)

    def _take(self, kind: str, key: Any, value: Any) -> None:
        if self.best_key is None:
            self.kind, self.best_key, self.best = kind, key, value
            return
        if kind != self.kind:
            raise RunError(
                f"stream '{self.stream}': cursor field '{self.field}' mixes types: "
                f"{short(self.best)} and {short(value)}; declare cursor.type",
                kind="cursor",
            )
        if key > self.best_key:
            self.best_key, self.best = key, value

    def merged_with(self, old: Any) -> Any:
        """The greatest of the old cursor and every value seen; the old one if none was seen."""
        if self.best_key is None or old is None:
            return old if self.best_key is None else self.best
        kind, key = self.key(old, "in the state file:")
        if kind != self.kind:
            raise RunError(
                f"stream '{self.stream}': cursor field '{self.field}' in the state file "
                f"{short(old)} and the new value {short(self.best)} differ in type",
                kind="cursor",
            )
        return self.best if self.best_key > key else old


class _Check:
    """Per-stream compiled checks: the schema validator and the cursor."""

    __slots__ = ("cursor", "skip", "validator")

    def __init__(self, spec: StreamSpec | None) -> None:
        self.validator: Draft202012Validator | None = None
        self.skip = False
        self.cursor: _Cursor | None = None
        if spec is None:
            return
        if spec.schema is not None:
            # Imported only for a stream with a schema: jsonschema costs ~30 ms to import.
            from jsonschema import Draft202012Validator
            from jsonschema.exceptions import SchemaError

            try:
                Draft202012Validator.check_schema(spec.schema)
            except SchemaError as exc:
                raise UsageError(
                    f"outputs.{spec.name}.schema: not a valid JSON Schema: {exc.message}"
                ) from exc
            self.validator = Draft202012Validator(spec.schema)
        self.skip = spec.on_invalid == "skip"
        if spec.cursor_field is not None:
            self.cursor = _Cursor(spec.name, spec.cursor_field, spec.cursor_type)
