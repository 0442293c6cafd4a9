"""The canary suite: secrets that look like real tokens (`+ / = %` in them) go through every
failure path and every hop; no form of them may appear in stdout, stderr (text and JSON
logs, `-v`), the summary, outputs or state, and each origin's server log shows what it got.

Origins: the API on 127.0.0.1, and three others: the same host on another port, another
address (127.0.0.2) and another host name (`localhost`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import Cli, CliResult, Serve, ServerThread, WriteFlow, summary_of, wire_forms

TOKEN = "tok+A/b=c%2Fd=="
PASSWORD = "pw+Q/z=%41x=="
API_KEY = "key+K/9=%2B=="
CLIENT_SECRET = "cs+S/e=%3Dc=="
REFRESH = "rt+R/f=%25r=="
HEADER_SECRET = "hx+H/d=%20h=="
LOGIN_TOKEN = "lt+L/g=%2F=="  # learnt during the run, from a login response
SECRETS = {
    "TOKEN": TOKEN,
    "PASSWORD": PASSWORD,
    "API_KEY": API_KEY,
    "CLIENT_SECRET": CLIENT_SECRET,
    "REFRESH": REFRESH,
    "HEADER_SECRET": HEADER_SECRET,
}
ALL = [*SECRETS.values(), LOGIN_TOKEN]
REDIRECT_CODES = (301, 302, 303, 307, 308)


def found_forms(text: str) -> list[tuple[str, str]]:
    """(secret, form) of every form of every canary in `text`."""
    return [
        (secret, name)
        for secret in ALL
        for name, form in wire_forms(secret, "u").items()
        if form in text
    ]


def seen_by(server: ServerThread) -> str:
    """Everything a server received, as one text: headers, query, bodies."""
    return json.dumps(
        [[r.method, r.path, r.headers, r.query, r.body.decode("utf-8", "replace")]
         for r in server.requests]
    )  # fmt: skip


def _echo(request: web.Request, body: bytes) -> dict[str, Any]:
    return {
        "path": request.path,
        "query": request.query_string,
        "headers": dict(request.headers),
        "body": body.decode("utf-8", "replace"),
    }


async def _other(request: web.Request) -> web.Response:
    """Another origin: answers anything, echoing what it got (a leak would show in outputs)."""
    body = await request.read()
    if request.path.startswith("/page"):
        return web.json_response({"data": [{"page": 2}], "next": None})
    return web.json_response([_echo(request, body)])


def other_app() -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _other)
    return app


def api_app(other: str) -> web.Application:
    """The service's own origin, misbehaving on purpose: it echoes credentials back."""

    async def redirect(request: web.Request) -> web.Response:
        await request.read()
        target = request.query["to"] + "/landing?from=api"
        return web.Response(status=int(request.query["code"]), headers={"Location": target})

    async def set_cookie(request: web.Request) -> web.Response:
        response = web.json_response([])
        response.set_cookie("sid", "session-cookie-1")
        return response

    async def echo_401(request: web.Request) -> web.Response:
        # Headers echoed as JSON with escaped slashes, as PHP's json_encode does.
        text = json.dumps({"you_sent": dict(request.headers)}).replace("/", "\\/")
        return web.Response(status=401, text=text, content_type="application/json")

    async def echo_500(request: web.Request) -> web.Response:
        return web.Response(status=500, text=f"bad query: {request.query_string}")

    async def boundary(request: web.Request) -> web.Response:
        # The key straddles the 500th character of the excerpt.
        key = request.query["k"]
        return web.Response(status=500, text="x" * (500 - len(key) // 2) + key + "y" * 50)

    async def token(request: web.Request) -> web.Response:
        form = (await request.read()).decode()
        return web.Response(status=400, text=f"invalid_client for {form}")

    async def login(request: web.Request) -> web.Response:
        body = await request.json()
        if request.query.get("fail"):
            return web.Response(status=400, text=json.dumps({"rejected": body}))
        return web.json_response({"token": LOGIN_TOKEN})

    async def pages(request: web.Request) -> web.Response:
        return web.json_response({"data": [{"page": 1}], "next": other + "/page2"})

    async def post_echo(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=307, headers={"Location": other + "/took"})

    app = web.Application()
    app.router.add_route("*", "/redirect", redirect)
    for path, handler in [
        ("/set-cookie", set_cookie),
        ("/echo-401", echo_401),
        ("/echo-500", echo_500),
        ("/boundary", boundary),
        ("/pages", pages),
    ]:
        app.router.add_get(path, handler)
    app.router.add_post("/oauth/token", token)
    app.router.add_post("/login", login)
    app.router.add_post("/post-echo", post_echo)
    return app


@dataclass
class Origins:
    api: ServerThread
    port: ServerThread  # 127.0.0.1, another port
    host: ServerThread  # 127.0.0.2
    name: ServerThread  # localhost

    @property
    def others(self) -> dict[str, ServerThread]:
        return {"port": self.port, "host": self.host, "name": self.name}

    def other_urls(self) -> dict[str, str]:
        return {
            "port": self.port.url,
            "host": self.host.url,
            "name": self.name.url.replace("127.0.0.1", "localhost"),
        }


@pytest.fixture
def origins(serve: Serve) -> Iterator[Origins]:
    port = serve(other_app())
    host = serve(other_app(), host="127.0.0.2")
    name = serve(other_app())
    api = serve(api_app(host.url))
    yield Origins(api, port, host, name)


SERVICES = """
services:
  bearer: {base_url: "{{ env.API }}", auth: {type: bearer, token: "{{ secrets.TOKEN }}"}}
  basic:
    base_url: "{{ env.API }}"
    auth: {type: basic, username: u, password: "{{ secrets.PASSWORD }}"}
  key_header:
    base_url: "{{ env.API }}"
    auth: {type: api_key, name: X-API-Key, value: "{{ secrets.API_KEY }}"}
  key_query:
    base_url: "{{ env.API }}"
    auth: {type: api_key, in: query, name: k, value: "{{ secrets.API_KEY }}"}
  key_cookie:
    base_url: "{{ env.API }}"
    auth: {type: api_key, in: cookie, name: k, value: "{{ secrets.API_KEY }}"}
  custom: {base_url: "{{ env.API }}", headers: {X-Auth-Token: "{{ secrets.HEADER_SECRET }}"}}
  jar: {base_url: "{{ env.API }}", cookies: true}
  cross: {base_url: "{{ env.API }}", allow_cross_host: true}
  oauth:
    base_url: "{{ env.API }}"
    auth: {type: oauth2_client_credentials, token_url: "{{ env.API }}/oauth/token",
           client_id: cid, client_secret: "{{ secrets.CLIENT_SECRET }}", client_auth: body}
    retry: {max_attempts: 1}
  refresh:
    base_url: "{{ env.API }}"
    auth: {type: oauth2_refresh_token, token_url: "{{ env.API }}/oauth/token",
           client_id: cid, refresh_token: "{{ secrets.REFRESH }}"}
    retry: {max_attempts: 1}
"""
HOPS_STEP = """
  - id: via_{service}
    for_each: inputs.hops
    request:
      service: {service}
      path: /redirect
      query: {{code: "{{{{ item.code }}}}", to: "{{{{ item.to }}}}"}}
    records: body
    fields: {{path: path, query: query}}
    emit: landed
"""


def run_all_ways(cli: Cli, tmp_path: Path, env: dict[str, str], *args: str) -> list[CliResult]:
    """The flow run with text logs, then JSON logs, both with -v, and as a dry run."""
    common = ("run", "flow.yaml", "--state", "state.json", *args)
    return [
        cli(*common, "-v", "--summary", "s.json", env=env),
        cli(*common, "-v", "--log-format", "json", "--summary", "s2.json", env=env),
        cli(*common, "--dry-run", env=env),
    ]


def assert_nothing_leaked(tmp_path: Path, runs: list[CliResult]) -> None:
    texts = {f"run {i}": r.stdout + r.stderr for i, r in enumerate(runs)}
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.suffix != ".yaml":
            texts[str(path.relative_to(tmp_path))] = path.read_text(errors="replace")
    leaked = {where: found_forms(text) for where, text in texts.items() if found_forms(text)}
    assert leaked == {}


def test_credentials_never_follow_a_redirect_to_another_origin(
    origins: Origins, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    """Every redirect code to each other origin, from a service of each kind of credential:
    the other origins get none of them, in any header, query, cookie or body."""
    services = ["bearer", "basic", "key_header", "key_query", "key_cookie", "custom", "jar"]
    steps = "".join(HOPS_STEP.format(service=s) for s in services)
    cookie = "  - {id: cookie, request: {service: jar, path: /set-cookie}}\n"
    write_flow(f"version: 1\nname: hops\n{SERVICES}\nsteps:\n{cookie}{steps}")
    hops = [
        {"code": code, "to": url}
        for code in REDIRECT_CODES
        for url in origins.other_urls().values()
    ]
    (tmp_path / "inputs.json").write_text(json.dumps({"hops": hops}))
    env = {"API": origins.api.url, **SECRETS}
    runs = run_all_ways(cli, tmp_path, env, "--inputs-file", "inputs.json")
    assert [r.code for r in runs] == [0, 0, 0], [r.stderr[-2000:] for r in runs]
    landed = [json.loads(line) for line in (tmp_path / "out/landed.jsonl").read_text().splitlines()]
    assert len(landed) == len(services) * len(hops)
    # The API did receive every credential: the flow exercised each path.
    api_seen = seen_by(origins.api)
    for secret in (TOKEN, API_KEY, HEADER_SECRET):
        assert secret in api_seen or wire_forms(secret)["quote_all"] in api_seen
    for name, server in origins.others.items():
        assert len(server.requests) == 2 * len(services) * len(REDIRECT_CODES), name
        assert found_forms(seen_by(server)) == [], name
        for request in server.requests:
            lower = {k.lower() for k in request.headers}
            assert not lower & {"authorization", "cookie", "x-api-key", "x-auth-token"}, name
            assert "k" not in request.query, name
    assert_nothing_leaked(tmp_path, runs)


def test_cookies_are_kept_by_origin_not_host(
    origins: Origins, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    """A cookie set by the API goes back to the API, not to its host on another port."""
    write_flow(
        f"""version: 1
name: jar
{SERVICES}
steps:
  - {{id: cookie, request: {{service: jar, path: /set-cookie}}}}
  - {{id: again, request: {{service: jar, path: /set-cookie}}}}
  - id: other_port
    request: {{service: jar, url: "{origins.port.url}/x"}}
    records: body
    emit: rows
"""
    )
    result = cli("run", "flow.yaml", env={"API": origins.api.url, **SECRETS})
    assert result.code == 0, result.stderr
    assert origins.api.requests[1].headers.get("Cookie") == "sid=session-cookie-1"
    assert "Cookie" not in origins.port.requests[0].headers


def test_a_url_outside_the_services_origin_gets_no_credentials(
    origins: Origins, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    other = origins.other_urls()
    steps = "".join(
        f"""
  - id: {service}_{where}
    request: {{service: {service}, url: "{url}/elsewhere"}}
    records: body
    fields: {{path: path}}
    emit: rows
"""
        for service in ("bearer", "basic", "key_header", "key_query", "custom")
        for where, url in other.items()
    )
    write_flow(f"version: 1\nname: urls\n{SERVICES}\nsteps:{steps}")
    env = {"API": origins.api.url, **SECRETS}
    runs = run_all_ways(cli, tmp_path, env)
    assert [r.code for r in runs] == [0, 0, 0], [r.stderr[-2000:] for r in runs]
    for name, server in origins.others.items():
        assert len(server.requests) == 2 * 5, name
        assert found_forms(seen_by(server)) == [], name
    assert_nothing_leaked(tmp_path, runs)


def test_pagination_across_hosts_never_carries_the_flows_own_authorization(
    origins: Origins, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    """The pattern of flows/oauth_login.yaml (a login step's token in the step's own header)
    with allow_cross_host: the next page on another origin gets no Authorization."""
    write_flow(
        f"""version: 1
name: pages
{SERVICES}
steps:
  - id: login
    request:
      service: cross
      method: POST
      path: /login
      json: {{password: "{{{{ secrets.PASSWORD }}}}"}}
    set: {{token: {{value: body.token, secret: true}}}}
  - id: pages
    request:
      service: cross
      path: /pages
      headers:
        Authorization: "Bearer {{{{ steps.login.vars.token }}}}"
        X-Auth-Token: "{{{{ secrets.HEADER_SECRET }}}}"
    paginate: {{type: next_url, next_url: body.next}}
    records: body.data
    emit: rows
"""
    )
    env = {"API": origins.api.url, **SECRETS}
    runs = run_all_ways(cli, tmp_path, env)
    assert [r.code for r in runs] == [0, 0, 0], [r.stderr[-2000:] for r in runs]
    assert [r.path for r in origins.host.requests] == ["/page2", "/page2"]
    for request in origins.host.requests:
        assert "Authorization" not in request.headers and "X-Auth-Token" not in request.headers
    assert found_forms(seen_by(origins.host)) == []
    assert f"Bearer {LOGIN_TOKEN}" in seen_by(origins.api)
    assert_nothing_leaked(tmp_path, runs)


FAILURES = {
    "echo_401_json_escaped": "  - {id: f, request: {service: bearer, path: /echo-401}}",
    "echo_401_basic": "  - {id: f, request: {service: basic, path: /echo-401}}",
    "echo_401_header": "  - {id: f, request: {service: custom, path: /echo-401}}",
    "echo_500_query": (
        "  - {id: f, request: {service: key_query, path: /echo-500,"
        ' query: {again: "{{ secrets.TOKEN }}"}}}'
    ),
    "truncation_boundary": "  - {id: f, request: {service: key_query, path: /boundary}}",
    "token_form_echo": "  - {id: f, request: {service: oauth, path: /data}}",
    "refresh_form_echo": "  - {id: f, request: {service: refresh, path: /data}}",
    "login_json_echo": (
        "  - {id: f, request: {service: bearer, method: POST, path: /login, query: {fail: 1},"
        ' json: {user: u, password: "{{ secrets.PASSWORD }}"}}}'
    ),
    "post_secret_body_cross_origin": (
        "  - {id: f, request: {service: bearer, method: POST, path: /post-echo,"
        ' json: {password: "{{ secrets.PASSWORD }}"}}}'
    ),
    "rule_message_with_url": (
        "  - id: f\n    request: {service: key_query, path: /echo-500}\n"
        '    on_status: [{status: 500, action: fail, message: "failed at {{ url }}: {{ body }}"}]'
    ),
}


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_failures_never_print_a_secret(
    origins: Origins, cli: Cli, write_flow: WriteFlow, tmp_path: Path, case: str
) -> None:
    write_flow(f"version: 1\nname: fails\n{SERVICES}\nsteps:\n{FAILURES[case]}\n")
    env = {"API": origins.api.url, **SECRETS}
    runs = run_all_ways(cli, tmp_path, env)
    # 1, or 69 for a 5xx that stayed after retries; the dry run sends nothing.
    assert [r.code in (1, 69) for r in runs] == [True, True, False], [r.stderr for r in runs]
    assert runs[2].code == 0, runs[2].stderr
    for name in ("s.json", "s2.json"):
        error = summary_of(tmp_path, name)["error"]
        assert error["step"] == "f" and error["url"], error
    # The server got the secret: the failure path really had it to print.
    assert found_forms(seen_by(origins.api)), "the API never received a secret"
    if case == "post_secret_body_cross_origin":
        assert summary_of(tmp_path)["error"]["kind"] == "security"
        assert origins.host.requests == []
    assert_nothing_leaked(tmp_path, runs)
