"""Singer (`--sink singer`): SCHEMA, RECORD and STATE messages on stdout, for any Singer
target (`runner run flow.yaml --sink singer | target-jsonl -c config.json`).

A stream's SCHEMA comes before its first RECORD: its `schema`, or one inferred from the
records (sent again, widened, when a record brings a new field or type). The STATE message
comes once, after success. Delivery is at least once: targets deduplicate by
`key_properties`.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Collection, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final, TextIO

from runner.codec import json_dumps_line
from runner.errors import RunError

from .base import Outputs
from .records import STATE_VERSION, StreamSpec, state_entry

if TYPE_CHECKING:
    from .state import StateStore

_JSON_TYPES: Final = {
    bool: "boolean",
    int: "integer",
    float: "number",
    str: "string",
    dict: "object",
    list: "array",
}
_ASCII: Final = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"))


class _Inferred:
    """A stream's schema as its records show it: the JSON types seen per field."""

    __slots__ = ("fields",)

    def __init__(self) -> None:
        self.fields: dict[str, set[str]] = {}

    def learn(self, record: Mapping[str, Any]) -> bool:
        """Take in a record's fields; True if the schema grew."""
        grew = False
        fields = self.fields
        for name, value in record.items():
            kind = _JSON_TYPES.get(type(value)) if value is not None else None
            seen = fields.get(name)
            if seen is None:
                fields[name] = {kind} if kind else set()
                grew = True
            elif kind is not None and kind not in seen:
                seen.add(kind)
                grew = True
        return grew

    def schema(self) -> dict[str, Any]:
        properties: dict[str, Any] = {}
        for name, kinds in self.fields.items():
            if "integer" in kinds and "number" in kinds:
                kinds = kinds - {"integer"}
            properties[name] = {"type": [*sorted(kinds), "null"]} if kinds else {}
        return {"type": "object", "properties": properties}


class SingerOutputs(Outputs):
    """Singer messages on a text stream; `--state F` is read and written as with files."""

    def __init__(
        self,
        streams: Mapping[str, StreamSpec],
        emitted: Iterable[str],
        out: TextIO = sys.stdout,
        state: StateStore | None = None,
        shard: str | None = None,
    ) -> None:
        super().__init__(streams)
        self.state = self._store = state
        self.shard = shard  # `I/N`: the STATE message holds this shard's cursors
        self._out = out
        self._specs = dict(streams)
        self._declared = sorted({*streams, *emitted})
        self._inferred: dict[str, _Inferred] = {}
        self._announced: set[str] = set()
        for name in self._declared:
            self.counts.setdefault(name, 0)

    def describe(self) -> str:
        return "stdout (Singer)"

    def _send(self, message: dict[str, Any]) -> None:
        try:
            line = json_dumps_line(message)
        except (TypeError, ValueError) as exc:
            raise RunError(f"a Singer message cannot be written as JSON: {exc}", kind="io") from exc
        try:
            try:
                self._out.write(line + "\n")
            except UnicodeEncodeError:
                self._out.write(_ASCII.encode(message) + "\n")
        except OSError as exc:
            raise RunError(f"cannot write to stdout: {exc.strerror or exc}", kind="io") from exc

    def _schema_message(self, stream: str) -> None:
        spec = self._specs.get(stream)
        schema: Any = spec.schema if spec is not None and spec.schema is not None else None
        if schema is None:
            schema = self._inferred.setdefault(stream, _Inferred()).schema()
        self._send(
            {
                "type": "SCHEMA",
                "stream": stream,
                "schema": schema,
                "key_properties": list(spec.primary_key) if spec is not None else [],
            }
        )
        self._announced.add(stream)

    def open(self) -> None:
        # Streams with a declared schema are announced at once; the others with their
        # first record, whose fields the inferred schema needs.
        for name in self._declared:
            spec = self._specs.get(name)
            if spec is not None and spec.schema is not None:
                self._schema_message(name)
        self._flush()

    def _write_line(self, stream: str, record: dict[str, Any]) -> None:
        spec = self._specs.get(stream)
        if spec is None or spec.schema is None:
            inferred = self._inferred.get(stream)
            if inferred is None:
                inferred = self._inferred[stream] = _Inferred()
            if inferred.learn(record) or stream not in self._announced:
                self._schema_message(stream)
        elif stream not in self._announced:
            self._schema_message(stream)
        self._send({"type": "RECORD", "stream": stream, "record": record})

    def write_many(self, stream: str, records: Iterable[dict[str, Any]]) -> None:
        super().write_many(stream, records)
        self._flush()

    def _flush(self) -> None:
        try:
            self._out.flush()
        except OSError as exc:
            raise RunError(f"cannot write to stdout: {exc.strerror or exc}", kind="io") from exc

    def commit(
        self, cursors: Mapping[str, Any] | None = None, cut_short: Collection[str] = ()
    ) -> dict[str, Any] | None:
        for name in self._declared:
            if name not in self._announced:  # an emitted stream that got no record
                self._schema_message(name)
        old = self._store.load() if self._store is not None else {"streams": {}}
        own = old.get("streams") if self.shard is None else old.get("shards", {}).get(self.shard)
        streams = {name: dict(entry) for name, entry in (own or {}).items()}
        for name, cursor in (cursors or {}).items():
            if cursor is not None:
                streams.setdefault(name, {}).update(state_entry(cursor))
        value: dict[str, Any] = {"version": STATE_VERSION, "streams": streams}
        if self.shard is not None:  # the state file's shape: a shard's cursors under its key
            value = {"version": STATE_VERSION, "shards": {self.shard: streams}}
        self._send({"type": "STATE", "value": value})
        self._flush()
        if self._store is not None and cursors is not None:
            self._store.save_streams(cursors)
        return None

    def abort(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._out.flush()
