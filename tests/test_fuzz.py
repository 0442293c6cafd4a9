"""Hypothesis fuzzing of the loader, the validator, the model and the decoders: whatever the
input, nothing but the project's own errors may escape."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner.compiler import build_flow
from runner.decode import FORMATS, DecodeOptions, decode_body, decode_lenient
from runner.errors import RunnerError
from runner.loader import load_text
from runner.schema import _fast_check, _flow_validator
from runner.validate import validate_document

ROOT = Path(__file__).resolve().parent.parent
FLOW_TEXTS = sorted((ROOT / "flows").glob("*.yaml"))
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_flow_text(text: str | bytes) -> None:
    """Load, validate and (when valid) compile; only RunnerError may come out."""
    try:
        doc = load_text(text, "fuzz.yaml")
    except RunnerError:
        return
    problems = validate_document(doc)
    for problem in problems:
        assert problem.file == "fuzz.yaml"
        assert problem.line >= 1 and problem.column >= 1
        assert problem.message
    if any(p.severity == "error" for p in problems):
        return
    with contextlib.suppress(RunnerError):
        build_flow(doc)


@FUZZ
@given(st.text(max_size=400))
def test_arbitrary_text(text: str) -> None:
    check_flow_text(text)


@FUZZ
@given(st.binary(max_size=400))
def test_arbitrary_bytes(data: bytes) -> None:
    check_flow_text(data)


YAML_PIECES = st.sampled_from(
    [
        "\n",
        ": ",
        "- ",
        "  ",
        "{",
        "}",
        "[",
        "]",
        ",",
        "&a ",
        "*a",
        "!!python/object:os.system ",
        "!!binary ",
        "<<: *a",
        "---\n",
        "...\n",
        "'",
        '"',
        "{{ ",
        " }}",
        "{% ",
        "#",
        "|\n",
        ">-\n",
        "\t",
        "\x00",
        "\ufeff",
        "? ",
        "%YAML 1.1\n",
        "~",
        "0o17",
        "1e400",
        ".nan",
        "2024-01-01",
        "steps:",
        "request:",
        "paginate:",
        "on_status:",
        "status: 5xx",
        "action: goto",
    ]
)


@st.composite
def mutated_flow(draw: st.DrawFn) -> str:
    text = draw(st.sampled_from(FLOW_TEXTS)).read_text(encoding="utf-8")
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["insert", "delete", "swap-lines", "dup-line"]))
        at = draw(st.integers(0, len(text)))
        if kind == "insert":
            piece = draw(st.one_of(YAML_PIECES, st.text(max_size=8)))
            text = text[:at] + piece + text[at:]
        elif kind == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 30)) :]
        else:
            lines = text.split("\n")
            i = draw(st.integers(0, len(lines) - 1))
            j = draw(st.integers(0, len(lines) - 1))
            if kind == "swap-lines":
                lines[i], lines[j] = lines[j], lines[i]
            else:
                lines.insert(j, lines[i])
            text = "\n".join(lines)
    return text


@FUZZ
@given(mutated_flow())
def test_mutated_flow_text(text: str) -> None:
    check_flow_text(text)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.sampled_from(["{{ x", "{{ steps.nope.records }}", "body.data[", "5xx", "GET", "@"]),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for key, sub in value.items():
            out += _paths(sub, (*prefix, key))
    elif isinstance(value, list):
        for i, sub in enumerate(value):
            out += _paths(sub, (*prefix, i))
    return out


@st.composite
def mutated_flow_data(draw: st.DrawFn) -> str:
    """A valid flow with one node (any depth) replaced by an arbitrary value."""
    path = draw(st.sampled_from(FLOW_TEXTS))
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    target = draw(st.sampled_from(_paths(data)[1:]))
    node = data
    for part in target[:-1]:
        node = node[part]
    node[target[-1]] = draw(JSON_VALUES)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


@FUZZ
@given(mutated_flow_data())
def test_mutated_flow_structure(text: str) -> None:
    check_flow_text(text)


@FUZZ
@given(mutated_flow_data())
def test_fast_schema_check_agrees_with_jsonschema(text: str) -> None:
    """jsonschema-rs says "valid" exactly when jsonschema finds no problem: a valid flow is
    then never checked by jsonschema, and an invalid one always gets its worded problems."""
    fast = _fast_check("flow")
    if fast is None:
        pytest.skip("jsonschema-rs is not installed")
    try:
        data = load_text(text, "fuzz.yaml").data
    except RunnerError:
        return
    if isinstance(data, dict):
        assert fast(data) == (next(_flow_validator().iter_errors(data), None) is None)


@pytest.mark.parametrize("flow", FLOW_TEXTS, ids=[p.name for p in FLOW_TEXTS])
def test_the_example_flows_are_valid(flow: Path) -> None:
    # The seeds of the mutations above must themselves be valid flows.
    doc = load_text(flow.read_text(encoding="utf-8"), str(flow))
    assert [p for p in validate_document(doc) if p.severity == "error"] == []
    build_flow(doc)


CONTENT_TYPES = st.sampled_from(
    [
        None,
        "application/json",
        "application/json; charset=latin-1",
        "application/json; charset=nope",
        "application/x-ndjson",
        "text/csv; charset=utf-16",
        "application/xml",
        "application/atom+xml",
        "text/plain; charset=utf-8",
        "text/html",
        "",
        ";;;",
    ]
)
BODIES = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.sampled_from(
        [
            b'{"a": [1, 2, {"b": null}]}',
            b"[" * 100000,
            b'{"a": 1e999999}',
            b"NaN",
            b'"\\ud800"',
            b'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY e "x">]><a>&e;</a>',
            b"<a><b>1</b><b>2</b></a>",
            b"<a xmlns:x='urn:x'><x:b x:c='1'/></a>",
            b"a,b\n1,2,3\n",
            b'a,b\n"1\n',
            b"\xff\xfe\x00a",
            b'{"a":1}\n{"b":\n',
        ]
    ),
)


@FUZZ
@given(BODIES, CONTENT_TYPES, st.sampled_from(FORMATS))
def test_decoders_raise_only_decode_errors(body: bytes, content_type: str | None, fmt: str) -> None:
    options = DecodeOptions(format=fmt, max_body_bytes=200_000, xml_force_list=("b",))
    try:
        value = decode_body(body, content_type, options)
    except RunnerError as exc:
        assert str(exc)
    else:
        json.dumps(value)  # a decoded body is plain JSON data
    with contextlib.suppress(RunnerError):
        decode_lenient(body, content_type, options)
