"""The performance fast paths give exactly what the general paths give: shapes, JSONL bytes,
batched writes, and text templates rendered without Jinja."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jinja2 import meta

from runner import sandbox
from runner.codec import json_dumps_line, json_dumps_line_bytes
from runner.errors import RenderError, RunError
from runner.expressions import compile_expression, compile_shape
from runner.outputs import FileOutputs, StreamSpec
from runner.sandbox import _ENV, _ENV_PATH
from runner.templates import _JINJA_GLOBALS, GLOBALS, compile_template, simple_parts

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["a", "b", "id", "x-y", "0"]), inner, max_size=4)
    ),
    max_leaves=12,
)

PATHS = ["id", "a", "a.b", "a.b.x", '"x-y"', "a[0]", "b[1].a", "a.b[0]", "@", "length(a)"]


@settings(max_examples=300, deadline=None)
@given(record=json_values, picks=st.lists(st.sampled_from(PATHS), min_size=1, max_size=6))
def test_compile_shape_is_field_by_field_search(record: Any, picks: list[str]) -> None:
    fields = tuple((f"f{i}", compile_expression(source)) for i, source in enumerate(picks))
    shape = compile_shape(fields)
    expected: dict[str, Any] | None = None
    try:
        expected = {name: e.search(record) for name, e in fields}
    except RenderError:
        with pytest.raises(RenderError):
            shape(record)
        return
    assert shape(record) == expected
    assert list(shape(record)) == [name for name, _ in fields]


def test_compile_shape_reads_nested_plain_dicts_and_other_types() -> None:
    fields = (
        ("id", compile_expression("id")),
        ("country", compile_expression("address.country")),
        ("first", compile_expression("tags[0]")),
        ("deep", compile_expression("a.b.c")),
    )
    shape = compile_shape(fields)
    assert shape({"id": 1, "address": {"country": "DE"}, "tags": ["x"], "a": {"b": {"c": 2}}}) == {
        "id": 1,
        "country": "DE",
        "first": "x",
        "deep": 2,
    }
    assert shape({"address": "no dict", "tags": "no list"}) == dict.fromkeys(
        ["id", "country", "first", "deep"]
    )
    assert shape("not an object") == dict.fromkeys(["id", "country", "first", "deep"])
    assert compile_shape(fields) is shape  # compiled once


@settings(max_examples=300, deadline=None)
@given(value=json_values)
def test_json_line_bytes_is_the_text_line_encoded(value: Any) -> None:
    try:
        text = json_dumps_line(value)
    except (TypeError, ValueError):
        with pytest.raises((TypeError, ValueError)):
            json_dumps_line_bytes(value)
        return
    try:
        expected = (text + "\n").encode("utf-8")
    except UnicodeEncodeError:
        with pytest.raises(UnicodeEncodeError):
            json_dumps_line_bytes(value)
        return
    assert json_dumps_line_bytes(value) == expected


def _outputs(directory: Path, run_id: str, **spec: Any) -> FileOutputs:
    streams = {"s": StreamSpec("s", **spec)}
    out = FileOutputs(str(directory), run_id, streams, ["s"], datetime.now(UTC))
    out.open()
    return out


@pytest.mark.parametrize("spec", [{}, {"cursor_field": "n", "cursor_type": "number"}])
def test_write_many_writes_what_write_writes(tmp_path: Path, spec: dict[str, Any]) -> None:
    records = [{"n": i, "text": "é" * (i % 3), "f": i / 7, "small": 1e-7 * i} for i in range(500)]
    one = _outputs(tmp_path / "one", "r1", **spec)
    for record in records:
        one.write("s", record)
    many = _outputs(tmp_path / "many", "r2", **spec)
    many.write_many("s", records[:250])
    many.write_many("s", records[250:])
    assert many.counts == one.counts == {"s": 500}
    assert many.new_cursors({}) == one.new_cursors({})
    first, second = one.commit(), many.commit()
    assert first["streams"]["s"]["sha256"] == second["streams"]["s"]["sha256"]
    lines = (tmp_path / "many" / "s.jsonl").read_text("utf-8").splitlines()
    assert [json.loads(line) for line in lines] == records


def test_write_many_counts_records_before_a_bad_one(tmp_path: Path) -> None:
    out = _outputs(tmp_path, "r1")
    with pytest.raises(RunError, match="cannot be written as JSON"):
        out.write_many("s", [{"a": 1}, {"b": object()}, {"c": 3}])
    assert out.counts["s"] == 1
    out.abort()
    partial = [name for name in os.listdir(tmp_path) if name.endswith(".partial")]
    assert (tmp_path / partial[0]).read_text() == '{"a":1}\n'


def test_write_many_checks_a_schema_like_write(tmp_path: Path) -> None:
    out = _outputs(tmp_path, "r1", schema={"type": "object", "required": ["id"]}, on_invalid="skip")
    out.write_many("s", [{"id": 1}, {"x": 2}, {"id": 3}])
    assert out.counts["s"] == 2
    assert out.invalid_skipped == {"s": 1}
    out.abort()


TEXT_SOURCES = [
    "/items/{{ item }}",
    "a{{ x }}b{{ y.z }}c",
    "{{ x }} and {{ y['z'] }}",
    "/f/{{ y.l[1] }}",
    "{{ body.items }}",
    "n={{ flag }}",
    "{{ now }}x",
]
scope_values = st.none() | st.booleans() | st.integers() | st.text(max_size=6) | json_values


@settings(max_examples=300, deadline=None)
@given(
    source=st.sampled_from(TEXT_SOURCES),
    mode=st.sampled_from(["text", "path"]),
    x=scope_values,
    y=scope_values,
)
def test_text_templates_render_as_jinja_does(source: str, mode: str, x: Any, y: Any) -> None:
    scope = {"x": x, "y": y, "item": x, "flag": x, "body": y}
    env = _ENV_PATH if mode == "path" else _ENV
    reference = env.from_string(source)
    try:
        context = reference.new_context({**reference.globals, **scope}, True)
        expected: str | None = "".join(reference.root_render_func(context))
    except Exception:
        expected = None
    template = compile_template(source, mode)  # type: ignore[arg-type]
    if expected is None:
        with pytest.raises(RenderError):
            template.render(scope)
    else:
        assert template.render(scope) == expected


# -- the template parser of the fast path against Jinja's --------------------------------------

_NAMES = st.sampled_from(
    ["a", "item", "steps", "x_1", "_", "A1", "true", "None", "not", "in", "range", "now", "é",
     "self", "loop", "caller"]
)  # fmt: skip
_KEYS = st.lists(
    st.sampled_from(
        [".a", ".login", ".vars", ".not", ".true", "[0]", "[01]", "[10]", "['a b']", '["k"]',
         "['é']", ".0", "[ 0 ]", "['a\\'b']", "[-1]", "|x", "(1)", " . a"]
    ),
    max_size=3,
).map("".join)  # fmt: skip
_SPACES = st.sampled_from(["", " ", "  ", "\n", "\t", "-", " -", "+"])
_LOOKUPS = st.builds(
    lambda a, n, k, b: "{{" + a + n + k + b + "}}", _SPACES, _NAMES, _KEYS, _SPACES
)
_TEXTS = st.lists(
    st.sampled_from(["a", " ", "\n", "\r\n", "\r", "/", "{", "}", "%", "#", "{%", "{#", "}}"]),
    max_size=4,
).map("".join)
TEMPLATE_TEXTS = st.lists(_LOOKUPS | _TEXTS, max_size=5).map("".join)


@settings(max_examples=1500, deadline=None)
@given(TEMPLATE_TEXTS)
def test_the_fast_parser_reads_templates_as_jinja_does(source: str) -> None:
    """Where the fast path takes a template without Jinja, Jinja parses the same text into the
    same literal text and lookups, reads the same names and `steps.<id>`, and agrees on
    whether a value template is one lone expression."""
    parts = simple_parts(source)
    if parts is None:
        return  # Jinja's to parse
    tree = _ENV.parse(source)  # a syntax error here fails the test
    assert sandbox._text_parts(tree) == parts
    if "{{" not in source:
        return  # plain text: not a template at all
    template = compile_template(source, "value")
    assert template.names == frozenset(meta.find_undeclared_variables(tree)) - sandbox._GLOBAL_NAMES
    assert template.step_refs == frozenset(sandbox._step_refs(tree))
    lookups = [p for p in parts if not isinstance(p, str)]
    blank_around = all(p.strip() == "" for p in parts if isinstance(p, str))
    assert (sandbox._lone_expression(tree) is not None) == (len(lookups) == 1 and blank_around)


def test_the_fast_parser_knows_jinja_globals() -> None:
    assert _JINJA_GLOBALS | set(GLOBALS) == set(_ENV.globals)


def test_plain_lookups_do_not_load_jinja() -> None:
    probe = """
import sys
from runner.templates import compile_template
t = compile_template("/items/{{ item.id }}/{{ steps.a.records[0]['k'] }}", "path")
print(t.render({"item": {"id": "a b"}, "steps": {"a": {"records": [{"k": 7}]}}}))
print("jinja2" in sys.modules)
try:
    t.render({"item": {}, "steps": {}})
except Exception as exc:
    print(type(exc).__name__, "jinja2" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    # A miss takes Jinja's path, for Jinja's own words about it.
    assert out.stdout.splitlines() == ["/items/a%20b/7", "False", "RenderError True"]


def test_a_good_flow_loads_without_what_only_mistakes_and_csv_bodies_need(tmp_path: Path) -> None:
    flow = Path(__file__).resolve().parent.parent / "flows" / "contacts.yaml"
    typo = tmp_path / "typo.yaml"
    typo.write_text("version: 1\nname: t\nsteps:\n  - id: a\n    requets: {url: x}\n")
    probe = """
import sys
from runner.errors import FlowError
from runner.run import load_flow
lazy = ("difflib", "csv", "importlib.resources")
load_flow(sys.argv[1])
print(sorted(m for m in lazy if m in sys.modules))
try:
    load_flow(sys.argv[2])
except FlowError as exc:
    print("difflib" in sys.modules, exc.problems[0].message)
"""
    out = subprocess.run(
        [sys.executable, "-c", probe, str(flow), str(typo)],
        capture_output=True,
        text=True,
        check=True,
    )
    good, bad = out.stdout.splitlines()
    assert good == "[]"
    assert bad == "True unknown key 'requets' (did you mean 'request'?)"


def test_the_cli_collects_no_garbage_while_it_loads_then_freezes_what_it_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gc

    import runner.run
    from runner import cli

    flow = tmp_path / "bad.yaml"
    flow.write_text("version: 1\nname: bad\nsteps: nope\n", encoding="utf-8")
    collecting_while_loading: list[bool] = []
    load_flow = runner.run.load_flow

    def spy(*args: Any, **kwargs: Any) -> Any:
        collecting_while_loading.append(gc.isenabled())
        return load_flow(*args, **kwargs)

    monkeypatch.setattr(runner.run, "load_flow", spy)
    assert gc.isenabled()
    try:
        assert cli.main(["run", str(flow)]) == 2  # a flow that fails to load, too
        assert collecting_while_loading == [False]
        assert gc.isenabled()
        assert gc.get_freeze_count() > 0
        assert cli.main(["validate", str(flow)]) == 2
        assert gc.isenabled()
    finally:
        gc.unfreeze()
