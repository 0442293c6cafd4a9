"""`runner run --record` and `runner test`, end to end: the real CLI, real local servers,
recordings replayed with the servers stopped."""

from __future__ import annotations

import base64
import json
import shutil
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote
from xml.etree import ElementTree

from aiohttp import web
from conftest import ROOT, Cli, CliResult, Serve, app_with, read_jsonl, run_cli

from runner.redact import Redactor

TOKEN = "tok-canary-9f3"

SHOP_FLOW = """\
version: 1
name: shop
services:
  api:
    base_url: "{{ env.API_URL }}"
    auth: {type: bearer, token: "{{ secrets.API_TOKEN }}"}
steps:
  - id: items
    request:
      service: api
      path: /items
      query: {limit: 2, since: "{{ state.items.cursor or '2024-01-01T00:00:00Z' }}"}
    paginate: {type: cursor, cursor: body.next, param: cursor}
    records: body.data
    emit: items
  - id: details
    for_each: "steps.items.records[].id"
    concurrency: 4
    request: {service: api, path: "/items/{{ item }}"}
    on_status:
      - {status: 404, action: skip}
    records: body
    fields: {id: id, price: price, position: "{{ item_index }}"}
    emit: details
outputs:
  items: {cursor: {field: updated_at, type: datetime}}
"""

ITEMS = [
    {"id": i, "updated_at": f"2024-03-0{i}T10:00:00Z", "name": f"item {i}"} for i in range(1, 6)
]


def shop_app() -> web.Application:
    async def items(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"error": "unauthorized"}, status=401)
        start = int(request.query.get("cursor", "0"))
        limit = int(request.query["limit"])
        page = ITEMS[start : start + limit]
        following = start + limit if start + limit < len(ITEMS) else None
        return web.json_response({"data": page, "next": following and str(following)})

    async def detail(request: web.Request) -> web.Response:
        item = int(request.match_info["id"])
        if item == 3:
            return web.json_response({"error": "gone"}, status=404)
        return web.json_response({"id": item, "price": item * 10, "secret_echo": TOKEN})

    return app_with(("GET", "/items", items), ("GET", "/items/{id}", detail))


def a_test_file(flow: str, cases: str) -> str:
    return f"version: 1\nflow: {flow}\ncases:\n{cases}"


def json_report(result: CliResult) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads(result.stdout)
    return data


def record_shop(serve: Serve, cli: Cli, tmp_path: Path) -> str:
    (tmp_path / "shop.yaml").write_text(SHOP_FLOW)
    server = serve(shop_app())
    result = cli(
        "run", "shop.yaml", "--record", "shop.har", "--state", "state.json",
        "--output-dir", "out", env={"API_URL": server.url, "API_TOKEN": TOKEN},
    )  # fmt: skip
    assert result.code == 0, result.stderr
    server.stop()
    return server.url


def shop_case(url: str, extra: str = "") -> str:
    return (
        "  - name: all items and their details\n"
        "    recording: shop.har\n"
        f"    env: {{API_URL: '{url}'}}\n"
        "    secrets: {API_TOKEN: other-token}\n"
        "    expect:\n"
        "      outputs: {items: out/items.jsonl, details: out/details.jsonl}\n"
        "      state: {streams: {items: {cursor: '2024-03-05T10:00:00Z'}}}\n"
        "      summary: {requests: 8, status_counts: {'200': 7, '404': 1}}\n" + extra
    )


def test_recorded_run_replays_with_the_server_stopped(
    serve: Serve, cli: Cli, tmp_path: Path
) -> None:
    url = record_shop(serve, cli, tmp_path)
    har = json.loads((tmp_path / "shop.har").read_text())
    log = har["log"]
    assert log["version"] == "1.2" and log["creator"]["name"] == "runner"
    assert len(log["entries"]) == 8
    for entry in log["entries"]:
        assert {"startedDateTime", "time", "request", "response", "timings"} <= set(entry)
        assert {"method", "url", "httpVersion", "headers", "queryString"} <= set(entry["request"])
        assert {"status", "statusText", "headers", "content"} <= set(entry["response"])
        assert {"mimeType", "text"} <= set(entry["response"]["content"])
    assert [e["request"]["url"].removeprefix(url) for e in log["entries"][:3]] == [
        "/items?limit=2&since=2024-01-01T00:00:00Z",
        "/items?limit=2&since=2024-01-01T00:00:00Z&cursor=2",
        "/items?limit=2&since=2024-01-01T00:00:00Z&cursor=4",
    ]
    assert TOKEN not in (tmp_path / "shop.har").read_text()

    (tmp_path / "shop.test.yaml").write_text(a_test_file("shop.yaml", shop_case(url)))
    result = cli("test", "shop.test.yaml")
    assert result.code == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        "PASS all items and their details (shop.test.yaml:4)",
        "1 passed, 0 failed",
    ]
    assert read_jsonl(tmp_path / "out/details.jsonl") == [
        {"id": 1, "price": 10, "position": 0},
        {"id": 2, "price": 20, "position": 1},
        {"id": 4, "price": 40, "position": 3},
        {"id": 5, "price": 50, "position": 4},
    ]


def test_an_edited_flow_fails_with_a_readable_difference(
    serve: Serve, cli: Cli, tmp_path: Path
) -> None:
    url = record_shop(serve, cli, tmp_path)
    (tmp_path / "shop.test.yaml").write_text(a_test_file("shop.yaml", shop_case(url)))
    (tmp_path / "shop.yaml").write_text(SHOP_FLOW.replace("limit: 2", "limit: 3"))
    result = cli("test", "shop.test.yaml")
    assert result.code == 1
    lines = result.stdout.splitlines()
    assert lines[0] == "FAIL all items and their details (shop.test.yaml:4)"
    assert lines[1] == (
        f"    step 'items': no recorded entry matches GET {url}/items?limit=3"
        "&since=2024-01-01T00:00:00Z"
    )
    assert lines[2:4] == [
        "      nearest: entry #0; differences:",
        '        query limit: recorded "2", sent "3"',
    ]
    assert lines[-1] == "0 passed, 1 failed"


BODY_FLOW = """\
version: 1
name: create
services:
  api: {base_url: "{{ env.API_URL }}"}
steps:
  - id: create
    request:
      {service: api, method: POST, path: /customers, json: {name: Ada, plan: PLAN, tags: [a, b]}}
    records: body
    emit: created
"""


def test_a_changed_json_body_names_the_path_that_differs(
    serve: Serve, cli: Cli, tmp_path: Path
) -> None:
    async def create(request: web.Request) -> web.Response:
        return web.json_response({"id": 7, **(await request.json())}, status=201)

    server = serve(app_with(("POST", "/customers", create)))
    (tmp_path / "create.yaml").write_text(BODY_FLOW.replace("PLAN", "pro"))
    result = cli("run", "create.yaml", "--record", "create.har", env={"API_URL": server.url})
    assert result.code == 0, result.stderr
    server.stop()
    case = (
        "  - name: creates one customer\n    recording: create.har\n"
        f"    env: {{API_URL: '{server.url}'}}\n"
        "    expect: {outputs: {created: [{id: 7, name: Ada, plan: pro, tags: [a, b]}]}}\n"
    )
    (tmp_path / "create.test.yaml").write_text(a_test_file("create.yaml", case))
    assert cli("test", "create.test.yaml").code == 0
    (tmp_path / "create.yaml").write_text(BODY_FLOW.replace("PLAN", "free"))
    result = cli("test", "create.test.yaml", "--format", "json")
    assert result.code == 1
    [report] = json_report(result)
    assert report["status"] == "fail" and report["line"] == 4
    assert report["differences"] == [
        f"step 'create': no recorded entry matches POST {server.url}/customers",
        "  nearest: entry #0; differences:",
        '    body plan: recorded "pro", sent "free"',
    ]


def har(*entries: dict[str, Any]) -> str:
    return json.dumps(
        {"log": {"version": "1.2", "creator": {"name": "hand"}, "entries": list(entries)}}
    )


def entry(
    method: str,
    url: str,
    status: int = 200,
    body: Any = None,
    *,
    headers: dict[str, str] | None = None,
    error: str | None = None,
    started: str = "2024-05-01T12:00:00.000Z",
) -> dict[str, Any]:
    text = json.dumps(body) if body is not None else ""
    raw: dict[str, Any] = {
        "startedDateTime": started,
        "time": 1,
        "request": {"method": method, "url": url, "headers": [], "queryString": []},
        "response": {
            "status": 0 if error else status,
            "statusText": "",
            "headers": [{"name": k, "value": v} for k, v in (headers or {}).items()]
            + ([{"name": "Content-Type", "value": "application/json"}] if body is not None else []),
            "content": {"mimeType": "application/json", "text": text},
        },
        "timings": {"send": 0, "wait": 1, "receive": 0},
    }
    if error:
        raw["_error"] = error
    return raw


FAULT_FLOW = """\
version: 1
name: faults
services:
  api:
    base_url: https://api.example
    retry: {max_attempts: 4, initial_delay: 1, max_delay: 1}
    timeout: {read: 7}
steps:
  - id: report
    request: {service: api, path: /report}
    records: body
    fields: {id: id, at: "{{ now() }}"}
    emit: reports
  - id: quota
    request: {service: api, path: /quota}
    on_status:
      - {status: 202, action: retry, delay: 45}
      - {status: 404, action: skip}
    records: body
    emit: quota
"""


def test_fault_entries_drive_retries_and_rules_on_virtual_time(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "faults.yaml").write_text(FAULT_FLOW)
    (tmp_path / "faults.har").write_text(
        har(
            entry("GET", "https://api.example/report", error="timeout"),
            entry("GET", "https://api.example/report", error="reset"),
            entry(
                "GET", "https://api.example/report", 503, {"e": 1}, headers={"Retry-After": "20"}
            ),
            entry("GET", "https://api.example/report", 200, {"id": 1}),
            entry("GET", "https://api.example/quota", 202, {"e": "not yet"}),
            entry("GET", "https://api.example/quota", 404, {"e": "none"}),
        )
    )
    case = (
        "  - name: a timeout, a reset and a 503 retried, then a retry rule and a 404 skip\n"
        "    recording: faults.har\n"
        "    now: '2024-05-01T12:00:00Z'\n"
        "    expect:\n"
        # timeout (7 s read) + backoff <= 1 s + backoff <= 1 s + Retry-After 20 s: between 27 and 29
        "      summary: {requests: 6, retries: 4, skipped: {quota: 1}, records: {reports: 1}}\n"
    )
    (tmp_path / "faults.test.yaml").write_text(a_test_file("faults.yaml", case))
    result = cli("test", "faults.test.yaml", "--format", "json")
    assert result.code == 0, result.stdout + result.stderr
    [report] = json_report(result)
    assert report["status"] == "pass"
    assert 27 + 45 <= report["virtual_s"] <= 29 + 45
    assert report["wall_s"] < 2


POLL_FLOW = """\
version: 1
name: poll
services:
  api: {base_url: https://api.example}
steps:
  - id: start
    request: {service: api, path: /jobs/1}
    poll: {until: "body.state == 'done'", interval: 30, timeout: 600}
    records: body
    fields: {state: state, started: "{{ run.started_at }}", finished: "{{ now() }}"}
    emit: jobs
"""


def test_polling_every_30_s_takes_no_wall_time(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "poll.yaml").write_text(POLL_FLOW)
    pending = [entry("GET", "https://api.example/jobs/1", 200, {"state": "pending"})] * 9
    done = entry("GET", "https://api.example/jobs/1", 200, {"state": "done"})
    (tmp_path / "poll.har").write_text(har(*pending, done))
    case = (
        "  - name: ten polls\n    recording: poll.har\n    now: '2024-05-01T12:00:00Z'\n"
        "    expect:\n"
        "      outputs: {jobs: [{state: done, finished: '2024-05-01T12:04:30Z'}]}\n"
    )
    (tmp_path / "poll.test.yaml").write_text(a_test_file("poll.yaml", case))
    began = time.monotonic()
    result = cli("test", "poll.test.yaml", "--format", "json")
    wall = time.monotonic() - began
    # The expected record lacks `started`: a failure shows what the run emitted.
    assert result.code == 1
    [report] = json_report(result)
    assert report["differences"] == [
        'outputs.jobs[0].started: expected (absent), got "2024-05-01T12:00:00Z"'
    ]
    assert report["virtual_s"] == 270
    assert report["wall_s"] < 1
    assert wall < 20  # the whole CLI, start-up included, on a busy machine


def test_junit_report_counts_files_cases_failures_and_errors(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "poll.yaml").write_text(POLL_FLOW)
    done = entry("GET", "https://api.example/jobs/1", 200, {"state": "done"})
    (tmp_path / "poll.har").write_text(har(done))
    passing = "  - name: done at once\n    recording: poll.har\n"
    failing = (
        "  - name: wrong count\n    recording: poll.har\n    expect: {summary: {requests: 2}}\n"
    )
    (tmp_path / "a.test.yaml").write_text(a_test_file("poll.yaml", passing + failing))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub/b.test.yaml").write_text(
        a_test_file("../poll.yaml", "  - name: typo\n    recordng: ../poll.har\n")
    )
    result = cli("test", "--junit", "report.xml")
    assert result.code == 2  # an invalid test file beats a failed case
    assert "sub/b.test.yaml:5:5: cases[0].recordng: unknown key 'recordng'" in result.stdout
    root = ElementTree.parse(tmp_path / "report.xml").getroot()
    assert root.tag == "testsuites"
    assert (root.get("tests"), root.get("failures"), root.get("errors")) == ("3", "1", "1")
    suites = {s.get("name"): s for s in root.iter("testsuite")}
    assert set(suites) == {"./a.test.yaml", "./sub/b.test.yaml"}
    a_cases = suites["./a.test.yaml"].findall("testcase")
    assert [c.get("name") for c in a_cases] == ["done at once", "wrong count"]
    assert a_cases[0].find("failure") is None
    failure = a_cases[1].find("failure")
    assert failure is not None and failure.text == "summary.requests: expected 2, got 1"
    assert suites["./sub/b.test.yaml"].find("testcase/error") is not None


def test_update_rewrites_snapshots_and_keeps_the_rest_of_the_file(
    serve: Serve, cli: Cli, tmp_path: Path
) -> None:
    url = record_shop(serve, cli, tmp_path)
    case = (
        "  - name: all items  # the whole catalogue\n"
        "    recording: shop.har\n"
        f"    env: {{API_URL: '{url}'}}\n"
        "    expect:\n"
        "      outputs:\n"
        "        items: snapshots/items.jsonl\n"
        "        details:\n"
        "          - {id: 1, price: 999}   # out of date\n"
        "      # the cursor after the run\n"
        "      state: {streams: {items: {cursor: old}}}\n"
        "      summary: {requests: 1}\n"
    )
    text = a_test_file("shop.yaml", case)
    (tmp_path / "shop.test.yaml").write_text(text)
    assert cli("test", "shop.test.yaml").code == 2  # the snapshot file is missing
    result = cli("test", "shop.test.yaml", "--update")
    assert result.code == 1, result.stdout  # summary is never updated: requests is 8
    assert result.stdout.splitlines()[1:] == [
        "    summary.requests: expected 1, got 8",
        "    updated outputs.items: snapshots/items.jsonl (none -> 5 records)",
        "    updated outputs.details: inline (1 -> 4 records)",
        "    updated state: inline",
        "0 passed, 1 failed",
    ]
    assert read_jsonl(tmp_path / "snapshots/items.jsonl") == read_jsonl(
        tmp_path / "out/items.jsonl"
    )
    details = json.dumps(read_jsonl(tmp_path / "out/details.jsonl"), separators=(", ", ": "))
    expected_text = text.replace(
        "\n          - {id: 1, price: 999}", " " + details
    ).replace("{streams: {items: {cursor: old}}}",
              '{"streams": {"items": {"cursor": "2024-03-05T10:00:00Z"}}}')  # fmt: skip
    assert (tmp_path / "shop.test.yaml").read_text() == expected_text
    (tmp_path / "shop.test.yaml").write_text(expected_text.replace("requests: 1", "requests: 8"))
    result = cli("test", "shop.test.yaml", "--update")
    assert result.code == 0 and "updated" not in result.stdout, result.stdout
    assert cli("test", "shop.test.yaml").code == 0


CONCURRENT_FLOW = """\
version: 1
name: fan
services:
  api:
    base_url: https://api.example
    retry: {max_attempts: 3, initial_delay: 1, max_delay: 8}
steps:
  - id: each
    for_each: inputs.ids
    concurrency: 8
    request: {service: api, path: "/things/{{ item }}", headers: {X-Request-Id: "{{ uuid4() }}"}}
    records: body
    fields: {id: id, at: "{{ now() }}", request_id: "{{ uuid4() }}", run: "{{ run.id }}"}
    emit: things
"""


def test_concurrency_under_replay_is_deterministic(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "fan.yaml").write_text(CONCURRENT_FLOW)
    entries = []
    for i in range(8):  # recorded in an order the items will not be sent in
        url = f"https://api.example/things/{7 - i}"
        if i % 2:
            entries.append(entry("GET", url, 503, {"e": 1}))
        entries.append(entry("GET", url, 200, {"id": 7 - i}))
    (tmp_path / "fan.har").write_text(har(*entries))
    case = (
        "  - name: eight at once, half retried\n    recording: fan.har\n"
        "    inputs: {ids: [0, 1, 2, 3, 4, 5, 6, 7]}\n    now: '2024-05-01T12:00:00Z'\n"
        "    expect: {summary: {requests: 12, retries: 4}}\n"
    )
    (tmp_path / "fan.test.yaml").write_text(a_test_file("fan.yaml", case))
    reports = []
    for _ in range(3):
        result = cli("test", "fan.test.yaml", "--format", "json", "--update")
        assert result.code == 0, result.stdout
        report = json_report(result)[0]
        reports.append((report["virtual_s"], report["differences"]))
        # The emitted records, captured through an inline snapshot added for the purpose.
    assert reports[0] == reports[1] == reports[2]
    assert reports[0][0] <= 1  # the four backoffs overlap: at most one virtual second
    text = (
        (tmp_path / "fan.test.yaml")
        .read_text()
        .replace(
            "    expect: {summary: {requests: 12, retries: 4}}\n",
            "    expect:\n      summary: {requests: 12, retries: 4}\n      outputs: {things: []}\n",
        )
    )
    (tmp_path / "fan.test.yaml").write_text(text)
    snapshots = []
    for _ in range(3):
        assert cli("test", "fan.test.yaml", "--update").code == 0
        snapshots.append((tmp_path / "fan.test.yaml").read_text())
        (tmp_path / "fan.test.yaml").write_text(text)
    assert snapshots[0] == snapshots[1] == snapshots[2]
    records = json.loads(snapshots[0].split("outputs: {things: ")[1].split("}\n")[0])
    # Input order kept; uuid4() and run.id derived from the case, the same on every run.
    assert [r["id"] for r in records] == list(range(8))
    assert len({r["request_id"] for r in records}) == 8
    assert len({r["run"] for r in records}) == 1


def test_a_failed_run_still_writes_its_recording(serve: Serve, cli: Cli, tmp_path: Path) -> None:
    calls = 0

    async def down(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        return web.json_response({"error": "down"}, status=503)

    server = serve(app_with(("GET", "/items", down)))
    flow = SHOP_FLOW.replace(
        "auth: {type: bearer",
        "retry: {max_attempts: 3, initial_delay: 0.01}\n    auth: {type: bearer",
    )
    (tmp_path / "shop.yaml").write_text(flow)
    env = {"API_URL": server.url, "API_TOKEN": TOKEN}
    result = cli("run", "shop.yaml", "--record", "failed.har", env=env)
    assert result.code == 69
    entries = json.loads((tmp_path / "failed.har").read_text())["log"]["entries"]
    assert [e["response"]["status"] for e in entries] == [503, 503, 503] and calls == 3
    assert not (tmp_path / "failed.har.partial").exists()
    # Bad inputs after the flow loaded: a recording with no entries.
    result = cli("run", "shop.yaml", "--record", "none.har", "--input", "x", env=env)
    assert result.code == 2
    assert json.loads((tmp_path / "none.har").read_text())["log"]["entries"] == []
    # A flow that does not load: no recording.
    result = cli("run", "missing.yaml", "--record", "never.har", env=env)
    assert result.code == 2 and not (tmp_path / "never.har").exists()


def test_an_invalid_test_file_is_exit_2_with_its_place(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "poll.yaml").write_text(POLL_FLOW)
    (tmp_path / "x.test.yaml").write_text(
        "version: 1\nflow: poll.yaml\ncases:\n  - name: a\n    recording: gone.har\n"
        "    match: {ignore_quey: [ts]}\n"
    )
    result = cli("test", "x.test.yaml", "--format", "github")
    assert result.code == 2
    assert result.stdout.splitlines()[0] == (
        "::error file=x.test.yaml,line=4::a: x.test.yaml:6:13: cases[0].match.ignore_quey: "
        "unknown key 'ignore_quey' (did you mean 'ignore_query'?)"
    )


def test_a_broken_example_flow_fails_runner_test(tmp_path: Path) -> None:
    flows = tmp_path / "flows"
    shutil.copytree(ROOT / "flows", flows)
    assert run_cli("test", "flows", cwd=tmp_path).code == 0
    contacts = flows / "contacts.yaml"
    contacts.write_text(contacts.read_text().replace("limit: 100", "limit: 99", 1))
    result = run_cli("test", "flows", cwd=tmp_path)
    assert result.code == 1
    assert "FAIL" in result.stdout and 'query limit: recorded "100", sent "99"' in result.stdout
    makefile = (ROOT / "Makefile").read_text()
    assert "runner test flows" in makefile.split("\ntest:")[1].split("\n\n")[0]


def encodings(secret: str) -> list[str]:
    return [
        secret,
        quote(secret, safe=""),
        quote(secret),
        json.dumps(secret)[1:-1],
        base64.b64encode(secret.encode()).decode().rstrip("="),
        base64.urlsafe_b64encode(secret.encode()).decode().rstrip("="),
    ]


SECRET = 'k3y/w1th+sp ce&q="x"'
CANARY_FLOW = """\
version: 1
name: canary
services:
  api:
    base_url: "{{ env.API_URL }}"
    auth: {type: bearer, token: "{{ secrets.API_TOKEN }}"}
steps:
  - id: json
    request: {service: api, method: POST, path: /echo, json: {token: "{{ secrets.API_TOKEN }}"}}
    records: body
    emit: echoes
  - id: form
    request: {service: api, method: POST, path: /echo, form: {token: "{{ secrets.API_TOKEN }}"}}
    records: body
    emit: echoes
  - id: query
    request: {service: api, path: /echo, query: {token: "{{ secrets.API_TOKEN }}"}}
    records: body
    emit: echoes
"""


def test_a_recording_holds_no_secret_in_any_encoding(
    serve: Serve, cli: Cli, tmp_path: Path
) -> None:
    async def echo(request: web.Request) -> web.Response:
        forms = encodings(SECRET)
        body = {"forms": forms, "auth": request.headers.get("Authorization"),
                "sent": (await request.read()).decode(), "query": request.query_string}  # fmt: skip
        return web.json_response(body, headers={"X-Echo": forms[4], "X-Raw": quote(SECRET)})

    server = serve(app_with(("POST", "/echo", echo), ("GET", "/echo", echo)))
    (tmp_path / "canary.yaml").write_text(CANARY_FLOW)
    env = {"API_URL": server.url, "API_TOKEN": SECRET}
    result = cli("run", "canary.yaml", "--record", "canary.har", env=env)
    assert result.code == 0, result.stderr
    text = (tmp_path / "canary.har").read_text()
    assert len(json.loads(text)["log"]["entries"]) == 3
    for form in encodings(SECRET):
        assert form not in text, form
    redactor = Redactor()
    redactor.add(SECRET)
    assert redactor.redact(text) == text  # nothing left that the redactor would mask
    assert '"***"' in text
    # The masked recording still replays: the case's secret is masked the same way.
    server.stop()
    case = (
        "  - name: echoes\n    recording: canary.har\n"
        f"    env: {{API_URL: '{server.url}'}}\n    secrets: {{API_TOKEN: 'an/other+one'}}\n"
        "    expect: {summary: {records: {echoes: 3}}}\n"
    )
    (tmp_path / "canary.test.yaml").write_text(a_test_file("canary.yaml", case))
    result = cli("test", "canary.test.yaml")
    assert result.code == 0, result.stdout


REDIRECT_FLOW = """\
version: 1
name: moved
services:
  api: {base_url: "{{ env.API_URL }}"}
steps:
  - id: get
    request: {service: api, path: /old}
    records: body
    emit: things
"""


def test_redirect_hops_are_entries_of_their_own(serve: Serve, cli: Cli, tmp_path: Path) -> None:
    async def old(request: web.Request) -> web.Response:
        raise web.HTTPFound("/new?x=1")

    async def new(request: web.Request) -> web.Response:
        return web.json_response({"id": 1})

    server = serve(app_with(("GET", "/old", old), ("GET", "/new", new)))
    (tmp_path / "moved.yaml").write_text(REDIRECT_FLOW)
    assert cli("run", "moved.yaml", "--record", "moved.har", env={"API_URL": server.url}).code == 0
    server.stop()
    entries = json.loads((tmp_path / "moved.har").read_text())["log"]["entries"]
    assert [(e["request"]["url"], e["response"]["status"]) for e in entries] == [
        (f"{server.url}/old", 302),
        (f"{server.url}/new?x=1", 200),
    ]
    assert entries[0]["response"]["redirectURL"] == "/new?x=1"
    case = (
        "  - name: follows the redirect\n    recording: moved.har\n"
        f"    env: {{API_URL: '{server.url}'}}\n"
        "    expect: {outputs: {things: [{id: 1}]}, summary: {requests: 2}}\n"
    )
    (tmp_path / "moved.test.yaml").write_text(a_test_file("moved.yaml", case))
    result = cli("test")
    assert result.code == 0, result.stdout
    assert cli("test", "nowhere").code == 2
    (tmp_path / "moved.test.yaml").unlink()
    result = cli("test")
    assert result.code == 2
    assert result.stdout.splitlines()[:2] == [
        "ERROR (path) (.:1)",
        "    .: no *.test.yaml files found",
    ]


def test_the_committed_recordings_hold_no_demo_secret() -> None:
    demo_secrets = ["demo-token", "demo-secret", "demo-password"]
    redactor = Redactor()
    for secret in demo_secrets:
        redactor.add(secret)
    recordings = sorted((ROOT / "flows/tests/recordings").glob("*.har"))
    assert len(recordings) == len(list((ROOT / "flows").glob("*.yaml")))
    for path in recordings:
        text = path.read_text()
        assert redactor.redact(text) == text, path.name
        for secret in demo_secrets:
            for form in encodings(secret):
                assert form not in text, (path.name, form)


TOKEN_FLOW = """\
version: 1
name: tokens
services:
  api:
    base_url: https://api.example
    auth:
      type: oauth2_client_credentials
      token_url: https://api.example/oauth/token
      client_id: app
      client_secret: "{{ secrets.CLIENT_SECRET }}"
steps:
  - id: job
    request: {service: api, path: /job}
    poll: {until: "body.state == 'done'", interval: 30, timeout: 600}
    records: body
    emit: jobs
"""


def test_a_token_refresh_beyond_the_recording_reuses_the_last_token_entry(
    cli: Cli, tmp_path: Path
) -> None:
    (tmp_path / "tokens.yaml").write_text(TOKEN_FLOW)
    token = entry("POST", "https://api.example/oauth/token", 200,
                  {"access_token": "***", "token_type": "Bearer", "expires_in": 60})  # fmt: skip
    token["request"]["postData"] = {
        "mimeType": "application/x-www-form-urlencoded",
        "text": "grant_type=client_credentials",
    }
    token["_auth"] = True
    unused_token = json.loads(json.dumps(token))
    unused_token["request"]["postData"]["text"] = "grant_type=client_credentials&scope=never"
    pending = entry("GET", "https://api.example/job", 200, {"state": "pending"})
    done = entry("GET", "https://api.example/job", 200, {"state": "done"})
    (tmp_path / "tokens.har").write_text(har(token, pending, pending, pending, pending, done,
                                             unused_token))  # fmt: skip
    case = (
        "  - name: polled past the token's expiry\n    recording: tokens.har\n"
        # Tokens at 0 s, 60 s and 120 s (each renewed 6 s before its 60 s expire): three token
        # requests from one recorded token entry, and five polls.
        "    expect: {summary: {requests: 8}, outputs: {jobs: [{state: done}]}}\n"
    )
    (tmp_path / "tokens.test.yaml").write_text(a_test_file("tokens.yaml", case))
    result = cli("test", "tokens.test.yaml", "--format", "json")
    [report] = json_report(result)
    assert (result.code, report["differences"]) == (0, [])
    assert report["virtual_s"] == 120  # five polls, 30 s apart


def test_sigterm_still_writes_the_recording(serve: Serve, tmp_path: Path) -> None:
    import asyncio
    import os
    import signal
    import subprocess
    import sys

    async def items(request: web.Request) -> web.Response:
        if request.query.get("cursor") == "2":
            await asyncio.sleep(8)  # the second page stalls: the run is stopped there
        return web.json_response({"data": ITEMS[:2], "next": "2"})

    server = serve(app_with(("GET", "/items", items)))
    (tmp_path / "shop.yaml").write_text(SHOP_FLOW)
    env = {**os.environ, "API_URL": server.url, "API_TOKEN": TOKEN}
    proc = subprocess.Popen(
        [sys.executable, "-m", "runner.cli", "run", "shop.yaml", "--record", "stopped.har"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while len(server.requests) < 2:
        assert time.monotonic() < deadline and proc.poll() is None, "the run never got to page 2"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 143, stderr
    entries = json.loads((tmp_path / "stopped.har").read_text())["log"]["entries"]
    assert [(e["response"]["status"], e.get("_error")) for e in entries] == [
        (200, None),
        (0, "reset"),
    ]
    assert entries[1]["_message"] == "cancelled before a response"
    assert not (tmp_path / "stopped.har.partial").exists()


def test_a_case_shard_is_checked_at_its_place(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "poll.yaml").write_text(POLL_FLOW)
    (tmp_path / "x.test.yaml").write_text(
        "version: 1\nflow: poll.yaml\ncases:\n  - name: a\n    shard: 3/3\n"
        "  - name: b\n    shard: 0/2\n"
    )
    result = cli("test", "x.test.yaml")
    assert result.code == 2
    assert (
        "x.test.yaml:5:5: cases[0].shard: '3/3': the index must be below the number of shards"
        in result.stdout
    )
    assert (
        "x.test.yaml:7:5: cases[1].shard: the flow has no for_each step with shard: true"
        in result.stdout
    )


def test_a_sharded_case_replays_its_shards_part(cli: Cli, tmp_path: Path) -> None:
    # The example flow's recording, replayed as each of 3 shards: each its own companies
    # (by the hash of the company id), which together are the whole run's, each once.
    from runner.shard import bucket

    flows = Path(__file__).resolve().parent.parent / "flows"
    shutil.copy(flows / "companies_sharded.yaml", tmp_path)
    shutil.copy(flows / "tests" / "recordings" / "companies_sharded.har", tmp_path)
    whole = read_jsonl(flows / "tests" / "expected" / "companies_sharded" / "companies.jsonl")
    parts = [[c for c in whole if bucket(c["id"], 3) == i] for i in range(3)]
    assert all(parts) and sorted(c["id"] for p in parts for c in p) == sorted(
        c["id"] for c in whole
    )
    cases = "".join(
        f"  - name: shard {i}\n    recording: companies_sharded.har\n"
        f"    env: {{DEMO_API_URL: 'http://127.0.0.1:8787'}}\n    shard: {i}/3\n"
        "    match: {allow_unused: true}\n"
        f"    expect: {{outputs: {{companies: {json.dumps(part)}}}}}\n"
        for i, part in enumerate(parts)
    )
    (tmp_path / "s.test.yaml").write_text(
        f"version: 1\nflow: companies_sharded.yaml\ncases:\n{cases}"
    )
    result = cli("test", "s.test.yaml", "--format", "json")
    assert result.code == 0, result.stdout + result.stderr
    assert [c["status"] for c in json_report(result)] == ["pass"] * 3
    # And a wrong part fails: the shard really filters.
    (tmp_path / "s.test.yaml").write_text(
        (tmp_path / "s.test.yaml").read_text().replace("shard: 1/3", "shard: 2/3", 1)
    )
    assert [c["status"] for c in json_report(cli("test", "s.test.yaml", "--format", "json"))] == [
        "pass",
        "fail",
        "pass",
    ]
