"""Schema validation as users see it: exact messages for broken flows, output formats, and
how flow files are found in folders."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from runner.errors import FlowError, Problem, UsageError
from runner.loader import load_document, load_text
from runner.schema import _fast_check, _flow_validator
from runner.validate import (
    apply_services_override,
    find_flow_files,
    format_problems,
    schema_problems,
    validate_document,
    validate_paths,
)

CASES = Path(__file__).resolve().parent / "cases" / "invalid"
CASE_NAMES = sorted(p.stem for p in CASES.glob("*.yaml"))

GOOD_FLOW = """\
version: 1
services:
  api: {base_url: "https://api.example.com"}
steps:
  - id: users
    request: {service: api, path: /users}
    records: body
    emit: users
"""


def test_there_are_enough_cases() -> None:
    assert len(CASE_NAMES) >= 15
    assert sorted(p.stem for p in CASES.glob("*.expected")) == CASE_NAMES


@pytest.mark.parametrize("name", CASE_NAMES)
def test_invalid_flow(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each broken flow gives exactly the lines of its `.expected` file."""
    monkeypatch.chdir(CASES)
    expected = (CASES / f"{name}.expected").read_text("utf-8").splitlines()
    problems = validate_paths([f"{name}.yaml"])
    assert format_problems(problems, "text").splitlines() == expected
    assert any(p.severity == "error" for p in problems)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_fast_check_and_jsonschema_agree_on_every_case(name: str) -> None:
    fast = _fast_check("flow")
    if fast is None:
        pytest.skip("jsonschema-rs is not installed")
    try:
        data = load_document(str(CASES / f"{name}.yaml")).data
    except FlowError:
        return  # refused by the loader, before any schema
    if isinstance(data, dict):
        assert fast(data) == (next(_flow_validator().iter_errors(data), None) is None)


def test_a_fast_check_that_fails_leaves_the_verdict_to_jsonschema(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import runner.schema

    def broken(data: object) -> bool:
        raise OverflowError("cannot convert")

    monkeypatch.setattr(runner.schema, "_fast_check", lambda which: broken)
    assert schema_problems(load_text(GOOD_FLOW, "good.yaml")) == []
    bad = GOOD_FLOW.replace("records: body", "recrods: body")
    assert [p.message for p in schema_problems(load_text(bad, "bad.yaml"))] == [
        "unknown key 'recrods' (did you mean 'records'?)"
    ]


def test_a_valid_flow_is_loaded_without_importing_jsonschema(tmp_path: Path) -> None:
    if _fast_check("flow") is None:
        pytest.skip("jsonschema-rs is not installed")
    flow = tmp_path / "good.yaml"
    flow.write_text(GOOD_FLOW)
    probe = f"""
import sys, runner
runner.load_flow({str(flow)!r})
print("jsonschema" in sys.modules)
try:
    runner.load_flow({str(CASES / "misspelt_key.yaml")!r})
except runner.FlowError as exc:
    print("jsonschema" in sys.modules, exc.problems[0].message)
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert lines[0] == "False"  # ~30 ms of start-up saved
    assert lines[1].startswith("True unknown key")  # imported to word the problem


def test_valid_flow_has_no_problems(tmp_path: Path) -> None:
    flow = tmp_path / "good.yaml"
    flow.write_text(GOOD_FLOW)
    assert validate_paths([str(flow)]) == []


def test_load_errors_become_problems(tmp_path: Path) -> None:
    flow = tmp_path / "broken.yaml"
    flow.write_text("version: 1\nsteps: [\n")
    problems = validate_paths([str(flow)])
    assert len(problems) == 1
    assert problems[0].file == str(flow)
    assert problems[0].severity == "error"


def test_problems_of_several_files_are_sorted(tmp_path: Path) -> None:
    (tmp_path / "b.yaml").write_text("version: 1\nsteps: []\n")
    (tmp_path / "a.yaml").write_text("version: 2\nsteps:\n  - id: x\n")
    lines = format_problems(validate_paths([str(tmp_path)]), "text").splitlines()
    assert lines == [
        f"{tmp_path}/a.yaml:1:1: version: this runner reads flow format version 1 (got 2)",
        f"{tmp_path}/a.yaml:3:5: steps[0]: a step needs 'request', or 'for_each' with 'steps'",
        f"{tmp_path}/b.yaml:2:1: steps: expected a non-empty list",
    ]


def test_misspelt_required_key_is_reported_once() -> None:
    """`requst` is reported as a misspelling, not also as a missing `request`."""
    doc = load_text(
        "version: 1\nsteps:\n  - id: a\n    requst: {service: api, path: /}\n", "f.yaml"
    )
    assert [str(p) for p in schema_problems(doc)] == [
        "f.yaml:4:5: steps[0].requst: unknown key 'requst' (did you mean 'request'?)"
    ]


def test_a_flow_without_steps_has_that_one_problem() -> None:
    doc = load_text(GOOD_FLOW, "f.yaml")
    assert validate_document(doc) == []
    broken = load_text("version: 1\n", "f.yaml")
    assert [p.message for p in validate_document(broken)] == ["missing required key 'steps'"]


# --------------------------------------------------------------------------- --services


def test_services_file_is_validated_with_its_own_locations(tmp_path: Path) -> None:
    (tmp_path / "flow.yaml").write_text(GOOD_FLOW)
    overrides = tmp_path / "prod.yaml"
    overrides.write_text(
        "api:\n  base_url: https://prod.example.com\n  timout: {read: 5}\n"
        "  retry: {max_attempts: 0}\napi2:\n  base_url: https://x.example.com\n"
    )
    problems = validate_paths([str(tmp_path / "flow.yaml")], services_file=str(overrides))
    assert [str(p) for p in problems] == [
        f"{overrides}:3:3: api.timout: unknown key 'timout' (did you mean 'timeout'?)",
        f"{overrides}:4:11: api.retry.max_attempts: expected at least 1, got 0",
        f"{overrides}:5:1: api2: warning: service 'api2' is not declared by any flow validated"
        " (did you mean 'api'?)",
    ]
    assert [p.severity for p in problems] == ["error", "error", "warning"]


def test_services_file_must_be_a_mapping(tmp_path: Path) -> None:
    (tmp_path / "flow.yaml").write_text(GOOD_FLOW)
    overrides = tmp_path / "prod.yaml"
    overrides.write_text("- api\n")
    problems = validate_paths([str(tmp_path / "flow.yaml")], services_file=str(overrides))
    assert [p.message for p in problems] == [
        "a services file is a mapping of service names to service keys (base_url, auth, ...)"
    ]


def test_missing_services_file_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "flow.yaml").write_text(GOOD_FLOW)
    with pytest.raises(UsageError, match="no such services file"):
        validate_paths([str(tmp_path / "flow.yaml")], services_file=str(tmp_path / "nope.yaml"))


def test_apply_services_override_replaces_whole_keys(tmp_path: Path) -> None:
    flow = tmp_path / "flow.yaml"
    flow.write_text(
        "version: 1\nservices:\n  api:\n    base_url: https://dev.example.com\n"
        "    timeout: {connect: 1, read: 2}\n    headers: {A: b}\n"
        "steps:\n  - id: s\n    request: {service: api, path: /}\n"
    )
    overrides = tmp_path / "prod.yaml"
    overrides.write_text(
        "api: {base_url: https://prod.example.com, timeout: {read: 9}}\nother: {}\n"
    )
    doc = apply_services_override(load_document(str(flow)), str(overrides))
    assert doc.data["services"] == {
        "api": {
            "base_url": "https://prod.example.com",
            "timeout": {"read": 9},  # the whole key is replaced, not merged
            "headers": {"A": "b"},
        }
    }
    assert doc.file == str(flow)
    assert doc.data["steps"] == [{"id": "s", "request": {"service": "api", "path": "/"}}]


def test_apply_invalid_services_override_raises_located_problems(tmp_path: Path) -> None:
    flow = tmp_path / "flow.yaml"
    flow.write_text(GOOD_FLOW)
    overrides = tmp_path / "prod.yaml"
    overrides.write_text("api:\n  base_url: 5\n")
    with pytest.raises(FlowError) as caught:
        apply_services_override(load_document(str(flow)), str(overrides))
    assert [str(p) for p in caught.value.problems] == [
        f"{overrides}:2:3: api.base_url: expected a string, got integer 5"
    ]


# --------------------------------------------------------------------------- formats

PROBLEMS = [
    Problem("flows/a.yaml", 3, 7, "steps[0].request.method", "'GTE' is not one of GET, POST"),
    Problem("flows/a,b:c.yaml", 1, 1, "", "100% broken\r\nreally", "warning"),
]


def test_format_text() -> None:
    assert format_problems(PROBLEMS, "text").split("\n") == [
        "flows/a.yaml:3:7: steps[0].request.method: 'GTE' is not one of GET, POST",
        "flows/a,b:c.yaml:1:1: warning: 100% broken\r",
        # Continuation lines stay under the message (a JMESPath caret keeps its column).
        " " * len("flows/a,b:c.yaml:1:1: warning: ") + "really",
    ]
    assert format_problems([], "text") == ""


def test_format_json() -> None:
    assert json.loads(format_problems(PROBLEMS, "json")) == [
        {
            "file": "flows/a.yaml",
            "line": 3,
            "column": 7,
            "path": "steps[0].request.method",
            "message": "'GTE' is not one of GET, POST",
            "severity": "error",
        },
        {
            "file": "flows/a,b:c.yaml",
            "line": 1,
            "column": 1,
            "path": "",
            "message": "100% broken\r\nreally",
            "severity": "warning",
        },
    ]
    assert json.loads(format_problems([], "json")) == []


def test_format_github_escapes() -> None:
    assert format_problems(PROBLEMS, "github").split("\n") == [
        "::error file=flows/a.yaml,line=3,col=7::steps[0].request.method: 'GTE' is not one of"
        " GET, POST",
        "::warning file=flows/a%2Cb%3Ac.yaml,line=1,col=1::100%25 broken%0D%0Areally",
    ]


def test_unknown_format_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="unknown format 'xml'"):
        format_problems(PROBLEMS, "xml")


# --------------------------------------------------------------------------- finding files


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """flows/ with flows at two depths, a non-flow YAML, a draft and a hidden folder."""
    monkeypatch.chdir(tmp_path)
    files = {
        "flows/crm.yaml": GOOD_FLOW,
        "flows/billing/invoices.yml": GOOD_FLOW,
        "flows/billing/drafts/wip.yaml": GOOD_FLOW,
        "flows/quoted.yaml": '"steps":\n  - id: a\n',
        "flows/config.yaml": "settings:\n  steps: 3\n",  # nested `steps`: not a flow
        "flows/readme.md": "steps:\n",
        "flows/.hidden/x.yaml": GOOD_FLOW,
        "empty/notes.yaml": "a: 1\n",
    }
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_find_recurses_and_skips_non_flows(tree: Path) -> None:
    assert find_flow_files(["flows"]) == [
        "flows/crm.yaml",
        "flows/quoted.yaml",
        "flows/billing/invoices.yml",
        "flows/billing/drafts/wip.yaml",
    ]


def test_find_keeps_files_as_given(tree: Path) -> None:
    # A file named explicitly is validated even if it does not look like a flow.
    assert find_flow_files(["flows/config.yaml", "flows/crm.yaml", "flows/config.yaml"]) == [
        "flows/config.yaml",
        "flows/crm.yaml",
    ]


@pytest.mark.parametrize(
    ("glob", "expected"),
    [
        ("drafts", ["flows/crm.yaml", "flows/quoted.yaml", "flows/billing/invoices.yml"]),
        ("*.yml", ["flows/crm.yaml", "flows/quoted.yaml", "flows/billing/drafts/wip.yaml"]),
        ("flows/billing/*", ["flows/crm.yaml", "flows/quoted.yaml"]),
        ("crm.yaml", ["flows/quoted.yaml", "flows/billing/invoices.yml",
                      "flows/billing/drafts/wip.yaml"]),
    ],
)  # fmt: skip
def test_find_excludes_by_path_or_name(tree: Path, glob: str, expected: list[str]) -> None:
    assert find_flow_files(["flows"], exclude=[glob]) == expected


def test_find_missing_path_is_a_usage_error(tree: Path) -> None:
    with pytest.raises(UsageError, match="no such file or folder: 'nope'"):
        find_flow_files(["flows", "nope"])


def test_find_folder_without_flows_is_a_usage_error(tree: Path) -> None:
    with pytest.raises(UsageError, match="no flow files in folder 'empty'"):
        find_flow_files(["flows", "empty"])
    with pytest.raises(UsageError, match=r"no flow files in folder 'flows' \(after --exclude\)"):
        find_flow_files(["flows"], exclude=["*"])


def test_validate_paths_on_a_folder(tree: Path) -> None:
    problems = validate_paths(["flows"])
    assert [str(p) for p in problems] == [
        "flows/quoted.yaml:1:1: missing required key 'version'",
        "flows/quoted.yaml:2:5: steps[0]: a step needs 'request', or 'for_each' with 'steps'",
    ]


# About 60 lines, like a real flow: services with auth and limits, pagination, rules, a block.
SIXTY_LINE_FLOW = """\
version: 1
name: crm-contacts
description: Contacts changed since the last run, with their company.
inputs:
  type: object
  properties:
    since: {type: string, default: "2024-01-01T00:00:00Z"}
services:
  crm:
    base_url: "{{ env.CRM_URL }}"
    auth: {type: oauth2_client_credentials, token_url: "https://id.example.com/token",
           client_id: abc, client_secret: "{{ secrets.CS }}", scope: contacts.read}
    headers: {Accept: application/json}
    timeout: {connect: 5, read: 30, total: 120}
    retry: {max_attempts: 5, initial_delay: 0.5, max_delay: 30}
    rate_limit: {requests: 20, per_seconds: 1}
    max_concurrency: 8
steps:
  - id: contacts
    request:
      service: crm
      path: /v2/contacts
      query: {updated_since: "{{ state.contacts.cursor or inputs.since }}", limit: 100}
    paginate: {type: cursor, cursor: body.meta.next, param: cursor, max_pages: 100}
    on_status:
      - {status: 429, action: retry, delay: 5}
      - {status: "5xx", action: fail, kind: unavailable, message: "crm is down"}
    records: body.data
    filter: "status != 'deleted'"
    fields: {id: id, email: "emails[0].value", company_id: company.id, updated_at: updated_at}
    emit: contacts
  - id: companies
    for_each: "steps.contacts.records[].company_id"
    concurrency: 4
    request: {service: crm, path: "/v2/companies/{{ item }}"}
    on_status:
      - {status: 404, action: skip}
    records: body
    fields: {id: id, name: name, position: "{{ item_index }}"}
    emit: companies
  - id: sync
    for_each: steps.companies.records
    steps:
      - id: create
        request: {service: crm, method: POST, path: /v2/links, json: "{{ item }}"}
        retry_unsafe: true
        on_status:
          - {status: 409, action: goto, goto: update, set: {id: body.existing_id}}
          - {status: 2xx, action: end}
        records: body
        fields: {id: id, op: "'created'"}
        emit: links
      - id: update
        request: {service: crm, method: PUT, path: "/v2/links/{{ steps.create.vars.id }}"}
        records: body
        emit: links
outputs:
  contacts:
    primary_key: [id]
    cursor: {field: updated_at, type: datetime}
    schema: {type: object, required: [id, email]}
"""


def test_two_hundred_flows_in_a_folder_are_found_and_validated(tmp_path: Path) -> None:
    """200 flows of about 60 lines (their timing is measured by `make bench`, start-up)."""
    assert 55 <= len(SIXTY_LINE_FLOW.splitlines()) <= 65
    for index in range(200):
        (tmp_path / f"flow{index:03}.yaml").write_text(SIXTY_LINE_FLOW)
    (tmp_path / "flow007.yaml").write_text(SIXTY_LINE_FLOW.replace("method: PUT", "method: PTU"))
    assert len(find_flow_files([str(tmp_path)])) == 200
    problems = validate_paths([str(tmp_path)])
    assert [p.file.rsplit("/", 1)[-1] for p in problems] == ["flow007.yaml"]
