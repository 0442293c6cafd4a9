"""End to end: each fault of the chaos server paired with what the runner must do about it;
then hostile input (YAML tags, alias bombs, sandbox escapes, XML entities) at the CLI."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.chaos_server import GOOD, build_chaos_app, closed_port, hits
from tests.conftest import (
    EVENT_LOOPS,
    Cli,
    Serve,
    WriteFlow,
    read_jsonl,
    run_cli_measured,
)

MIB = 1024 * 1024


def chaos_flow(
    base_url: str,
    path: str,
    *,
    method: str = "GET",
    query: dict[str, Any] | None = None,
    step_extra: str = "",
    max_attempts: int = 4,
    read: float = 1,
    total: float = 20,
    max_body_bytes: int = MIB,
) -> str:
    """One step against the chaos server; retries fast so that a test costs little time."""
    return f"""\
version: 1
name: chaos
services:
  chaos:
    base_url: "{base_url}"
    retry: {{max_attempts: {max_attempts}, initial_delay: 0.01, max_delay: 0.05}}
    timeout: {{connect: 2, read: {read}, total: {total}}}
steps:
  - id: fetch
    request:
      service: chaos
      method: {method}
      path: {path}
      query: {json.dumps(query or {})}
{step_extra}    response: {{max_body_bytes: {max_body_bytes}}}
    records: body.data
    emit: items
"""


@dataclass(frozen=True)
class Fault:
    """A fault, and what the runner must do about it."""

    id: str
    path: str
    route: str  # the chaos server's counter name
    query: dict[str, Any] = field(default_factory=dict)
    method: str = "GET"
    step_extra: str = ""
    max_attempts: int = 4
    read: float = 1
    total: float = 20
    exit_code: int = 0
    hits: int = 1  # requests the server saw
    retries: int = 0  # as counted in the summary
    message: tuple[str, ...] = ()  # in stderr (exit != 0)
    kind: str | None = None  # summary error.kind
    min_duration: float = 0.0
    max_duration: float = 15.0


FAULTS = [
    Fault(
        "stall-then-ok",
        "/stall",
        "stall",
        query={"fail": 1},
        hits=2,
        retries=1,
        min_duration=1.0,  # the read timeout (1 s) caught the stall
    ),
    Fault(
        "stall-always",
        "/stall",
        "stall",
        max_attempts=2,
        exit_code=69,
        hits=2,
        retries=1,
        message=("read timeout", "after 2 attempts"),
        kind="unavailable",
        min_duration=2.0,
    ),
    # Bytes every 0.3 s for about 2 s, read timeout 1 s: slow, not stalled; no retry.
    Fault("slow-drip", "/drip", "drip", hits=1, retries=0, min_duration=1.5),
    Fault(
        "total-timeout-per-attempt",
        "/drip",
        "drip",
        max_attempts=1,
        total=0.8,
        exit_code=69,
        hits=1,
        message=("total timeout per attempt",),
        kind="unavailable",
    ),
    Fault("reset-then-ok", "/reset", "reset", query={"fail": 2}, hits=3, retries=2),
    Fault(
        "reset-always",
        "/reset",
        "reset",
        max_attempts=3,
        exit_code=69,
        hits=3,
        retries=2,
        message=("after 3 attempts",),
        kind="unavailable",
    ),
    Fault(
        "truncated-gzip-then-ok",
        "/truncated-gzip",
        "truncated_gzip",
        query={"fail": 1},
        hits=2,
        retries=1,
    ),
    Fault(
        "truncated-gzip-always",
        "/truncated-gzip",
        "truncated_gzip",
        max_attempts=2,
        exit_code=69,
        hits=2,
        retries=1,
        message=("response body cut short: compressed body ended before its end marker",),
        kind="unavailable",
    ),
    Fault("deflate-zlib", "/deflate/zlib", "deflate"),
    Fault("deflate-raw", "/deflate/raw", "deflate"),
    Fault(
        "503-retry-after-seconds",
        "/storm/seconds",
        "storm/seconds",
        {"fail": 1},
        hits=2,
        retries=1,
        min_duration=1.0,  # Retry-After: 1
    ),
    Fault(
        "503-retry-after-date",
        "/storm/date",
        "storm/date",
        {"fail": 1},
        hits=2,
        retries=1,
        min_duration=0.9,  # Retry-After: an HTTP date 2 s ahead, to the second
    ),
    Fault("503-no-retry-after", "/storm/none", "storm/none", {"fail": 2}, hits=3, retries=2),
    Fault(
        "503-retry-after-too-large",
        "/storm/large",
        "storm/large",
        exit_code=69,
        hits=1,
        retries=0,
        message=("Retry-After of 3600 s exceeds max_retry_after (120 s)",),
        kind="unavailable",
    ),
    Fault(
        "503-storm-never-ends",
        "/storm/none",
        "storm/none",
        max_attempts=3,
        exit_code=69,
        hits=3,
        retries=2,
        message=("-> 503", "after 3 attempts", "service unavailable"),
        kind="unavailable",
    ),
    Fault(
        "429-ratelimit-headers",
        "/ratelimit",
        "ratelimit",
        {"fail": 1},
        hits=2,
        retries=1,
        min_duration=0.2,  # X-RateLimit-Reset: 0.2 (seconds)
    ),
    Fault(
        "html-labelled-json",
        "/wrong-type",
        "wrong_type",
        exit_code=1,
        hits=1,
        message=("not valid JSON", "Content-Type application/json", "<title>502 Bad Gateway"),
        kind="decode",
    ),
    Fault(
        "redirect-loop",
        "/loop/a",
        "loop",
        exit_code=1,
        hits=11,  # the first request and 10 hops
        message=("too many redirects (10)",),
    ),
    Fault(
        "post-503-not-retried",
        "/post",
        "post",
        {"fail": 1},
        method="POST",
        exit_code=69,
        hits=1,
        retries=0,
        message=("POST", "-> 503"),
        kind="unavailable",
    ),
    Fault(
        "post-503-retry-unsafe",
        "/post",
        "post",
        {"fail": 2},
        method="POST",
        step_extra="    retry_unsafe: true\n",
        hits=3,
        retries=2,
    ),
    Fault(
        "post-503-idempotency-key",
        "/post",
        "post",
        {"fail": 1},
        method="POST",
        step_extra="",  # the header is added in the request below
        hits=2,
        retries=1,
    ),
]


@pytest.mark.parametrize("event_loop", EVENT_LOOPS)
@pytest.mark.parametrize("fault", FAULTS, ids=[f.id for f in FAULTS])
def test_fault(
    fault: Fault, event_loop: str, serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    app = build_chaos_app()
    server = serve(app)
    text = chaos_flow(
        server.url,
        fault.path,
        method=fault.method,
        query=fault.query,
        step_extra=fault.step_extra,
        max_attempts=fault.max_attempts,
        read=fault.read,
        total=fault.total,
    )
    if fault.id == "post-503-idempotency-key":
        text = text.replace(
            "      method: POST\n",
            '      method: POST\n      headers: {Idempotency-Key: "{{ uuid4() }}"}\n',
        )
    write_flow(text)
    started = time.monotonic()
    result = cli("run", "flow.yaml", "--summary", "s.json", env={"RUNNER_EVENT_LOOP": event_loop})
    duration = time.monotonic() - started
    summary = json.loads((tmp_path / "s.json").read_text())

    assert result.code == fault.exit_code, result.stderr
    assert summary["exit_code"] == fault.exit_code
    assert hits(app, fault.route) == fault.hits
    assert summary["retries"] == fault.retries
    assert summary["requests"] == fault.hits
    assert "Traceback" not in result.stderr
    assert fault.min_duration <= duration < fault.max_duration
    if fault.exit_code == 0:
        assert summary["status"] == "success"
        assert summary["error"] is None
        expected = GOOD["data"] if fault.method == "GET" else [{"id": 1, "created": True}]
        # Every record once, though the request was sent several times.
        assert read_jsonl(tmp_path / "out" / "items.jsonl") == expected
        assert summary["records"] == {"items": len(expected)}
    else:
        assert summary["status"] == "failed"
        for part in fault.message:
            assert part in result.stderr
        assert "run failed in step 'fetch'" in result.stderr
        if fault.kind is not None:
            assert summary["error"]["kind"] == fault.kind
        # The last good outputs stay untouched: there were none, so nothing is published.
        assert not (tmp_path / "out" / "items.jsonl").exists()
        assert not (tmp_path / "out" / "manifest.json").exists()
    if fault.id == "post-503-idempotency-key":
        keys = {r.headers["Idempotency-Key"] for r in server.requests}
        assert len(keys) == 1  # rendered once per request, resent as is on every attempt
    gaps = {"429-ratelimit-headers": 0.19, "503-retry-after-seconds": 0.99}
    gaps["503-retry-after-date"] = 0.9
    if fault.id in gaps:
        first, second = server.requests[0].at, server.requests[1].at
        assert second - first >= gaps[fault.id]


def test_connection_refused_is_retried_then_exit_69(
    cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    write_flow(chaos_flow(f"http://127.0.0.1:{closed_port()}", "/items", max_attempts=3))
    result = cli("run", "flow.yaml", "--summary", "s.json")
    summary = json.loads((tmp_path / "s.json").read_text())
    assert result.code == 69
    assert "cannot connect" in result.stderr
    assert "after 3 attempts" in result.stderr
    assert "Traceback" not in result.stderr
    assert summary["requests"] == 3
    assert summary["retries"] == 2
    assert summary["error"]["kind"] == "unavailable"
    assert summary["error"]["method"] == "GET"


@pytest.mark.parametrize(
    ("path", "route"),
    [("/huge", "huge"), ("/bomb", "bomb")],
    ids=["80MB-stream", "gzip-bomb"],
)
def test_oversized_body_fails_fast_with_bounded_memory(
    path: str, route: str, serve: Serve, write_flow: WriteFlow, tmp_path: Path
) -> None:
    app = build_chaos_app()
    server = serve(app)
    write_flow(chaos_flow(server.url, path, max_body_bytes=MIB))
    run = run_cli_measured("run", "flow.yaml", "--summary", "s.json", cwd=tmp_path)
    assert run.code == 1, run.stderr
    assert "response body exceeds max_body_bytes (1048576 bytes)" in run.stderr
    assert "Traceback" not in run.stderr
    assert hits(app, route) == 1  # a size limit is not a transient fault: no retry
    assert run.duration_s < 10
    # The interpreter and its imports take about 50 MiB; the 80 or 200 MB body must not.
    assert run.peak_rss_kib < 100 * 1024, run.peak_rss_kib
    assert json.loads((tmp_path / "s.json").read_text())["error"]["kind"] == "decode"


# ---------------------------------------------------------------- hostile input


def test_yaml_python_tag_is_refused_and_never_constructed(
    cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    write_flow(
        "version: 1\nname: x\nsteps:\n"
        "  - id: a\n"
        "    request: !!python/object/apply:os.system ['touch pwned']\n"
    )
    for command in (["run", "flow.yaml"], ["validate", "flow.yaml"]):
        result = cli(*command)
        assert result.code == 2
        assert "flow.yaml:5:" in result.stderr
        assert "python/object/apply" in result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "pwned").exists()


def test_yaml_alias_bomb_is_refused_quickly(cli: Cli, write_flow: WriteFlow) -> None:
    lines = ["version: 1", "name: bomb", 'a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 10):
        prev = f"*a{i - 1}"
        lines.append(f"a{i}: &a{i} [{', '.join([prev] * 9)}]")
    lines.append("steps: [{id: s, request: {url: 'http://127.0.0.1:9/x'}, x: *a9}]")
    write_flow("\n".join(lines) + "\n")
    started = time.monotonic()
    result = cli("validate", "flow.yaml")
    assert result.code == 2
    assert "alias" in result.stderr.lower()
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 10


SANDBOX_ESCAPES = [
    # CVE-2024-56326: a stored reference to str.format, called later.
    "{% set f = '{0.__class__.__mro__}'.format %}{{ f(1) }}",
    # CVE-2025-27516: |attr('format') to get round the format check.
    "{% set f = '{0.__class__.__mro__}' | attr('format') %}{{ f(1) }}",
    "{{ ('{0.__class__}' | attr('format'))(inputs) }}",
    # The classic: walk from a string to every loaded class.
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('touch pwned') }}",
    "{{ lipsum.__globals__['os'].system('touch pwned') }}",
]


@pytest.mark.parametrize("payload", SANDBOX_ESCAPES)
def test_sandbox_escape_in_a_flow_fails_cleanly(
    payload: str, serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    app = build_chaos_app()
    server = serve(app)
    text = chaos_flow(server.url, "/storm/none", query={"fail": 0, "q": payload})
    write_flow(text)
    result = cli("run", "flow.yaml", "--summary", "s.json")
    assert result.code in (1, 2), result.stderr
    assert result.stderr.startswith("runner:")
    assert "Traceback" not in result.stderr
    if result.code == 1:  # refused while rendering, before anything was sent with it
        assert "run failed in step 'fetch': template error in" in result.stderr
        assert json.loads((tmp_path / "s.json").read_text())["error"]["kind"] == "render"
    else:  # refused when the flow was checked
        assert "flow.yaml:" in result.stderr
    assert "<class '" not in result.stderr  # no class list leaked
    assert not (tmp_path / "pwned").exists()
    # Nothing was sent with an escaped value.
    for request in server.requests:
        assert "class" not in json.dumps(request.query).replace("__class__", "")


def _xml_app(body: str) -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=body, content_type="application/xml")

    app = web.Application()
    app.router.add_get("/feed", handler)
    return app


@pytest.mark.parametrize(
    "body",
    [
        '<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;">]>'
        "<r><item>&b;</item></r>",
        '<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        "<r><item>&x;</item></r>",
        '<?xml version="1.0"?><!DOCTYPE r SYSTEM "http://127.0.0.1:9/evil.dtd"><r><item/></r>',
    ],
    ids=["entity-expansion", "external-entity", "external-dtd"],
)
def test_xml_with_dtd_or_entities_is_refused(
    body: str, serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    server = serve(_xml_app(body))
    write_flow(chaos_flow(server.url, "/feed").replace("body.data", "body.r.item"))
    result = cli("run", "flow.yaml", "--summary", "s.json")
    assert result.code == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "root:" not in result.stderr  # /etc/passwd was never read
    lowered = result.stderr.lower()
    assert "dtd" in lowered or "entit" in lowered
    assert json.loads((tmp_path / "s.json").read_text())["error"]["kind"] == "decode"


def test_rules_see_only_the_final_response(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    app = build_chaos_app()
    server = serve(app)
    rules = (
        "    on_status:\n"
        '      - {status: 503, action: fail, message: "the rule saw {{ status }}"}\n'
    )
    # Two 503s, retried by the transport, then 200: the 503 rule never sees them.
    write_flow(chaos_flow(server.url, "/storm/none", query={"fail": 2}, step_extra=rules))
    result = cli("run", "flow.yaml", "--summary", "s.json")
    summary = json.loads((tmp_path / "s.json").read_text())
    assert result.code == 0, result.stderr
    assert read_jsonl(tmp_path / "out" / "items.jsonl") == GOOD["data"]
    assert (summary["requests"], summary["retries"]) == (3, 2)
    assert summary["status_counts"] == {"503": 2, "200": 1}

    # When the 503s outlast the retries, the rule decides: a plain `fail` is exit 1, not 69.
    write_flow(chaos_flow(server.url, "/storm/none", max_attempts=2, step_extra=rules))
    result = cli("run", "flow.yaml", "--summary", "s.json")
    summary = json.loads((tmp_path / "s.json").read_text())
    assert result.code == 1
    assert "the rule saw 503" in result.stderr
    assert (summary["requests"], summary["retries"]) == (2, 1)


def test_run_timeout_bounds_the_whole_run(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    server = serve(build_chaos_app())
    # The read timeout (30 s) would wait; --timeout 1 ends the run first.
    write_flow(chaos_flow(server.url, "/stall", read=30))
    started = time.monotonic()
    result = cli("run", "flow.yaml", "--timeout", "1", "--summary", "s.json")
    assert time.monotonic() - started < 6
    summary = json.loads((tmp_path / "s.json").read_text())
    assert result.code == 69
    assert "the run took longer than --timeout (1 s)" in result.stderr
    assert summary["error"]["kind"] == "timeout"
    assert not (tmp_path / "out" / "items.jsonl").exists()
