"""JMESPath: extra functions, truthiness, error messages, and the plain-path fast path."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import jmespath
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.errors import ExpressionError, RenderError
from runner.expressions import (
    compile_expression,
    format_datetime,
    parse_datetime,
    to_epoch,
    truthy,
)

# --- truthiness ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (False, False),
        (None, False),
        ("", False),
        ([], False),
        ({}, False),
        (0, True),
        (0.0, True),
        ("0", True),
        ("false", True),
        ([0], True),
        ({"a": None}, True),
        (True, True),
    ],
)
def test_truthy(value: Any, expected: bool) -> None:
    assert truthy(value) is expected
    # Same answer as JMESPath's own condition evaluation.
    assert (jmespath.search("[?@]", [value]) == [value]) is expected


# --- extra functions -----------------------------------------------------------------------

DATA: dict[str, Any] = {
    "tags": ["b", "a", "b", "c", "a"],
    "mixed": [1, 1.0, True, "1", None, {"a": 1}, {"a": 1}, [1], [1], False, 0],
    "name": "Ada Lovelace",
    "csv": "a,b,,c",
    "obj": {"x": 1, "y": [2]},
    "pairs": [["x", 1], ["y", [2]]],
    "when": "2024-05-01T12:00:00Z",
    "epoch": 1714564800.5,
    "rows": [{"id": 1, "at": "2024-05-01T12:00:00Z"}, {"id": 2, "at": "2024-05-01T13:00:00Z"}],
}


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("unique(tags)", ["b", "a", "c"]),
        ("unique(mixed)", [1, True, "1", None, {"a": 1}, [1], False, 0]),
        ("lower(name)", "ada lovelace"),
        ("upper(name)", "ADA LOVELACE"),
        ("split(csv, ',')", ["a", "b", "", "c"]),
        ("split('abc', '')", ["a", "b", "c"]),
        ("replace(name, 'a', '4')", "Ad4 Lovel4ce"),
        ("to_epoch(when)", 1714564800),
        ("to_epoch(epoch)", 1714564800),
        ("rows[?to_epoch(at) > `1714564800`].id", [2]),
        ("items(obj)", [["x", 1], ["y", [2]]]),
        ("from_items(pairs)", {"x": 1, "y": [2]}),
        ("from_items(items(obj))", {"x": 1, "y": [2]}),
        ("length(unique(rows[].id))", 2),
    ],
)
def test_extra_functions(source: str, expected: Any) -> None:
    assert compile_expression(source).search(DATA) == expected


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("upper(`1`)", "invalid type for value: 1"),
        ("to_epoch('yesterday')", "not an ISO 8601 datetime: 'yesterday'"),
        ("to_epoch(`true`)", "invalid type"),
        ("from_items(`[[1, 2]]`)", "from_items() expects [key, value] pairs"),
        ("items(tags)", "invalid type"),
        ("sort_by(rows, &nope)", "JMESPath error in 'sort_by(rows, &nope)'"),
    ],
)
def test_runtime_errors_are_render_errors(source: str, message: str) -> None:
    with pytest.raises(RenderError) as info:
        compile_expression(source).search(DATA)
    assert message in info.value.message


# --- compile errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (
            "body.data[",
            "JMESPath: unexpected end of expression: body.data[\n" + " " * 50 + "^",
        ),
        ("a b", "JMESPath: unexpected token 'b': a b\n" + " " * 34 + "^"),
        ("a.", "JMESPath: unexpected end of expression: a.\n" + " " * 42 + "^"),
        ("`abc", "JMESPath: unclosed ` delimiter: `abc\n" + " " * 32 + "^"),
        ("", "JMESPath: empty expression"),
    ],
)
def test_syntax_error_message_has_a_caret(source: str, expected: str) -> None:
    with pytest.raises(ExpressionError) as info:
        compile_expression(source)
    assert info.value.message == expected
    assert info.value.exit_code == 2


def test_caret_sits_under_the_error() -> None:
    with pytest.raises(ExpressionError) as info:
        compile_expression("foo[?x == ] | y")
    first, caret = info.value.message.split("\n")
    column = caret.index("^")
    assert first[column] == "]"


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("nope(a)", "JMESPath: unknown function nope() in 'nope(a)'"),
        ("upper(a, b)", "JMESPath: upper() takes 1 argument, got 2: upper(a, b)"),
        ("a[?split(b)]", "split() takes 2 arguments, got 1"),
        ("merge()", "merge() takes at least 1 argument, got 0"),
    ],
)
def test_unknown_functions_and_arity_fail_at_compile(source: str, message: str) -> None:
    with pytest.raises(ExpressionError) as info:
        compile_expression(source)
    assert message in info.value.message


def test_compile_is_cached() -> None:
    assert compile_expression("a.b") is compile_expression("a.b")


# --- static information --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "roots", "steps"),
    [
        ("body.data", {"body"}, set()),
        ("steps.contacts.records[].company_id", {"steps"}, {"contacts"}),
        ('steps."my-step".vars.id', {"steps"}, {"my-step"}),
        ("body.data[?x == `1`].y", {"body"}, set()),
        # Inside a filter, fields are read on each element, not the root.
        ("body.data[?x == steps.a.vars.y]", {"body"}, {"a"}),
        ("[inputs.a, env.B]", {"inputs", "env"}, set()),
        ("{a: item.id, b: steps.s.records[0]}", {"item", "steps"}, {"s"}),
        ("length(body) > `0` && status == `200`", {"body", "status"}, set()),
        ("body | [0].id", {"body"}, set()),
        ("sort_by(body.rows, &at)", {"body"}, set()),
        ("@", set(), set()),
        ("'literal'", set(), set()),
        ('headers."x-next"', {"headers"}, set()),
        ("!state.s.cursor", {"state"}, set()),
        ("body.*.id", {"body"}, set()),
    ],
)
def test_root_names_and_step_refs(source: str, roots: set[str], steps: set[str]) -> None:
    expression = compile_expression(source)
    assert expression.root_names == roots
    assert expression.step_refs == steps


# --- datetimes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-05-01T12:00:00Z", datetime(2024, 5, 1, 12, tzinfo=UTC)),
        ("2024-05-01T12:00:00", datetime(2024, 5, 1, 12, tzinfo=UTC)),
        ("2024-05-01T12:00:00.5Z", datetime(2024, 5, 1, 12, 0, 0, 500000, tzinfo=UTC)),
        ("2024-05-01T12:00:00.123456789Z", datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)),
        ("2024-05-01t12:00:00z", datetime(2024, 5, 1, 12, tzinfo=UTC)),
        (
            "2024-05-01T14:00:00+02:00",
            datetime(2024, 5, 1, 14, tzinfo=timezone(timedelta(hours=2))),
        ),
        ("2024-05-01", datetime(2024, 5, 1, tzinfo=UTC)),
    ],
)
def test_parse_datetime(text: str, expected: datetime) -> None:
    parsed = parse_datetime(text)
    assert parsed == expected
    assert parsed.tzinfo is not None


def test_datetimes_compare_as_instants() -> None:
    assert parse_datetime("2024-05-01T12:00:00Z") < parse_datetime("2024-05-01T12:00:00.5Z")
    assert parse_datetime("2024-05-01T14:00:00+02:00") == parse_datetime("2024-05-01T12:00:00")


@pytest.mark.parametrize("bad", ["", "yesterday", "2024-13-01T00:00:00Z", "1714564800", 5, None])
def test_parse_datetime_refuses(bad: Any) -> None:
    with pytest.raises(ValueError):
        parse_datetime(bad)


def test_to_epoch_and_format_datetime() -> None:
    assert to_epoch("1969-12-31T23:59:59.5Z") == -1
    assert to_epoch(-0.5) == -1
    assert to_epoch(7) == 7
    assert format_datetime(0) == "1970-01-01T00:00:00Z"
    assert format_datetime("2024-05-01T14:00:00+02:00", "%d/%m/%Y %H") == "01/05/2024 12"
    with pytest.raises(ValueError):
        to_epoch(True)
    with pytest.raises(ValueError):
        to_epoch(float("nan"))


# --- the fast path -------------------------------------------------------------------------

PATHS = [
    "a",
    "a.b.c",
    "a[0].b",
    "a[-1].id",
    'headers."x-next"',
    "a[5]",
    "[0]",
    "@",
    "@.a",
    "a.b[0][1]",
    '"a b".c',
]


@pytest.mark.parametrize("source", PATHS)
def test_plain_paths_take_the_fast_path(source: str) -> None:
    assert compile_expression(source).is_plain_path


@pytest.mark.parametrize("source", ["a[*].b", "a[]", "a | b", "a[0:1]", "length(a)", "a.b[?c]"])
def test_other_expressions_use_the_interpreter(source: str) -> None:
    assert not compile_expression(source).is_plain_path


INPUTS: list[Any] = [
    {"a": {"b": {"c": 1}}},
    {"a": [{"b": 2, "id": 3}, {"id": 4}]},
    {"a": "text"},
    {"a": None},
    {"a": [[0, [1, 2]]]},
    {"a": {"b": [[9, 8]]}},
    {"headers": {"x-next": "tok"}},
    {"a b": {"c": 5}},
    [{"a": 1}],
    [1, 2],
    "scalar",
    None,
    0,
    {"a": {"0": "zero"}},
]


@pytest.mark.parametrize("source", PATHS)
@pytest.mark.parametrize("data", INPUTS, ids=[json.dumps(d) for d in INPUTS])
def test_fast_path_matches_jmespath(source: str, data: Any) -> None:
    assert compile_expression(source).search(data) == jmespath.search(source, data)


KEYS = st.sampled_from(["a", "b", "id", "x-y", "0", "é"])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.text(max_size=3),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=4),
    max_leaves=20,
)
SEGMENTS = st.lists(st.one_of(KEYS, st.integers(-4, 4)), min_size=1, max_size=5)


def _path_source(segments: list[str | int]) -> str:
    out = ""
    for segment in segments:
        if isinstance(segment, int):
            out += f"[{segment}]"
        else:
            out += ("." if out else "") + json.dumps(segment)
    return out


@settings(max_examples=300, deadline=None)
@given(data=JSON, segments=SEGMENTS)
def test_fast_path_matches_jmespath_on_random_data(data: Any, segments: list[str | int]) -> None:
    source = _path_source(segments)
    expression = compile_expression(source)
    assert expression.is_plain_path
    assert expression.search(data) == jmespath.search(source, data)


def test_plain_paths_never_reach_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path is what makes mapping cheap (benchmarks/ measure how cheap): a plain
    path is read without jmespath's tree interpreter, and gives what the interpreter gives."""
    records = [
        {"id": i, "emails": [{"value": f"u{i}@x"}], "company": {"id": i % 7}, "updated_at": "t"}
        for i in range(50)
    ]
    fields = ["id", "emails[0].value", "company.id", "updated_at", "missing.x"]
    expected = [{f: jmespath.search(f, r) for f in fields} for r in records]
    fast = [compile_expression(f) for f in fields]
    assert all(e.is_plain_path for e in fast)

    def interpreted(*args: object, **kwargs: object) -> object:
        raise AssertionError("a plain path went through the interpreter")

    monkeypatch.setattr(jmespath.visitor.TreeInterpreter, "visit", interpreted)
    mapped = [{f: e.search(r) for f, e in zip(fields, fast, strict=True)} for r in records]
    assert mapped == expected
    # A function call is interpreted: the patch above would have caught a plain path.
    with pytest.raises(RenderError, match="went through the interpreter"):
        compile_expression("length(emails)").search(records[0])
