"""Logs for machines and people: `--log-format json` writes one object a line with the run's
fields; a rule's `message` on skip and stop is logged at info, and skips and stops are
counted in the summary; counts read in the right number."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.conftest import Cli, Serve, WriteFlow, app_with, summary_of

RUN_ID = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{6}")

RULES_FLOW = """\
version: 1
name: rules
services:
  api: {base_url: "{{ env.API }}"}
steps:
  - id: users
    for_each: "`[1, 2, 3, 4]`"
    request: {service: api, path: "/users/{{ item }}"}
    on_status:
      - {status: 404, action: skip, message: "user {{ item }} is gone"}
      - {status: 410, action: skip}
    records: body
    emit: users
  - id: pages
    request: {service: api, path: /pages}
    paginate: {type: page_number}
    on_status:
      - {status: 409, action: stop, message: "export still running at page {{ page.number }}"}
    records: body.rows
    emit: rows
outputs:
  users: {}
  rows: {}
"""


def _rules_app() -> web.Application:
    async def user(request: web.Request) -> web.Response:
        number = int(request.match_info["id"])
        if number == 2:
            return web.json_response({"error": "not found"}, status=404)
        if number == 4:
            return web.json_response({"error": "gone"}, status=410)
        return web.json_response({"id": number})

    async def pages(request: web.Request) -> web.Response:
        page = int(request.query["page"])
        if page == 3:
            return web.json_response({"error": "busy"}, status=409)
        return web.json_response({"rows": [{"page": page}]})

    return app_with(("GET", "/users/{id}", user), ("GET", "/pages", pages))


def _json_lines(stderr: str) -> list[dict[str, Any]]:
    lines = [line for line in stderr.splitlines() if line.strip()]
    parsed = [json.loads(line) for line in lines]  # every line is one whole object
    assert all(isinstance(p, dict) for p in parsed)
    return parsed


def test_skip_and_stop_messages_are_logged_and_counted(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    server = serve(_rules_app())
    write_flow(RULES_FLOW)
    result = cli("run", "flow.yaml", "--summary", "s.json", env={"API": server.url})
    assert result.code == 0, result.stderr
    assert "runner: INFO: step users (item 1): skip after 404: user 2 is gone\n" in result.stderr
    assert (
        "runner: INFO: step pages: stop after 409: export still running at page 3\n"
        in result.stderr
    )
    # A rule without a message is counted, not shown (-v shows it).
    assert "item 3" not in result.stderr
    summary = summary_of(tmp_path)
    assert summary["skipped"] == {"users": 2}
    assert summary["stopped"] == {"pages": 1}
    assert summary["records"] == {"users": 2, "rows": 2}

    verbose = cli("run", "flow.yaml", "-v", env={"API": server.url})
    assert verbose.code == 0, verbose.stderr
    assert (
        "runner: DEBUG: step users (item 3): skip after 410 (steps[0].on_status[1])\n"
        in verbose.stderr
    )


def test_json_logs_carry_the_fields_one_object_a_line(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    server = serve(_rules_app())
    write_flow(RULES_FLOW)
    result = cli("run", "flow.yaml", "--log-format", "json", env={"API": server.url})
    assert result.code == 0, result.stderr
    lines = _json_lines(result.stderr)
    assert all(RUN_ID.fullmatch(line["run_id"]) and line["flow"] == "rules" for line in lines)
    assert len({line["run_id"] for line in lines}) == 1
    skip = next(line for line in lines if "user 2 is gone" in line["message"])
    assert skip["level"] == "info"
    assert skip["step"] == "users" and skip["item_index"] == 1
    assert skip["method"] == "GET" and skip["status"] == 404
    assert skip["url"] == f"{server.url}/users/2"
    stop = next(line for line in lines if "export still running" in line["message"])
    assert stop["step"] == "pages" and "item_index" not in stop and stop["status"] == 409
    done = {
        line["step"]: line
        for line in lines
        if line["message"].startswith("step ") and " from " in line["message"]
    }
    assert re.fullmatch(
        r"step users: 2 records from 4 responses in \d+\.\d s", done["users"]["message"]
    )
    assert done["users"]["records"] == 2 and isinstance(done["users"]["duration_ms"], int)
    assert done["pages"]["records"] == 2 and "3 responses" in done["pages"]["message"]
    closing = lines[-1]
    assert "succeeded: 4 records in 2 streams" in closing["message"]
    assert "step" not in closing  # the run's line, not its last step's
    assert closing["records"] == 4
    assert closing["streams"] == {"users": 2, "rows": 2}
    assert closing["requests"] == 7
    assert isinstance(closing["duration_ms"], int)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", closing["time"])


def test_a_failure_in_json_is_one_object_with_its_place_in_fields(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    async def item(request: web.Request) -> web.Response:
        if request.match_info["id"] == "2":
            return web.json_response({"error": "bad id", "key": "s3cr3t-value"}, status=400)
        return web.json_response({"id": 1})

    server = serve(app_with(("GET", "/items/{id}", item)))
    write_flow(
        """\
version: 1
name: failing
services:
  api: {base_url: "{{ env.API }}"}
steps:
  - id: items
    for_each: "`[1, 2]`"
    request: {service: api, path: "/items/{{ item }}", query: {key: "{{ secrets.KEY }}"}}
    records: body
    emit: items
outputs:
  items: {}
"""
    )
    result = cli(
        "run", "flow.yaml", "--log-format", "json", env={"API": server.url, "KEY": "s3cr3t-value"}
    )
    assert result.code == 1, result.stderr
    assert "s3cr3t-value" not in result.stderr
    lines = _json_lines(result.stderr)
    error = lines[-1]
    assert error["level"] == "error"
    assert error["step"] == "items" and error["item_index"] == 1
    assert error["method"] == "GET" and error["status"] == 400
    assert error["url"] == f"{server.url}/items/2?key=***"
    assert error["error"] == "http"
    assert error["message"] == (
        f"run failed in step 'items' (item 1): GET {server.url}/items/2?key=*** -> 400 Bad "
        "Request: status 400 is not 2xx and no on_status rule matched it"
    )
    assert error["body"].startswith('{"error": "bad id"')
    assert error["flow"] == "failing" and RUN_ID.fullmatch(error["run_id"])


def test_one_record_in_one_stream_reads_in_the_singular(
    serve: Serve, cli: Cli, write_flow: WriteFlow
) -> None:
    async def one(request: web.Request) -> web.Response:
        return web.json_response([{"id": 1}])

    server = serve(app_with(("GET", "/one", one)))
    write_flow(
        """\
version: 1
name: one
services:
  api: {base_url: "{{ env.API }}"}
steps:
  - {id: one, request: {service: api, path: /one}, records: body, emit: one}
outputs:
  one: {}
"""
    )
    result = cli("run", "flow.yaml", env={"API": server.url})
    assert result.code == 0, result.stderr
    assert re.search(r"succeeded: 1 record in 1 stream to out, 1 request\n", result.stderr)


# -- every attempt with -v ----------------------------------------------------------------------

RETRY_FLOW = """\
version: 1
name: retries
services:
  api:
    base_url: "{{ env.API }}"
    retry: {max_attempts: 4, initial_delay: 0.05, max_delay: 0.1}
steps:
  - id: flaky
    request: {service: api, path: /flaky, query: {token: "{{ secrets.TOKEN }}"}}
    records: body
    emit: rows
outputs:
  rows: {}
"""

ATTEMPT = re.compile(
    r"runner: DEBUG: GET (?P<url>\S+) -> (?P<outcome>[^\n]+?) in (?P<ms>\d+) ms "
    r"\(api, attempt (?P<n>\d) of 4\)(?P<then>[^\n]*)\n"
)


def _flaky_app(failures: int) -> web.Application:
    calls = {"n": 0}

    async def flaky(request: web.Request) -> web.Response:
        calls["n"] += 1
        if calls["n"] <= failures:
            return web.json_response({"error": "busy"}, status=503)
        return web.json_response([{"id": 1}])

    return app_with(("GET", "/flaky", flaky))


def test_verbose_logs_every_attempt_with_its_outcome_and_delay(
    serve: Serve, cli: Cli, write_flow: WriteFlow
) -> None:
    server = serve(_flaky_app(failures=2))
    write_flow(RETRY_FLOW)
    env = {"API": server.url, "TOKEN": "t0ps3cret"}
    result = cli("run", "flow.yaml", "-v", env=env)
    assert result.code == 0, result.stderr
    assert "t0ps3cret" not in result.stderr
    attempts = [m.groupdict() for m in ATTEMPT.finditer(result.stderr)]
    assert [a["n"] for a in attempts] == ["1", "2", "3"], result.stderr
    assert {a["url"] for a in attempts} == {f"{server.url}/flaky?token=***"}
    assert [a["outcome"] for a in attempts] == [
        "503 Service Unavailable",
        "503 Service Unavailable",
        "200 OK",
    ]
    for first in attempts[:2]:
        delay = re.fullmatch(r"; retrying in (\d\.\d\d) s", first["then"])
        assert delay is not None and 0 <= float(delay.group(1)) <= 0.1
    assert attempts[2]["then"] == ""

    # The same attempts in JSON, with their fields.
    result = cli("run", "flow.yaml", "-v", "--log-format", "json", env=env)
    assert result.code == 0, result.stderr
    lines = [line for line in _json_lines(result.stderr) if line.get("attempt") is not None]
    # A fresh server each run would reset the count: this one now answers 200 at once.
    assert [(line["attempt"], line["status"]) for line in lines] == [(1, 200)]
    line = lines[0]
    assert line["method"] == "GET" and line["url"] == f"{server.url}/flaky?token=***"
    assert line["step"] == "flaky" and line["flow"] == "retries"
    assert isinstance(line["duration_ms"], int) and "delay_s" not in line


def test_json_attempt_lines_carry_the_delay(serve: Serve, cli: Cli, write_flow: WriteFlow) -> None:
    server = serve(_flaky_app(failures=1))
    write_flow(RETRY_FLOW)
    env = {"API": server.url, "TOKEN": "x"}
    result = cli("run", "flow.yaml", "-v", "--log-format", "json", env=env)
    assert result.code == 0, result.stderr
    lines = [line for line in _json_lines(result.stderr) if line.get("attempt") is not None]
    assert [(line["attempt"], line["status"]) for line in lines] == [(1, 503), (2, 200)]
    assert 0 <= lines[0]["delay_s"] <= 0.1
    assert "retrying in" in lines[0]["message"]


def test_verbose_logs_transport_failures_until_no_attempts_are_left(
    cli: Cli, write_flow: WriteFlow
) -> None:
    from tests.conftest import free_port

    write_flow(RETRY_FLOW)
    result = cli(
        "run", "flow.yaml", "-v", env={"API": f"http://127.0.0.1:{free_port()}", "TOKEN": "x"}
    )
    assert result.code == 69, result.stderr
    attempts = [m.groupdict() for m in ATTEMPT.finditer(result.stderr)]
    assert [a["n"] for a in attempts] == ["1", "2", "3", "4"], result.stderr
    assert all(a["outcome"].startswith("cannot connect") for a in attempts)
    assert [a["then"].startswith("; retrying in") for a in attempts] == [True, True, True, False]
    assert attempts[3]["then"] == "; no attempts left"


# -- User-Agent ---------------------------------------------------------------------------------


def test_requests_say_runner_and_its_version_unless_the_flow_says_otherwise(
    serve: Serve, cli: Cli, write_flow: WriteFlow
) -> None:
    import runner

    seen: dict[str, list[str]] = {}

    async def echo(request: web.Request) -> web.Response:
        seen.setdefault(request.path, []).extend(request.headers.getall("User-Agent", []))
        return web.json_response({"access_token": "tok", "expires_in": 3600, "rows": []})

    server = serve(app_with(("*", "/{tail:.*}", echo)))
    write_flow(
        """\
version: 1
name: agents
services:
  plain: {base_url: "{{ env.API }}"}
  named:
    base_url: "{{ env.API }}"
    headers: {user-agent: "acme-sync/2.0 (ops@acme.example)"}
  oauth:
    base_url: "{{ env.API }}"
    auth:
      type: oauth2_client_credentials
      token_url: "{{ env.API }}/token"
      client_id: id
      client_secret: "{{ secrets.SECRET }}"
steps:
  - {id: plain, request: {service: plain, path: /plain}}
  - {id: named, request: {service: named, path: /named}}
  - {id: step, request: {service: plain, path: /step, headers: {User-Agent: "step/1"}}}
  - {id: oauth, request: {service: oauth, path: /oauth}}
"""
    )
    result = cli("run", "flow.yaml", env={"API": server.url, "SECRET": "s"})
    assert result.code == 0, result.stderr
    default = f"runner/{runner.__version__}"
    assert seen == {
        "/plain": [default],
        "/named": ["acme-sync/2.0 (ops@acme.example)"],
        "/step": ["step/1"],
        "/token": [default],
        "/oauth": [default],
    }


def test_a_problem_found_before_the_run_is_a_json_line_too(cli: Cli, write_flow: WriteFlow) -> None:
    write_flow(
        """\
version: 1
name: bad
inputs: {type: object, properties: {n: {type: integer}}}
steps:
  - {id: a, request: {url: "http://127.0.0.1:1/x"}}
"""
    )
    result = cli("run", "flow.yaml", "--input", "n=many", "--log-format", "json")
    assert result.code == 2
    (line,) = _json_lines(result.stderr)
    assert line["level"] == "error" and line["error"] == "usage"
    assert "--input n: cannot read 'many' as integer" in line["message"]
