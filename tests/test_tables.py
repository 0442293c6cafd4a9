"""A stream's table: column kinds from a JSON Schema and from records, and each value
checked against its column, the same way for SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest

from runner.errors import InvalidRecordError, RunError
from runner.outputs import StreamSpec
from runner.outputs.tables import (
    BOOLEAN,
    DATETIME,
    INTEGER,
    JSON,
    NUMBER,
    OTHER,
    TEXT,
    Table,
    kind_of_schema,
    kind_of_values,
)


def table(found: list[tuple[str, str]] | None = None, **spec: Any) -> Table:
    return Table(StreamSpec("items", **spec), found or [], lambda sql: sql, lambda kind: kind)


@pytest.mark.parametrize(
    ("schema", "kind"),
    [
        ({"type": "integer"}, INTEGER),
        ({"type": ["number", "null"]}, NUMBER),
        ({"type": "boolean"}, BOOLEAN),
        ({"type": "string", "format": "date-time"}, DATETIME),
        ({"type": "string"}, TEXT),
        ({"type": "object"}, JSON),
        ({"type": ["string", "integer"]}, JSON),
        ({"anyOf": [{"type": "string"}]}, JSON),
        ({"$ref": "#/x"}, JSON),
    ],
)
def test_kind_of_schema(schema: dict[str, Any], kind: str) -> None:
    assert kind_of_schema(schema) == kind


@pytest.mark.parametrize(
    ("values", "kind"),
    [
        ([1, None, 2], INTEGER),
        ([1, 2.5], NUMBER),
        ([True, False], BOOLEAN),
        (["a"], TEXT),
        ([{"a": 1}], JSON),
        (["a", 1], JSON),
        ([None, None], None),
    ],
)
def test_kind_of_values(values: list[Any], kind: str | None) -> None:
    assert kind_of_values(values) == kind


def test_rows_follow_the_columns_and_a_new_field_adds_one() -> None:
    t = table(schema={"properties": {"id": {"type": "integer"}, "at": {"format": "date-time"}}})
    rows = t.rows([{"id": 1, "name": "a", "tags": ["x"]}, {"id": 2.0, "nothing": None}])
    assert [c.name for c in t.columns] == ["id", "at", "name", "tags"]
    assert rows == [(1, None, "a", '["x"]'), (2, None, None, None)]
    assert [c.name for c in t.take_new()] == ["id", "at", "name", "tags"]
    t.rows([{"id": 3, "late": True}])
    assert [c.name for c in t.take_new()] == ["late"]


@pytest.mark.parametrize(
    ("kind", "value"),
    [
        (INTEGER, "1"),
        (INTEGER, 1.5),
        (INTEGER, 2**63),
        (INTEGER, True),
        (NUMBER, "1.5"),
        (NUMBER, False),
        (BOOLEAN, 1),
        (TEXT, 5),
        (TEXT, "a\x00b"),
        (DATETIME, "yesterday"),
        (DATETIME, 1700000000),
    ],
)
def test_a_value_that_does_not_fit_names_stream_field_type_and_key(kind: str, value: Any) -> None:
    t = table(found=[("id", INTEGER), ("v", kind)], primary_key=("id",))
    assert t.rows([{"id": 1, "v": None}]) == [(1, None)]
    with pytest.raises(InvalidRecordError) as info:
        t.rows([{"id": 1, "v": None}, {"id": 7, "v": value}])
    message = str(info.value)
    assert "stream 'items'" in message and "field 'v'" in message
    assert "id=7" in message and kind in message


def test_values_that_fit() -> None:
    t = table(found=[("i", INTEGER), ("n", NUMBER), ("d", DATETIME), ("o", OTHER), ("j", JSON)])
    row = {"i": -(2**63), "n": 3, "d": "2024-01-01T00:00:00", "o": {"a": 1}, "j": "s"}
    assert t.rows([row]) == [(-(2**63), 3, "2024-01-01T00:00:00", '{"a":1}', '"s"')]


@pytest.mark.parametrize(
    ("record", "words"),
    [
        ({"_runner_run_id": 1}, "_runner_"),
        ({"_RUNNER_x": 1}, "_runner_"),
        ({"Name": 1, "name": 2}, "differ only in case"),
        ({"é" * 32: 1}, "longer than 63 bytes"),
    ],
)
def test_names_that_cannot_be_columns(record: dict[str, Any], words: str) -> None:
    with pytest.raises(RunError, match=words):
        table().rows([record])


def test_a_record_without_its_key_fails() -> None:
    with pytest.raises(InvalidRecordError, match="no value for the primary key field 'id'"):
        table(primary_key=("id",)).rows([{"id": 1}, {"name": "x"}])


def test_write_modes_are_checked() -> None:
    from runner.errors import UsageError

    with pytest.raises(UsageError, match="merge needs a primary_key"):
        StreamSpec("items", write="merge")
    with pytest.raises(UsageError, match="not one of merge, append, replace"):
        StreamSpec("items", write="upsert")
    assert StreamSpec("items", write="replace").write == "replace"
