"""Security limits: the redactor's encodings, token requests held to their origin and their
service's settings, the sandbox's size caps, YAML and XML bombs, expressions nested too
deeply, hostile rate-limit headers, signals while a flow loads, stream names."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
from aiohttp import web
from yarl import URL

from runner.decode import DecodeOptions, decode_body
from runner.errors import BODY_EXCERPT_CHARS, DecodeError, RenderError, RunError, SecurityError
from runner.http import PreparedRequest, rate_limit_wait, redirect_request, without_credentials
from runner.redact import Redactor
from runner.templates import compile_template
from tests.conftest import ROOT, Cli, CliResult, Serve, WriteFlow, app_with, summary_of, wire_forms

# Looks like a real token: the characters that URL, form and JSON encoders all change.
SECRET = "sk+Live/9x=Q%2Fz=="
RETRY = "retry: {max_attempts: 2, initial_delay: 0.01, max_delay: 0.02}"


def leaks(text: str, secret: str = SECRET) -> list[str]:
    """The names of the forms of `secret` found in `text`."""
    return [name for name, form in wire_forms(secret).items() if form in text]


# -- the redactor ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "secret", [SECRET, "pa ss+wörd/€=", "ab\\c\"d'<e>&", "tok_\u2028\U0001f600end"]
)
def test_redactor_masks_every_wire_form(secret: str) -> None:
    redactor = Redactor()
    redactor.add(secret)
    for name, form in wire_forms(secret).items():
        text = f"Authorization: Basic {form}" if name == "basic" else f"before {form} after"
        redacted = redactor.redact(text)
        assert "***" in redacted, name
        assert leaks(redacted, secret) == [], (name, redacted)


def test_redactor_masks_in_data_keys_and_values() -> None:
    redactor = Redactor()
    redactor.add(SECRET)
    data = {"headers": {"x": f"Bearer {quote(SECRET)}"}, SECRET: [json.dumps(SECRET)], "n": 1}
    assert redactor.redact_data(data) == {"headers": {"x": "Bearer ***"}, "***": ['"***"'], "n": 1}


def test_secret_at_the_excerpt_boundary_is_masked_whole() -> None:
    """Redacted before it is cut: a secret straddling the 500th character shows no part."""
    redactor = Redactor()
    redactor.add(SECRET)
    for offset in range(BODY_EXCERPT_CHARS - len(SECRET), BODY_EXCERPT_CHARS + 1):
        body = "x" * offset + SECRET + "y" * 100
        for shown in (
            redactor.excerpt(body.encode(), BODY_EXCERPT_CHARS),
            str(RunError("failed", body=body).redacted(redactor.redact)),
        ):
            assert shown is not None
            assert SECRET[:3] not in shown.replace("***", ""), offset
    assert redactor.excerpt(b"x" * 1000, BODY_EXCERPT_CHARS) == "x" * BODY_EXCERPT_CHARS


def test_a_secret_learnt_later_is_masked_from_then_on() -> None:
    redactor = Redactor()
    assert redactor.redact(SECRET) == SECRET
    redactor.add(SECRET)
    assert redactor.redact(f"a={quote_plus(SECRET)}") == "a=***"


# -- token and login requests ---------------------------------------------------------------


def _token_app(other: str | None = None, status: int = 307) -> web.Application:
    async def token(request: web.Request) -> web.Response:
        if other is not None:
            return web.Response(status=status, headers={"Location": other + "/oauth/token"})
        return web.json_response({"access_token": "tok-1", "expires_in": 3600})

    async def data(request: web.Request) -> web.Response:
        return web.json_response([{"auth": request.headers.get("Authorization")}])

    return app_with(("POST", "/oauth/token", token), ("GET", "/data", data))


OAUTH_FLOW = """
version: 1
name: t
services:
  api:
    base_url: "{{ env.API }}"
    auth: {type: oauth2_client_credentials, token_url: "{{ env.API }}/oauth/token",
           client_id: cid, client_secret: "{{ secrets.SECRET }}", client_auth: body}
    RETRY
steps:
  - {id: fetch, request: {service: api, path: /data}, records: body, emit: rows}
""".replace("RETRY", RETRY)


@pytest.mark.parametrize("status", [307, 308])
def test_token_request_redirected_to_another_origin_fails(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path, status: int
) -> None:
    evil = serve(_token_app())
    api = serve(_token_app(other=evil.url, status=status))
    write_flow(OAUTH_FLOW)
    result = cli("run", "flow.yaml", "--summary", "s.json", env={"API": api.url, "SECRET": SECRET})
    assert result.code == 1, result.stderr
    error = summary_of(tmp_path)["error"]
    assert error["kind"] == "security" and error["step"] == "fetch"
    assert "redirect to another origin refused" in error["message"]
    # The other origin got nothing: no body with the secret, no request at all.
    assert evil.requests == []
    assert leaks(result.stderr + json.dumps(error)) == []


def test_token_request_uses_the_services_retry_and_timeout(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    async def token(request: web.Request) -> web.Response:
        return web.Response(status=503, text="down")

    server = serve(app_with(("POST", "/oauth/token", token)))
    write_flow(OAUTH_FLOW)
    started = time.monotonic()
    result = cli("run", "flow.yaml", "--summary", "s.json", env={"API": server.url, "SECRET": "s3"})
    assert result.code == 69, result.stderr
    # The service's retry (2 attempts, 10-20 ms apart), not the default 4 over seconds.
    assert [r.path for r in server.requests] == ["/oauth/token"] * 2
    assert time.monotonic() - started < 20


def test_token_request_uses_the_services_read_timeout(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    import asyncio

    async def token(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.json_response({"access_token": "late"})

    server = serve(app_with(("POST", "/oauth/token", token)))
    write_flow(OAUTH_FLOW.replace(RETRY, "retry: {max_attempts: 1}\n    timeout: {read: 0.3}"))
    started = time.monotonic()
    result = cli("run", "flow.yaml", "--summary", "s.json", env={"API": server.url, "SECRET": "s3"})
    assert result.code == 69, result.stderr
    assert time.monotonic() - started < 4.5
    assert "timed out" in summary_of(tmp_path)["error"]["message"].lower()


def test_line_break_in_an_access_token_is_a_located_error(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    async def token(request: web.Request) -> web.Response:
        return web.json_response({"access_token": "tok\r\nX-Injected: 1"})

    server = serve(app_with(("POST", "/oauth/token", token)))
    write_flow(OAUTH_FLOW)
    result = cli("run", "flow.yaml", "--summary", "s.json", env={"API": server.url, "SECRET": "s3"})
    assert result.code == 1, result.stderr
    error = summary_of(tmp_path)["error"]
    assert error["kind"] == "security" and error["step"] == "fetch"
    assert error["method"] == "GET" and error["url"].endswith("/data")
    assert "line break" in error["message"]
    assert "internal error" not in result.stderr
    assert [r.path for r in server.requests] == ["/oauth/token"]


# -- the sandbox's size caps ---------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "{{ 'A' * 10**9 }}",
        "{{ [1] * 10**9 }}",
        "{{ 'a'.center(10**9) }}",
        "{{ 'a'.ljust(10**9) }}",
        "{{ 'a'|center(10**9) }}",
        "{{ '%*s' % (10**9, 'a') }}",
        "{{ '%1000000000s' % 'a' }}",
        "{{ '%*s'|format(10**9, 'a') }}",
        "{{ '{:>1000000000}'.format('a') }}",
        "{{ '{:>{}}'.format('a', 10**9) }}",
        "{{ lipsum(10**6) }}",
        "{{ lipsum(1, max=10**9) }}",
        "{{ 10**10000000 }}",
        "{{ (10**50000) * (10**50000) }}",
        "{{ range(100000)|join('A' * 16000000) }}",
        "{{ ('a' * 1000000).replace('a', 'a' * 1000) }}",
        "{{ ('a\\n' * 1000000)|indent(1000) }}",
        "{{ [1]|batch(10**9, 0)|list }}",
        "x{% for i in range(100000) %}{% for j in range(100000) %}{{ 'y' * 1000 }}{% endfor %}"
        "{% endfor %}",
    ],
)
def test_sandbox_caps_sizes(source: str) -> None:
    started = time.monotonic()
    with pytest.raises(RenderError) as caught:
        compile_template(source).render({})
    assert time.monotonic() - started < 15  # stopped early, not after gigabytes
    assert "limit" in str(caught.value) or "more than" in str(caught.value)


def test_sandbox_allows_ordinary_sizes() -> None:
    source = (
        "{{ '-' * 80 }}|{{ 2 ** 64 }}|{{ '%5s' % 'a' }}|{{ '{:>4}'.format('b') }}"
        "|{{ 'c'|center(5) }}"
    )
    assert compile_template(source).render({}) == ("-" * 80 + f"|{2**64}|    a|   b|  c  ")
    assert len(compile_template("{{ lipsum(3, html=False) }}").render({})) > 0


def test_sandbox_cap_is_a_located_error(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response([])

    server = serve(app_with(("GET", "/x", handler)))
    write_flow(
        """
version: 1
name: t
services: {api: {base_url: "{{ env.API }}"}}
steps:
  - {id: big, request: {service: api, path: /x, query: {q: "{{ 'A' * 10**9 }}"}}}
"""
    )
    result = cli("run", "flow.yaml", "--summary", "s.json", env={"API": server.url})
    assert result.code == 1
    error = summary_of(tmp_path)["error"]
    assert error["kind"] == "render" and error["step"] == "big"
    assert "more than the limit" in error["message"]
    assert server.requests == []


# -- bombs and deep nesting ------------------------------------------------------------------


def test_one_large_string_aliased_many_times_is_refused(
    cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    big = "x" * 1_000_000
    lines = ["version: 1", "name: bomb", f"description: &big '{big}'", "inputs:"]
    lines += ["  type: object", "  properties:"]
    lines += [f"    p{i}: {{description: *big}}" for i in range(10_000)]
    lines += ["services: {}", "steps: [{id: a, request: {url: 'http://127.0.0.1:1/'}}]"]
    write_flow("\n".join(lines) + "\n")
    started = time.monotonic()
    result = cli("validate", "flow.yaml")
    assert time.monotonic() - started < 20
    assert result.code == 2
    assert "flow.yaml:8:" in result.stderr and "bytes expanded through aliases" in result.stderr


def test_deep_xml_is_a_decode_error() -> None:
    raw = b"<a>" * 200_000 + b"x" + b"</a>" * 200_000
    with pytest.raises(DecodeError, match="nested deeper than 200"):
        decode_body(raw, "application/xml", DecodeOptions())
    shallow = b"<a>" * 150 + b"x" + b"</a>" * 150
    value: Any = decode_body(shallow, "application/xml", DecodeOptions())
    for _ in range(150):
        value = value["a"]
    assert value == "x"


def test_deep_xml_response_fails_the_step(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    deep = b"<a>" * 200_000 + b"x" + b"</a>" * 200_000

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=deep, content_type="application/xml")

    server = serve(app_with(("GET", "/x", handler)))
    write_flow(
        """
version: 1
name: t
services: {api: {base_url: "{{ env.API }}"}}
steps:
  - {id: xml, request: {service: api, path: /x}, records: body, emit: rows}
"""
    )
    result = cli("run", "flow.yaml", "--summary", "s.json", env={"API": server.url})
    assert result.code == 1
    error = summary_of(tmp_path)["error"]
    assert error["kind"] == "decode" and error["step"] == "xml" and error["status"] == 200
    assert "RecursionError" not in result.stderr


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("query: {q: ", '"{{ ' + "(" * 5000 + "1" + ")" * 5000 + ' }}"}', "Jinja: the template"),
        ("records: ", '"' + "[" * 5000 + "a" + "]" * 5000 + '"', "JMESPath: the expression"),
        ("records: ", '"' + "(" * 5000 + "a" + ")" * 5000 + '"', "JMESPath: the expression"),
        ("records: ", '"' + "!" * 500 + "a" + '"', "JMESPath: the expression"),
    ],
)
def test_deeply_nested_expressions_are_located_errors(
    cli: Cli, write_flow: WriteFlow, key: str, value: str, message: str
) -> None:
    request = "request: {url: 'http://127.0.0.1:1/x'}"
    if key.startswith("query"):
        request = "request: {url: 'http://127.0.0.1:1/x', " + key + value + "}"
        extra = ""
    else:
        extra = f"\n    {key}{value}"
    write_flow(
        f"""version: 1
name: t
steps:
  - id: a
    {request}{extra}
"""
    )
    result = cli("validate", "flow.yaml")
    assert result.code == 2, result.stderr
    assert "internal error" not in result.stderr
    assert "flow.yaml:5:" in result.stderr or "flow.yaml:6:" in result.stderr
    assert message in result.stderr and "nested more than 100 levels" in result.stderr


# -- hostile headers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", ["limit=10, remaining=., reset=5", "remaining=1.2.3;reset=x", "r=0;t=1.1.1", "r=0"]
)
def test_garbage_ratelimit_header_is_ignored(value: str) -> None:
    assert rate_limit_wait({"ratelimit": value}, now=0) is None


def test_garbage_ratelimit_header_does_not_fail_the_run(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response([{"a": 1}], headers={"RateLimit": "remaining=1.2.3, reset=."})

    server = serve(app_with(("GET", "/x", handler)))
    write_flow(
        """
version: 1
name: t
services: {api: {base_url: "{{ env.API }}"}}
steps:
  - {id: a, request: {service: api, path: /x}, records: body, emit: rows}
"""
    )
    result = cli("run", "flow.yaml", env={"API": server.url})
    assert result.code == 0, result.stderr


# -- signals and names -----------------------------------------------------------------------


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_while_the_flow_loads_exits_with_a_summary(
    tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    """The flow file is a FIFO no one writes to: the CLI waits, still loading, for the signal."""
    fifo = tmp_path / "flow.yaml"
    os.mkfifo(fifo)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNER_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "runner.cli", "run", "flow.yaml", "--summary", "s.json"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.5)  # imports done, blocked opening the FIFO
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=20)
    assert proc.returncode == code, stderr
    summary = summary_of(tmp_path)
    assert summary["status"] == "interrupted" and summary["exit_code"] == code
    assert f"interrupted by {sig.name}" in stderr


def test_a_long_stream_name_is_a_validate_error(cli: Cli, write_flow: WriteFlow) -> None:
    write_flow(
        f"""version: 1
name: t
steps:
  - id: a
    request: {{url: 'http://127.0.0.1:1/x'}}
    records: body
    emit: {"s" * 300}
outputs:
  {"t" * 63}: {{}}
"""
    )
    result = cli("validate", "flow.yaml")
    assert result.code == 2
    # One error; the warnings of the same pass (the output no step emits) come with it.
    problems = [line for line in result.stderr.splitlines() if line.startswith("flow.yaml:")]
    errors = [line for line in problems if ": warning: " not in line]
    assert len(errors) == 1, result.stderr
    assert "flow.yaml:7:5: steps[0].emit: a stream name is 1 to 63 letters" in result.stderr


def test_the_schema_bounds_stream_names() -> None:
    schema = json.loads((ROOT / "schemas/flow.schema.json").read_text())
    assert schema["$defs"]["stream"]["maxLength"] == 63
    assert schema["properties"]["outputs"]["propertyNames"]["maxLength"] == 63


def test_a_service_with_auth_needs_a_base_url(cli: Cli, write_flow: WriteFlow) -> None:
    """Its credentials go only to the base_url's origin: without one, a `url` taken from a
    response would decide where they go."""
    write_flow(
        """version: 1
name: t
services:
  s:
    auth: {type: bearer, token: x}
steps:
  - id: a
    request: {service: s, url: "http://127.0.0.1:1/x"}
"""
    )
    result = cli("validate", "flow.yaml")
    assert result.code == 2
    assert "flow.yaml:4:3: services.s: a service with auth needs a base_url" in result.stderr


# -- redirects and credentials ----------------------------------------------------------------


def _secret_in(text: str) -> bool:
    redactor = Redactor()
    redactor.add(SECRET)
    return redactor.redact(text) != text


def test_a_same_origin_redirect_keeps_the_api_key_in_the_query() -> None:
    request = PreparedRequest(
        "GET", "https://api.example/v1/items", query=[("k", SECRET), ("page", "2")],
        sensitive_query={"k"},
    )  # fmt: skip
    hop = redirect_request(request, 302, "/v2/items?page=2")
    assert URL(hop.url).query.getall("k") == [SECRET]
    assert URL(hop.url).query["page"] == "2"
    hop = redirect_request(request, 302, f"/v2/items?k={quote(SECRET, safe='')}")
    assert URL(hop.url).query.getall("k") == [SECRET]  # not twice
    hop = redirect_request(request, 302, "https://other.example/v2/items")
    assert "k" not in URL(hop.url).query


def test_a_redirect_location_with_user_and_password_is_refused() -> None:
    request = PreparedRequest("GET", "http://127.0.0.1:8080/a")
    with pytest.raises(SecurityError, match="user:password@") as caught:
        redirect_request(request, 302, "http://evil:pw-123@127.0.0.1:8080/b")
    assert "pw-123" not in str(caught.value) and "evil" not in str(caught.value)


def test_a_cross_origin_hop_drops_every_header_holding_a_secret() -> None:
    request = PreparedRequest(
        "GET",
        "https://api.example/v1",
        headers={"X-Auth-Token": f"t {quote_plus(SECRET)}", "X-Trace": "abc", "Authorization": "x"},
    )
    hop = redirect_request(request, 307, "https://other.example/", contains_secret=_secret_in)
    assert hop.headers == {"X-Trace": "abc"}
    same = redirect_request(request, 307, "/v2", contains_secret=_secret_in)
    assert same.headers == request.headers


def test_a_body_holding_a_secret_never_follows_a_redirect_to_another_origin() -> None:
    body = json.dumps({"password": SECRET}).encode()
    request = PreparedRequest("POST", "https://api.example/login", body=body)
    for status in (307, 308):
        with pytest.raises(SecurityError, match="another origin refused"):
            redirect_request(request, status, "https://evil.example/", contains_secret=_secret_in)
        assert redirect_request(request, status, "/again", contains_secret=_secret_in).body == body
    # 303 drops the body: nothing secret is sent.
    hop = redirect_request(request, 303, "https://evil.example/", contains_secret=_secret_in)
    assert hop.body is None


def test_without_credentials() -> None:
    request = PreparedRequest(
        "GET",
        "https://api.example/v1",
        query=[("k", "key-1"), ("q", "x")],
        headers={"Authorization": "t", "Cookie": "a=b", "X-Key": "v", "X-S": SECRET, "A": "1"},
        cookies={"sid": "1"},
        sensitive_headers={"X-Key"},
        sensitive_query={"k"},
    )
    bare = without_credentials(request, _secret_in)
    assert bare.headers == {"A": "1"} and bare.query == [("q", "x")] and bare.cookies == {}


# -- retry rule delays --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wait", "code", "message"),
    [
        (1e9, 69, "exceeds max_retry_after"),
        ("1e9", 69, "exceeds max_retry_after"),
        ("inf", 1, "not a finite number"),
        ("nan", 1, "not a finite number"),
        ("soon", 1, "not a finite number"),
        (-1, 1, "not a finite number"),
        (True, 1, "not a finite number"),
        ({"s": 1}, 1, "not a finite number"),
    ],
)
def test_a_retry_delay_from_the_response_is_bounded(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path, wait: Any, code: int,
    message: str,
) -> None:  # fmt: skip
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"wait": wait}, status=409)

    server = serve(app_with(("GET", "/x", handler)))
    write_flow(
        """
version: 1
name: t
services: {api: {base_url: "{{ env.API }}", retry: {max_attempts: 3, max_retry_after: 60}}}
steps:
  - id: slow
    request: {service: api, path: /x}
    on_status: [{status: 409, action: retry, delay: body.wait}]
"""
    )
    started = time.monotonic()
    result = cli("run", "flow.yaml", "--summary", "s.json", env={"API": server.url}, timeout=30)
    assert time.monotonic() - started < 20
    assert result.code == code, result.stderr
    error = summary_of(tmp_path)["error"]
    assert error["step"] == "slow" and error["status"] == 409 and message in error["message"]
    assert "internal error" not in result.stderr


def test_a_literal_retry_delay_above_max_retry_after_fails_at_once(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({}, status=409)

    server = serve(app_with(("GET", "/x", handler)))
    write_flow(
        """
version: 1
name: t
services: {api: {base_url: "{{ env.API }}", retry: {max_retry_after: 5}}}
steps:
  - id: slow
    request: {service: api, path: /x}
    on_status: [{status: 409, action: retry, delay: 3600}]
"""
    )
    result = cli("run", "flow.yaml", "--summary", "s.json", env={"API": server.url}, timeout=30)
    assert result.code == 69, result.stderr
    assert "exceeds max_retry_after" in summary_of(tmp_path)["error"]["message"]
    assert len(server.requests) == 1


# -- pagination and referenced records ------------------------------------------------------


def _endless_app() -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        page = int(request.query.get("page", "1"))
        return web.json_response({"data": [{"n": page}], "next": page + 1})

    return app_with(("GET", "/items", handler))


def test_pagination_stops_at_the_default_max_pages_with_a_warning(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    """An API that always answers with a next cursor: 10,000 pages, a warning, and the
    stream's cursor kept (cut short)."""
    server = serve(_endless_app())
    write_flow(
        """
version: 1
name: t
services: {api: {base_url: "{{ env.API }}"}}
steps:
  - id: all
    request: {service: api, path: /items}
    paginate: {type: cursor, cursor: body.next, param: page}
    records: body.data
    emit: items
outputs:
  items: {cursor: n}
"""
    )
    result = cli("run", "flow.yaml", "--summary", "s.json", env={"API": server.url}, timeout=300)
    assert result.code == 0, result.stderr
    summary = summary_of(tmp_path)
    assert summary["records"] == {"items": 10_000}
    assert summary["requests"] == 10_000
    assert any("default max_pages" in w for w in summary["warnings"])
    assert "default max_pages" in result.stderr


def test_max_pages_null_lifts_the_cap_and_a_set_one_does_not_warn() -> None:
    from runner.compiler import build_flow
    from runner.loader import load_text
    from runner.model import DEFAULT_MAX_PAGES
    from runner.validate import validate_document

    def paginate(extra: str) -> Any:
        text = f"""version: 1
name: t
steps:
  - id: a
    request: {{url: 'http://127.0.0.1:1/x'}}
    paginate: {{type: cursor, cursor: body.next{extra}}}
    records: body
"""
        document = load_text(text, "f.yaml")
        assert [p for p in validate_document(document) if p.severity == "error"] == []
        return build_flow(document).steps[0].paginate

    default, lifted, three = paginate(""), paginate(", max_pages: null"), paginate(", max_pages: 3")
    assert (default.max_pages, default.max_pages_is_default) == (DEFAULT_MAX_PAGES, True)
    assert (lifted.max_pages, lifted.max_pages_is_default) == (None, False)
    assert (three.max_pages, three.max_pages_is_default) == (3, False)


def test_a_referenced_steps_records_are_capped(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    """`steps.all.records` is read later: its records stay in memory, at most max_records."""
    server = serve(_endless_app())
    flow = """
version: 1
name: t
services: {api: {base_url: "{{ env.API }}"}}
steps:
  - id: all
    request: {service: api, path: /items}
    paginate: {type: cursor, cursor: body.next, param: page, max_pages: PAGES}
    records: body.data
    MAX
  - id: after
    for_each: steps.all.records
    request: {service: api, path: /items}
"""
    write_flow(flow.replace("PAGES", "null").replace("MAX", "max_records: 50"))
    result = cli("run", "flow.yaml", "--summary", "s.json", env={"API": server.url}, timeout=120)
    assert result.code == 1, result.stderr
    error = summary_of(tmp_path)["error"]
    assert error["step"] == "all" and error["kind"] == "limit"
    assert "more than max_records (50)" in error["message"]
    assert 51 <= len(server.requests) <= 52  # the next page may be on its way (prefetch)
    # The default is 100,000; a step within its cap runs as before.
    write_flow(flow.replace("PAGES", "3").replace("MAX", ""))
    result = cli("run", "flow.yaml", "--summary", "s.json", env={"API": server.url}, timeout=120)
    assert result.code == 0, result.stderr


# -- multipart uploads ------------------------------------------------------------------------


def _upload_app() -> web.Application:
    async def upload(request: web.Request) -> web.Response:
        body = await request.read()  # the test reads the file's text in the recorded body
        return web.json_response([{"size": len(body)}])

    async def listing(request: web.Request) -> web.Response:
        return web.json_response({"path": "/etc/hostname"})

    return app_with(("POST", "/upload", upload), ("GET", "/listing", listing))


UPLOAD_FLOW = """
version: 1
name: t
inputs: {type: object, properties: {doc: {type: string}}}
services: {api: {base_url: "{{ env.API }}"}}
steps:
  - id: up
    request: {service: api, method: POST, path: /upload, multipart: {doc: {file: FILE}}}
    records: body
    emit: uploaded
"""


def test_a_multipart_file_from_response_data_is_a_validate_error(
    cli: Cli, write_flow: WriteFlow
) -> None:
    write_flow(UPLOAD_FLOW.replace("FILE", '"{{ steps.list.response.body.path }}"'))
    result = cli("validate", "flow.yaml")
    assert result.code == 2
    assert "steps[0].request.multipart.doc.file: a multipart file is a path written in the" in (
        result.stderr
    )
    assert "not from steps" in result.stderr


def test_multipart_files_come_from_the_flows_folder_or_files_dir(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    server = serve(_upload_app())
    (tmp_path / "doc.txt").write_text("in the flow's folder")
    outside = tmp_path.parent / f"{tmp_path.name}-uploads"
    outside.mkdir()
    (outside / "doc.txt").write_text("in --files-dir")
    (tmp_path / "link.txt").symlink_to(outside / "doc.txt")
    env = {"API": server.url}
    write_flow(UPLOAD_FLOW.replace("FILE", '"{{ inputs.doc }}"'))

    def run(doc: str, *args: str) -> CliResult:
        return cli("run", "flow.yaml", "--input", f"doc={doc}", "--output", "-",
                   "--summary", "s.json", *args, env=env)  # fmt: skip

    inside = run("doc.txt")
    assert inside.code == 0, inside.stderr
    assert b"in the flow's folder" in server.requests[-1].body
    for refused in (str(outside / "doc.txt"), "../" + outside.name + "/doc.txt", "link.txt",
                    "/etc/hostname"):  # fmt: skip
        result = run(refused)
        assert result.code == 1, (refused, result.stderr)
        error = summary_of(tmp_path)["error"]
        assert error["kind"] == "security" and error["step"] == "up", refused
        assert "outside the flow's folder" in error["message"]
    allowed = run(str(outside / "doc.txt"), "--files-dir", str(outside))
    assert allowed.code == 0, allowed.stderr
    assert b"in --files-dir" in server.requests[-1].body
    assert run("link.txt", "--files-dir", str(outside)).code == 0
    assert len(server.requests) == 3  # nothing was sent for a refused file
    assert not any(b"in --files-dir" in r.body for r in server.requests[:1])
    assert run("doc.txt", "--files-dir", str(tmp_path / "missing")).code == 2
