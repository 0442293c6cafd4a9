"""Tests of runner.loader: YAML 1.2 core data, marks for every key path, located errors."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner.errors import FlowError, Problem, UsageError
from runner.loader import (
    MAX_ALIAS_NODES,
    Document,
    load_data_file,
    load_document,
    load_text,
)


def problems_of(text: str | bytes, file: str = "f.yaml") -> list[Problem]:
    with pytest.raises(FlowError) as info:
        load_text(text, file)
    return info.value.problems


def only_problem(text: str | bytes, file: str = "f.yaml") -> Problem:
    problems = problems_of(text, file)
    assert len(problems) == 1, problems
    return problems[0]


# --- data: the YAML 1.2 core schema ---------------------------------------------------------


@pytest.mark.parametrize(
    ("scalar", "expected"),
    [
        ("~", None),
        ("null", None),
        ("Null", None),
        ("NULL", None),
        ("", None),
        ("true", True),
        ("True", True),
        ("TRUE", True),
        ("false", False),
        ("False", False),
        ("FALSE", False),
        ("0", 0),
        ("42", 42),
        ("-17", -17),
        ("+12", 12),
        ("01234", 1234),
        ("0o17", 15),
        ("0x1F", 31),
        ("0x1f", 31),
        ("1.5", 1.5),
        ("-1.5", -1.5),
        ("1e3", 1000.0),
        ("1.5E-2", 0.015),
        (".5", 0.5),
        ("1.", 1.0),
        (".inf", math.inf),
        (".Inf", math.inf),
        ("+.INF", math.inf),
        ("-.Inf", -math.inf),
        # Strings in YAML 1.2 core, though YAML 1.1 (PyYAML's safe_load) gives other types.
        ("2022-11-28", "2022-11-28"),
        ("2001-12-14t21:59:43.10-05:00", "2001-12-14t21:59:43.10-05:00"),
        ("yes", "yes"),
        ("no", "no"),
        ("on", "on"),
        ("off", "off"),
        ("y", "y"),
        ("1:30", "1:30"),
        ("1_000", "1_000"),
        ("0b101", "0b101"),
        ("-0x1F", "-0x1F"),
        ("0o19", "0o19"),
        ("nULL", "nULL"),
        ("tRUE", "tRUE"),
        ("inf", "inf"),
        ("NaN", "NaN"),
        ("1.2.3", "1.2.3"),
        ("-x", "-x"),
        ("+", "+"),
        (".", "."),
        ("application/json", "application/json"),
    ],
)
def test_plain_scalars_follow_the_core_schema(scalar: str, expected: Any) -> None:
    value = load_text(f"v: {scalar}\n").data["v"]
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize("scalar", [".nan", ".NaN", ".NAN"])
def test_nan(scalar: str) -> None:
    value = load_text(f"v: {scalar}").data["v"]
    assert isinstance(value, float)
    assert math.isnan(value)


@pytest.mark.parametrize(
    ("scalar", "expected"),
    [('"01234"', "01234"), ("'true'", "true"), ('"~"', "~"), ("'1e3'", "1e3"), ('""', "")],
)
def test_quoted_scalars_are_strings(scalar: str, expected: str) -> None:
    assert load_text(f"v: {scalar}").data == {"v": expected}


def test_block_scalars_are_strings() -> None:
    data = load_text("a: |\n  123\n  line\nb: >-\n  true\n  folded\n").data
    assert data == {"a": "123\nline\n", "b": "true folded"}


def test_mapping_keys_are_always_the_scalar_text() -> None:
    data = load_text("200: ok\ntrue: t\n~: n\n1.5: f\n0o17: o\n'q': s\nnull: x\n").data
    assert data == {
        "200": "ok",
        "true": "t",
        "~": "n",
        "1.5": "f",
        "0o17": "o",
        "q": "s",
        "null": "x",
    }
    assert all(type(key) is str for key in data)


def test_key_order_is_kept() -> None:
    data = load_text("z: 1\na: 2\nm: 3\n").data
    assert list(data) == ["z", "a", "m"]


def test_the_design_example_loads() -> None:
    text = (
        "version: 1\n"
        "steps:\n"
        "  - id: contacts\n"
        "    request:\n"
        "      service: crm\n"
        "      headers: {X-Api-Version: 2022-11-28}\n"
        '      query: {limit: 100, zip: "01234"}\n'
        "    on_status:\n"
        "      - {status: 404, action: skip}\n"
        "      - {status: 4xx, action: fail}\n"
    )
    assert load_text(text).data == {
        "version": 1,
        "steps": [
            {
                "id": "contacts",
                "request": {
                    "service": "crm",
                    "headers": {"X-Api-Version": "2022-11-28"},
                    "query": {"limit": 100, "zip": "01234"},
                },
                "on_status": [
                    {"status": 404, "action": "skip"},
                    {"status": "4xx", "action": "fail"},
                ],
            }
        ],
    }


def test_a_root_that_is_not_a_mapping_is_returned_as_is() -> None:
    # Whether the root must be a mapping is the caller's rule (the flow schema says so).
    assert load_text("- 1\n- 2\n").data == [1, 2]
    assert load_text("just text").data == "just text"


def test_explicit_core_tags() -> None:
    text = "a: !!str 12\nb: !!int '12'\nc: !!float 3\nd: !!bool 'true'\ne: !!null ''\nf: ! 12\n"
    data = load_text(text).data
    assert data == {"a": "12", "b": 12, "c": 3.0, "d": True, "e": None, "f": "12"}
    assert type(data["c"]) is float
    assert load_text("a: !!map {b: !!seq [1]}").data == {"a": {"b": [1]}}


# --- marks -------------------------------------------------------------------------------

FLOW = """\
# a comment
version: 1
steps:
  - id: contacts
    request:
      method: GET
      query: {limit: 100, since: "{{ inputs.since }}"}
    on_status:
      - {status: 404, action: skip}
      -   status: 500
          action: fail
    tags: [a, 'b']
"""


def test_marks_are_the_key_positions_and_list_element_starts() -> None:
    marks = load_text(FLOW).marks
    assert marks[()] == (2, 1)
    assert marks[("version",)] == (2, 1)
    assert marks[("steps",)] == (3, 1)
    assert marks[("steps", 0)] == (4, 5)
    assert marks[("steps", 0, "id")] == (4, 5)
    assert marks[("steps", 0, "request")] == (5, 5)
    assert marks[("steps", 0, "request", "method")] == (6, 7)
    assert marks[("steps", 0, "request", "query")] == (7, 7)
    assert marks[("steps", 0, "request", "query", "limit")] == (7, 15)
    assert marks[("steps", 0, "request", "query", "since")] == (7, 27)
    assert marks[("steps", 0, "on_status", 0)] == (9, 9)
    assert marks[("steps", 0, "on_status", 0, "action")] == (9, 23)
    assert marks[("steps", 0, "on_status", 1)] == (10, 11)
    assert marks[("steps", 0, "on_status", 1, "action")] == (11, 11)
    assert marks[("steps", 0, "tags", 1)] == (12, 15)


def test_every_path_has_a_mark() -> None:
    doc = load_text(FLOW)

    def paths(value: Any, prefix: tuple[str | int, ...]) -> list[tuple[str | int, ...]]:
        out = [prefix]
        if isinstance(value, dict):
            for key, item in value.items():
                out += paths(item, (*prefix, key))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                out += paths(item, (*prefix, index))
        return out

    assert set(paths(doc.data, ())) == set(doc.marks)


def test_columns_count_characters_not_bytes() -> None:
    doc = load_text("é: {ü: 1, k: 2}\n")
    assert doc.marks[("é", "k")] == (1, 11)


def test_locate_falls_back_to_the_nearest_ancestor() -> None:
    doc = load_text(FLOW)
    assert doc.locate(("steps", 0, "request", "method")) == (6, 7)
    assert doc.locate(["steps", 0, "request", "url"]) == (5, 5)  # missing key: its parent
    assert doc.locate(("steps", 0, "request", "query", "x", "y")) == (7, 7)
    assert doc.locate(("nope",)) == (2, 1)
    assert doc.locate(()) == (2, 1)


def test_problem_is_located_and_formats_the_path() -> None:
    doc = load_text(FLOW, "flows/crm.yaml")
    problem = doc.problem(("steps", 0, "request", "method"), "'GTE' is not one of GET, POST")
    assert problem == Problem(
        "flows/crm.yaml", 6, 7, "steps[0].request.method", "'GTE' is not one of GET, POST"
    )
    assert str(problem) == (
        "flows/crm.yaml:6:7: steps[0].request.method: 'GTE' is not one of GET, POST"
    )
    warning = doc.problem(["outputs"], "no step emits it", severity="warning")
    assert (warning.line, warning.column, warning.path, warning.severity) == (
        2,
        1,
        "outputs",
        "warning",
    )
    assert str(FlowError([problem])) == str(problem)


def test_value_mark_is_where_the_text_of_the_value_begins() -> None:
    text = (
        "a: body.data[\n"  # 1 plain
        "b: 'x'\n"  # 2 single-quoted: after the quote
        'c:   "{{ y }}"\n'  # 3 double-quoted
        "d: !!str &anchor 'z'\n"  # 4 tag and anchor before the text
        "e: |\n"  # 5 block scalar: its first content line
        "\n"
        "     first\n"
        "f: {g: h, i: 'j'}\n"  # 8 flow mapping
        "k:\n"
        "  - plain\n"  # 10
        "  - 'quoted'\n"  # 11
        "l: *anchor\n"  # 12
    )
    doc = load_text(text)
    assert doc.value_mark(("a",)) == (1, 4)
    assert doc.value_mark(("b",)) == (2, 5)
    assert doc.value_mark(("c",)) == (3, 7)
    assert doc.value_mark(("d",)) == (4, 19)
    assert doc.value_mark(("e",)) == (7, 6)
    assert doc.value_mark(("f",)) == (8, 4)
    assert doc.value_mark(("f", "g")) == (8, 8)
    assert doc.value_mark(("f", "i")) == (8, 15)
    assert doc.value_mark(("k", 0)) == (10, 5)
    assert doc.value_mark(("k", 1)) == (11, 6)
    assert doc.value_mark(("l",)) == (12, 4)
    assert doc.value_mark(("missing",)) == (1, 1)  # falls back to locate


def test_document_is_frozen() -> None:
    doc = load_text("a: 1")
    assert isinstance(doc, Document)
    with pytest.raises(AttributeError):
        doc.file = "other"  # type: ignore[misc]


# --- duplicate keys, merge keys, several documents ----------------------------------------


def test_duplicate_key_is_reported_at_its_second_occurrence() -> None:
    text = "steps:\n  - request:\n      method: GET\n      path: /x\n      method: POST\n"
    problem = only_problem(text)
    assert str(problem) == (
        "f.yaml:5:7: steps[0].request.method: duplicate key 'method' (first at line 3)"
    )


def test_every_duplicate_is_reported() -> None:
    problems = problems_of("a: 1\nb: {x: 1, x: 2}\na: 3\n")
    assert [str(p) for p in problems] == [
        "f.yaml:2:11: b.x: duplicate key 'x' (first at line 2)",
        "f.yaml:3:1: a: duplicate key 'a' (first at line 1)",
    ]


def test_keys_that_differ_only_as_yaml_1_1_values_are_duplicates_as_text() -> None:
    # `1` and `01` are different keys: keys are their text.
    assert load_text("1: a\n01: b\n").data == {"1": "a", "01": "b"}
    assert (
        str(only_problem("'a': 1\na: 2\n")) == "f.yaml:2:1: a: duplicate key 'a' (first at line 1)"
    )


def test_merge_keys_are_refused() -> None:
    text = "base: &b {method: GET}\nstep:\n  <<: *b\n  path: /x\n"
    assert str(only_problem(text)) == "f.yaml:3:3: step: merge keys (<<) are not supported"


def test_a_quoted_merge_key_is_an_ordinary_key() -> None:
    assert load_text("'<<': 1").data == {"<<": 1}


def test_several_documents_are_refused() -> None:
    problem = only_problem("a: 1\n---\nb: 2\n")
    assert (problem.line, problem.column) == (2, 1)
    assert "several documents" in problem.message


def test_a_document_end_marker_is_fine() -> None:
    assert load_text("---\na: 1\n...\n").data == {"a": 1}


# --- anchors and aliases --------------------------------------------------------------------


def test_aliases_are_expanded_as_independent_copies() -> None:
    text = "defaults: &d\n  headers: {Accept: json}\na: *d\nb:\n  - *d\n"
    doc = load_text(text)
    assert doc.data["a"] == {"headers": {"Accept": "json"}}
    assert doc.data["b"] == [{"headers": {"Accept": "json"}}]
    doc.data["a"]["headers"]["Accept"] = "xml"
    assert doc.data["defaults"]["headers"]["Accept"] == "json"
    assert doc.data["b"][0]["headers"]["Accept"] == "json"
    # Paths inside an alias are located at the alias.
    assert doc.locate(("a", "headers", "Accept")) == (3, 1)
    assert doc.locate(("b", 0, "headers")) == (5, 5)


def test_an_alias_to_a_scalar_can_be_a_key() -> None:
    assert load_text("k: &name id\n*name : 1\n").data == {"k": "id", "id": 1}


def test_billion_laughs_is_refused_at_the_alias() -> None:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    start = time.perf_counter()
    problem = only_problem("\n".join(lines) + "\n")
    assert time.perf_counter() - start < 1.0
    # a=10 nodes, b=9*10+1, c=9*91+1=820, d=9*820+1=7381, e[0] copies d and passes 10,000.
    assert (problem.line, problem.column, problem.path) == (5, 8, "e[0]")
    assert problem.message.startswith("too many aliases")
    assert MAX_ALIAS_NODES == 10_000


def test_many_small_aliases_are_fine() -> None:
    text = "x: &x 1\nl: [" + ", ".join(["*x"] * 5000) + "]\n"
    assert load_text(text).data["l"] == [1] * 5000


def test_a_recursive_alias_is_refused() -> None:
    assert str(only_problem("a: &a [1, *a]\n")) == (
        "f.yaml:1:11: a[1]: alias '*a' refers to its own anchor"
    )


def test_an_undefined_alias_is_refused() -> None:
    assert str(only_problem("a: *nope\n")) == "f.yaml:1:4: a: undefined alias '*nope'"


# --- keys that are not scalars, tags ------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "column", "message"),
    [
        ("a: 1\n? [x, y]\n: 2\n", 2, 3, "a key must be a scalar, not a list"),
        ("{a: 1}: x\n", 1, 1, "a key must be a scalar, not a mapping"),
        ("k: &m {a: 1}\n*m : 2\n", 2, 1, "a key must be a scalar, not a mapping (alias)"),
    ],
)
def test_a_non_scalar_key_is_refused(text: str, line: int, column: int, message: str) -> None:
    problem = only_problem(text)
    assert (problem.line, problem.column, problem.message) == (line, column, message)


@pytest.mark.parametrize(
    ("text", "line", "column", "path", "message"),
    [
        ("a: !!python/object:x 1\n", 1, 4, "a", "tag !!python/object:x is not allowed"),
        ("a:\n  b: !!python/name:x ''\n", 2, 6, "a.b", "tag !!python/name:x is not allowed"),
        ("a: !custom\n  b: 1\n", 1, 4, "a", "tag !custom is not allowed on a mapping"),
        ("a: !custom [1]\n", 1, 4, "a", "tag !custom is not allowed on a list"),
        ("a: !!binary aGk=\n", 1, 4, "a", "tag !!binary is not allowed"),
        ("a: !!timestamp 2020-01-01\n", 1, 4, "a", "tag !!timestamp is not allowed"),
        ("a: !!set {x}\n", 1, 4, "a", "tag !!set is not allowed on a mapping"),
        ("a: !!omap [b: 1]\n", 1, 4, "a", "tag !!omap is not allowed on a list"),
        ("!custom k: 1\n", 1, 1, "", "tag !custom is not allowed"),
        ("%TAG !e! tag:e,1:\n---\na: !e!x 1\n", 3, 4, "a", "tag tag:e,1:x is not allowed"),
        ("a: !!int x1\n", 1, 4, "a", "'x1' is not a valid !!int"),
        ("a: !!bool yes\n", 1, 4, "a", "'yes' is not a valid !!bool"),
        ("a: !!null 0\n", 1, 4, "a", "'0' is not a valid !!null"),
        ("a: !!float abc\n", 1, 4, "a", "'abc' is not a valid !!float"),
    ],
)  # fmt: skip
def test_tags_beyond_the_core_schema_are_refused(
    text: str, line: int, column: int, path: str, message: str
) -> None:
    assert only_problem(text) == Problem("f.yaml", line, column, path, message)


# --- garbage in: always a located FlowError ---------------------------------------------


@pytest.mark.parametrize("text", ["", "\n\n", "   \n", "# only a comment\n", "---\n", b""])
def test_an_empty_file_is_refused(text: str | bytes) -> None:
    problem = only_problem(text)
    assert (problem.file, problem.line, problem.column) == ("f.yaml", 1, 1)
    assert problem.message.startswith("empty file")


def test_tab_indentation_is_refused_with_its_position() -> None:
    problem = only_problem("steps:\n  - id: a\n\trequest: {}\n")
    assert str(problem) == "f.yaml:3:1: found character '\\t' that cannot start any token"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a: b: c\n", "f.yaml:1:5: mapping values are not allowed here"),
        (
            'a: "unclosed\n',
            "f.yaml:2:1: found unexpected end of stream"
            " (while scanning a quoted scalar at line 1, column 4)",
        ),
        (
            "a: [1, 2\n",
            "f.yaml:2:1: expected ',' or ']', but got '<stream end>'"
            " (while parsing a flow sequence at line 1, column 4)",
        ),
        ("a: 1\n b: 2\n", "f.yaml:2:3: mapping values are not allowed here"),
        ("a: @x\n", "f.yaml:1:4: found character '@' that cannot start any token"),
    ],
)
def test_broken_yaml_is_a_located_flow_error(text: str, expected: str) -> None:
    assert str(only_problem(text)) == expected


def test_invalid_utf8_is_located() -> None:
    assert str(only_problem(b"a: 1\nb: caf\xc3\xa9 \xff\n")) == (
        "f.yaml:2:9: not UTF-8 text: invalid byte 0xff"
    )


def test_binary_is_refused() -> None:
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"
    assert str(only_problem(png)) == "f.yaml:1:1: not UTF-8 text: invalid byte 0x89"


def test_control_characters_are_located() -> None:
    assert str(only_problem("a: 1\nb: x\x00y\n")) == (
        "f.yaml:2:5: unacceptable character #x0000: special characters are not allowed"
    )


def test_byte_order_marks_are_accepted() -> None:
    assert load_text(b"\xef\xbb\xbfa: 1\n").data == {"a": 1}
    assert load_text("a: é\n".encode("utf-16")).data == {"a": "é"}
    # Positions after a BOM are those of the text.
    with pytest.raises(FlowError, match=r"^f\.yaml:1:4: not UTF-8"):
        load_text(b"\xef\xbb\xbfa: \xff", "f.yaml")


def test_deep_nesting_is_refused() -> None:
    problem = only_problem("x: " + "[" * 300 + "]" * 300 + "\n")
    assert (problem.line, problem.column) == (1, 203)  # the 200th level, the root included
    assert problem.message == "nested deeper than 200 levels"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.binary(max_size=60), st.text(alphabet="ab:-[]{}&*!|>'\"#\t\n ,?<~%@`", max_size=60)
    )
)
def test_garbage_never_escapes_as_a_traceback(text: str | bytes) -> None:
    try:
        doc = load_text(text, "g.yaml")
    except FlowError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert problem.file == "g.yaml"
            assert problem.line >= 1
            assert problem.column >= 1
        return
    assert () in doc.marks


# --- files --------------------------------------------------------------------------------


def test_load_document_reads_a_file_and_keeps_the_path_as_given(tmp_path: Path) -> None:
    flow = tmp_path / "flow.yaml"
    flow.write_text("version: 1\nname: x\nname: y\n", encoding="utf-8")
    with pytest.raises(FlowError) as info:
        load_document(flow)
    assert str(info.value) == f"{flow}:3:1: name: duplicate key 'name' (first at line 2)"
    flow.write_text("version: 1\n", encoding="utf-8")
    doc = load_document(str(flow))
    assert (doc.file, doc.data) == (str(flow), {"version": 1})


def test_an_unreadable_file_is_a_flow_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(FlowError) as info:
        load_document(missing)
    assert str(info.value).startswith(f"{missing}:1:1: cannot read the file: No such file")
    with pytest.raises(FlowError, match="cannot read the file"):
        load_document(tmp_path)


def test_load_data_file_reads_yaml_and_json(tmp_path: Path) -> None:
    yaml_file = tmp_path / "inputs.yaml"
    yaml_file.write_text("since: 2024-01-01\nids: [1, 2]\n", encoding="utf-8")
    assert load_data_file(str(yaml_file)) == {"since": "2024-01-01", "ids": [1, 2]}
    json_file = tmp_path / "inputs.json"
    payload = {"a": [1, 2.5, None, True], "b": {"c": "d"}, "e": "01234"}
    json_file.write_text(json.dumps(payload, indent="\t"), encoding="utf-8")
    assert load_data_file(str(json_file)) == payload


def test_load_data_file_errors_are_usage_errors(tmp_path: Path) -> None:
    bad = tmp_path / "services.yaml"
    bad.write_text("api:\n  base_url: x\n  base_url: y\n", encoding="utf-8")
    with pytest.raises(UsageError) as info:
        load_data_file(str(bad))
    assert str(info.value) == f"{bad}:3:3: api.base_url: duplicate key 'base_url' (first at line 2)"
    broken = tmp_path / "inputs.json"
    broken.write_text('{"a": 1,,}', encoding="utf-8")
    with pytest.raises(UsageError, match=rf"^{broken}:1:9: "):
        load_data_file(str(broken))
    with pytest.raises(UsageError, match="cannot read the file"):
        load_data_file(str(tmp_path / "nope.json"))


# --- speed --------------------------------------------------------------------------------


def test_loading_a_100_line_flow_takes_a_few_milliseconds() -> None:
    step = (
        "  - id: contacts{n}\n"
        "    request:\n"
        "      service: crm\n"
        "      path: /v2/contacts\n"
        '      query: {{updated_since: "{{{{ state.c.cursor }}}}", limit: 100}}\n'
        "    paginate: {{type: cursor, cursor: body.meta.next, param: cursor}}\n"
        "    records: body.data\n"
        "    filter: \"status != 'deleted'\"\n"
        '    fields: {{id: id, email: "emails[0].value", company_id: company.id}}\n'
        "    emit: contacts\n"
    )
    text = "version: 1\nname: speed\nsteps:\n" + "".join(step.format(n=n) for n in range(10))
    assert text.count("\n") >= 100
    load_text(text)
    runs = 50
    start = time.perf_counter()
    for _ in range(runs):
        load_text(text)
    per_load = (time.perf_counter() - start) / runs
    assert per_load < 0.005  # measured about 0.6 ms; 200 flows must validate in < 2 s


def test_lone_surrogates_are_located() -> None:
    assert str(only_problem("a: 1\nb: \ud800\n")) == (
        "f.yaml:2:4: unacceptable character #xd800: special characters are not allowed"
    )


def test_value_mark_of_a_tag_alone_on_its_line_is_the_node_start() -> None:
    doc = load_text("a: !!str\n  text\n")
    assert doc.data == {"a": "text"}
    assert doc.value_mark(("a",)) == (1, 4)


def test_aliases_cannot_nest_deeper_than_the_limit() -> None:
    deep = "[" * 150 + "]" * 150
    problem = only_problem(f"a: &d {deep}\nb: {'[' * 60}*d{']' * 60}\n")
    assert (problem.line, problem.column) == (2, 64)
    assert problem.message == "nested deeper than 200 levels"
    assert load_text(f"a: &d {deep}\nb: [*d]\n").data["b"][0] == load_text(f"x: {deep}").data["x"]
