"""The one compile pass: schema and semantic problems of a flow in one run, sorted, each
once; warnings from the same walk; each template and expression compiled once."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import runner.compiler
from runner.compiler import compile_document
from runner.errors import FlowError
from runner.loader import load_text
from runner.run import load_flow
from tests.conftest import CliResult

ROOT = Path(__file__).resolve().parent.parent

THREE_MISTAKES = """\
version: 1
services:
  api: {base_url: "https://api.example.com"}
steps:
  - id: users
    request: {service: apl, path: /users}
    when: "status == "
    recods: body
    emit: users
"""


def test_validate_shows_schema_and_semantic_problems_in_one_run(
    cli: Callable[..., CliResult], write_flow: Callable[..., Path]
) -> None:
    write_flow(THREE_MISTAKES)
    result = cli("validate", "flow.yaml")
    assert result.code == 2
    lines = result.stderr.splitlines()
    problems = [line for line in lines if line.startswith("flow.yaml:")]
    # Sorted by position: the unknown service (line 6), the expression (7), the key (8).
    assert [p.split(": ", 2)[:2] for p in problems] == [
        ["flow.yaml:6:15", "steps[0].request.service"],
        ["flow.yaml:7:12", "steps[0].when"],
        ["flow.yaml:8:5", "steps[0].recods"],
    ]
    assert "unknown service 'apl' (did you mean 'api'?)" in problems[0]
    assert "unknown key 'recods' (did you mean 'records'?)" in problems[2]
    assert len(problems) == len(set(problems))


def test_run_refuses_the_flow_with_all_its_problems_before_any_request(
    cli: Callable[..., CliResult], write_flow: Callable[..., Path]
) -> None:
    write_flow(THREE_MISTAKES)
    result = cli("run", "flow.yaml")
    assert result.code == 2
    assert "unknown service 'apl'" in result.stderr
    assert "steps[0].when" in result.stderr
    assert "unknown key 'recods'" in result.stderr


def test_load_flow_raises_every_error_of_both_kinds(tmp_path: Path) -> None:
    flow = tmp_path / "flow.yaml"
    flow.write_text(THREE_MISTAKES)
    with pytest.raises(FlowError) as caught:
        load_flow(flow)
    assert [p.path for p in caught.value.problems] == [
        "steps[0].request.service",
        "steps[0].when",
        "steps[0].recods",
    ]


def test_warnings_come_from_the_same_pass_as_the_errors() -> None:
    doc = load_text(
        "version: 1\nsteps:\n  - id: a\n    request: {url: 'https://x.example/'}\n"
        "    retry: {max_attempts: many}\noutputs:\n  users: {}\n",
        "f.yaml",
    )
    compiled = compile_document(doc)
    assert compiled.flow is None
    assert [(p.severity, p.path) for p in compiled.problems] == [
        ("error", "steps[0].retry.max_attempts"),
        ("warning", "outputs.users"),
    ]


def test_a_flow_with_only_warnings_compiles() -> None:
    doc = load_text(
        "version: 1\nsteps:\n  - id: a\n    request: {url: 'https://x.example/'}\n"
        "outputs:\n  users: {}\n",
        "f.yaml",
    )
    compiled = compile_document(doc)
    assert compiled.flow is not None
    assert [p.message for p in compiled.warnings] == ["no step emits the stream 'users'"]


EVERY_PLACE = """\
version: 1
services:
  api:
    base_url: "{{ env.API_URL }}"
    headers: {X-Team: "{{ inputs.team }}"}
steps:
  - id: list
    request:
      service: api
      path: "/users/{{ inputs.group }}"
      query: {since: "{{ state.users.cursor }}"}
    when: "inputs.enabled"
    expect:
      - {that: "status == `200`", message: "got {{ status }}"}
    on_status:
      - {status: 404, action: skip, message: "no group {{ inputs.group | upper }}"}
    records: body.users
    filter: "active"
    fields: {id: id, who: "{{ record.name }}"}
    set: {first: "body.users[0].id"}
    emit: users
outputs:
  users: {}
"""


def test_each_template_and_expression_is_compiled_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    templates: Counter[tuple[str, str]] = Counter()
    expressions: Counter[str] = Counter()
    compile_template = runner.compiler.compile_template
    compile_expression = runner.compiler.compile_expression

    def count_template(source: str, mode: Any = "value", autoescape: bool = False) -> Any:
        templates[(source, mode)] += 1
        return compile_template(source, mode, autoescape)

    def count_expression(source: str) -> Any:
        expressions[source] += 1
        return compile_expression(source)

    monkeypatch.setattr(runner.compiler, "compile_template", count_template)
    monkeypatch.setattr(runner.compiler, "compile_expression", count_expression)
    flow = tmp_path / "flow.yaml"
    flow.write_text(EVERY_PLACE)
    assert load_flow(flow).steps
    assert expressions == dict.fromkeys(
        ["inputs.enabled", "status == `200`", "body.users", "active", "id", "body.users[0].id"],
        1,
    )
    # Each template once, in the mode it renders in (not once more to be checked).
    assert templates == {
        ("{{ env.API_URL }}", "value"): 1,
        ("{{ inputs.team }}", "value"): 1,
        ("/users/{{ inputs.group }}", "path"): 1,
        ("{{ state.users.cursor }}", "value"): 1,
        ("got {{ status }}", "text"): 1,
        ("no group {{ inputs.group | upper }}", "text"): 1,
        ("{{ record.name }}", "value"): 1,
    }


def test_an_unknown_csv_encoding_is_a_located_problem() -> None:
    doc = load_text(
        "version: 1\nsteps:\n  - id: a\n    request: {url: 'https://x.example/'}\n"
        "    response: {format: csv, csv: {encoding: klingon}}\n",
        "f.yaml",
    )
    assert [str(p) for p in compile_document(doc).problems] == [
        "f.yaml:5:5: steps[0].response: unknown csv encoding 'klingon'"
    ]
