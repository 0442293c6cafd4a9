"""Promises kept before the first request: every problem knowable before a request goes out
(an environment variable, a secret, an input, a `--services` file) is exit 2 with a
sentence naming it, in `run` and `--dry-run` alike, and no request is sent; validate's
hints, its closing line and its machine formats."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from aiohttp import web

from tests.conftest import Cli, Serve, ServerThread, WriteFlow, app_with, summary_of


async def ok(request: web.Request) -> web.Response:
    return web.json_response({"name": "x", "items": [1]})


@pytest.fixture
def server(serve: Serve) -> ServerThread:
    return serve(app_with(("GET", "/{tail:.*}", ok)))


def flow_reading_env(url: str, base_url: str = "{{ env.HTTPBIN_URL }}") -> str:
    # The first step goes to the server: a check made late would let it through.
    return f"""\
version: 1
services:
  httpbin: {{base_url: "{base_url}"}}
steps:
  - id: first
    request: {{url: "{url}/first"}}
  - id: second
    request: {{service: httpbin, path: /get}}
"""


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_a_missing_environment_variable_is_exit_2_naming_it_and_where(
    server: ServerThread, cli: Cli, write_flow: WriteFlow, tmp_path: Path, dry_run: bool
) -> None:
    write_flow(flow_reading_env(server.url))
    extra = ["--dry-run"] if dry_run else ["--summary", "s.json"]
    result = cli("run", "flow.yaml", *extra)
    assert result.code == 2, result.stderr
    assert (
        "environment variable HTTPBIN_URL is not set "
        "(read at flow.yaml:3:24: services.httpbin.base_url)"
    ) in result.stderr
    assert "dict object" not in result.stderr
    assert server.requests == []
    if not dry_run:
        assert summary_of(tmp_path)["error"]["kind"] == "usage"


def test_a_set_variable_or_a_default_lets_the_run_go(
    server: ServerThread, cli: Cli, write_flow: WriteFlow
) -> None:
    write_flow(flow_reading_env(server.url))
    assert cli("run", "flow.yaml", env={"HTTPBIN_URL": server.url}).code == 0
    write_flow(flow_reading_env(server.url, f"{{{{ env.NOPE | default('{server.url}') }}}}"))
    result = cli("run", "flow.yaml")
    assert result.code == 0, result.stderr
    assert server.paths() == ["/first", "/get", "/first", "/get"]


INPUTS_FLOW = """\
version: 1
inputs:
  type: object
  properties:
    color: {{type: string, default: red}}
    count: {{type: integer}}
{extra}steps:
  - id: first
    request: {{url: "{url}/items/{{{{ inputs.color }}}}"}}
"""


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_an_undeclared_input_is_exit_2_with_did_you_mean(
    server: ServerThread, cli: Cli, write_flow: WriteFlow, dry_run: bool
) -> None:
    write_flow(INPUTS_FLOW.format(url=server.url, extra=""))
    extra = ["--dry-run"] if dry_run else []
    result = cli("run", "flow.yaml", "--input", "colour=blue", *extra)
    assert result.code == 2
    assert "input 'colour' is not declared by the flow (did you mean 'color'?)" in result.stderr
    assert "the flow's inputs are: color, count" in result.stderr
    assert server.requests == []


def test_an_undeclared_input_from_a_file_is_refused_too(
    server: ServerThread, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    write_flow(INPUTS_FLOW.format(url=server.url, extra=""))
    (tmp_path / "inputs.json").write_text('{"colr": "blue"}')
    result = cli("run", "flow.yaml", "--inputs-file", "inputs.json")
    assert result.code == 2
    assert "input 'colr' is not declared by the flow (did you mean 'color'?)" in result.stderr
    assert server.requests == []


def test_additional_properties_welcome_other_inputs(
    server: ServerThread, cli: Cli, write_flow: WriteFlow
) -> None:
    write_flow(
        INPUTS_FLOW.format(url=server.url, extra="  additionalProperties: true\n").replace(
            "inputs.color", "inputs.colour"
        )
    )
    assert cli("validate", "flow.yaml").code == 0
    result = cli("run", "flow.yaml", "--input", "colour=blue")
    assert result.code == 0, result.stderr
    assert server.paths() == ["/items/blue"]


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_a_mistyped_input_is_exit_2(
    server: ServerThread, cli: Cli, write_flow: WriteFlow, dry_run: bool
) -> None:
    write_flow(INPUTS_FLOW.format(url=server.url, extra=""))
    extra = ["--dry-run"] if dry_run else []
    result = cli("run", "flow.yaml", "--input", "count=many", *extra)
    assert result.code == 2
    assert "--input count: cannot read 'many' as integer" in result.stderr
    assert server.requests == []


def test_a_missing_secret_is_exit_2_before_the_first_request(
    server: ServerThread, cli: Cli, write_flow: WriteFlow
) -> None:
    write_flow(
        f"""\
version: 1
steps:
  - id: first
    request: {{url: "{server.url}/first"}}
  - id: second
    request: {{url: "{server.url}/second", headers: {{X-Key: "{{{{ secrets.API_KEY }}}}"}}}}
"""
    )
    result = cli("run", "flow.yaml")
    assert result.code == 2
    assert "missing secret API_KEY" in result.stderr
    # The column depends on the server's port: the line and the key are what matter.
    assert re.search(
        r"secret API_KEY is read at flow.yaml:6:\d+: steps\[1\].request.headers.X-Key",
        result.stderr,
    )
    assert server.requests == []


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize(
    ("services", "expected"),
    [
        (None, "no such services file: 'services.yaml'"),
        ("httpbin: {base_url: 5}\n", "services.yaml:1:"),
        ("httpbin: [\n", "services.yaml:2:"),
    ],
    ids=["missing", "invalid", "not-yaml"],
)
def test_a_bad_services_file_is_exit_2(
    server: ServerThread,
    cli: Cli,
    write_flow: WriteFlow,
    tmp_path: Path,
    dry_run: bool,
    services: str | None,
    expected: str,
) -> None:
    write_flow(flow_reading_env(server.url))
    if services is not None:
        (tmp_path / "services.yaml").write_text(services)
    extra = ["--dry-run"] if dry_run else []
    result = cli("run", "flow.yaml", "--services", "services.yaml", *extra)
    assert result.code == 2
    assert expected in result.stderr
    assert server.requests == []


# -- validate -----------------------------------------------------------------------------


def test_validate_checks_inputs_against_the_declared_ones(cli: Cli, write_flow: WriteFlow) -> None:
    write_flow(INPUTS_FLOW.format(url="https://x.example", extra="").replace("color }}", "colr }}"))
    result = cli("validate", "flow.yaml")
    assert result.code == 2
    assert (
        "flow.yaml:9:21: steps[0].request.url: inputs.colr: the flow's inputs declare no "
        "'colr' (did you mean 'color'?)"
    ) in result.stderr


WRONG_NAMES = """\
version: 1
steps:
  - id: a
    request: {url: "https://x.example/{{ data.id }}"}
    expect:
      - that: "json.name == 'x'"
      - that: "resp.status == `200`"
      - that: "headers.content-type == 'application/json'"
    fields: {kind: "{{ headers.content-type }}", n: "{{ header.etag }}"}
    records: body
    emit: s
"""


def test_validate_hints_know_the_scope(cli: Cli, write_flow: WriteFlow) -> None:
    write_flow(WRONG_NAMES)
    lines = cli("validate", "flow.yaml").stderr.splitlines()
    text = "\n".join(lines)
    assert "unknown name 'json' in expression; the response body is 'body'" in text
    assert "did you mean 'reason'" not in text
    assert "unknown name 'data' in template; the response body is 'body'" in text
    assert "unknown name 'resp' in expression; the response is 'status', 'reason'," in text
    assert "unknown name 'header' in template; the response headers are 'headers'" in text
    assert """(a header name with '-' is written headers."content-type")""" in text
    assert "unknown name 'type' in template; a header name with '-' is written" in text


def test_validate_ends_with_a_closing_line(cli: Cli, write_flow: WriteFlow) -> None:
    write_flow("version: 1\nsteps:\n  - id: a\n    request: {url: 'https://x.example'}\n")
    result = cli("validate", "flow.yaml")
    assert (result.code, result.stderr) == (0, "checked 1 flow: 0 errors, 0 warnings\n")
    write_flow(
        "version: 1\nsteps:\n  - id: a\n    request: {url: 'https://x.example'}\n"
        "outputs:\n  s: {}\n",
        "b.yaml",
    )
    write_flow("version: 1\nsteps: []\n", "c.yaml")
    result = cli("validate", ".")
    assert result.code == 2
    assert result.stderr.splitlines()[-1] == "checked 3 flows: 1 error, 1 warning"
    result = cli("validate", ".", "--format", "json")
    assert result.stderr == "checked 3 flows: 1 error, 1 warning\n"
    assert len(json.loads(result.stdout)) == 2


BROKEN_EXPRESSION = """\
version: 1
steps:
  - id: a
    request: {url: "https://x.example"}
    when: "status == "
"""


def test_json_and_github_give_the_expression_and_offset_as_fields(
    cli: Cli, write_flow: WriteFlow
) -> None:
    write_flow(BROKEN_EXPRESSION)
    text = cli("validate", "flow.yaml").stderr
    assert "\n" + " " * 60 in text  # the text format draws its caret under the expression
    [problem] = json.loads(cli("validate", "flow.yaml", "--format", "json").stdout)
    assert problem == {
        "file": "flow.yaml",
        "line": 5,
        "column": 12,
        "path": "steps[0].when",
        "message": "JMESPath: unexpected end of expression: status == ",
        "severity": "error",
        "expression": "status == ",
        "offset": 10,
    }
    github = cli("validate", "flow.yaml", "--format", "github").stdout
    assert github == (
        "::error file=flow.yaml,line=5,col=12::steps[0].when: "
        "JMESPath: unexpected end of expression: status == \n"
    )
    assert "%0A" not in github
