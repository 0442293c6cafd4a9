"""End to end: auth, secrets and transport security through the real CLI and real servers."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import (
    EVENT_LOOPS,
    ROOT,
    Cli,
    Serve,
    WriteFlow,
    free_port,
    read_jsonl,
    server_process,
    summary_of,
)

CLIENT_ID = "cid"
CLIENT_SECRET = "client-secret-1"
USER, PASSWORD = "alice", "pw-alice-1"
BEARER = "bearer-token-1"
API_KEY = "api-key-1"
RETRY = "retry: {max_attempts: 2, initial_delay: 0.01, max_delay: 0.02}"


# -- the fake API: token endpoint, login, protected resources ------------------------------


@dataclass
class Api:
    """State of the fake API, readable and changeable by the tests."""

    expires_in: float | None = 3600
    delay: float = 0.0
    instance_url: str | None = None  # put in token responses, like Salesforce
    revoke_at: int | None = None  # revoke every token when this data request arrives
    tokens: dict[str, float | None] = field(default_factory=dict)  # token -> expiry
    refresh_tokens: set[str] = field(default_factory=lambda: {"rt-0"})
    token_forms: list[dict[str, str]] = field(default_factory=list)
    token_auth: list[str | None] = field(default_factory=list)
    logins: int = 0
    data_statuses: list[int] = field(default_factory=list)
    counter: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def issue(self, prefix: str) -> str:
        token = f"{prefix}-{next(self.counter)}"
        expiry = None if self.expires_in is None else time.monotonic() + self.expires_in
        self.tokens[token] = expiry
        return token

    def valid(self, token: str | None) -> bool:
        if token is None or token not in self.tokens:
            return False
        expiry = self.tokens[token]
        return expiry is None or time.monotonic() < expiry


def _credential(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        return header[7:]
    return (
        request.headers.get("X-Session")
        or request.query.get("sid")
        or request.cookies.get("sid")
        or None
    )


def api_app(api: Api) -> web.Application:
    async def token(request: web.Request) -> web.Response:
        form = dict(await request.post())
        api.token_forms.append({k: str(v) for k, v in form.items()})
        header = request.headers.get("Authorization")
        api.token_auth.append(header)
        if header and header.startswith("Basic "):
            cid, _, secret = base64.b64decode(header[6:]).decode().partition(":")
        else:
            cid, secret = str(form.get("client_id")), str(form.get("client_secret"))
        if (cid, secret) != (CLIENT_ID, CLIENT_SECRET):
            return web.json_response({"error": "invalid_client"}, status=401)
        body: dict[str, Any] = {"token_type": "Bearer"}
        if form.get("grant_type") == "refresh_token":
            old = str(form.get("refresh_token"))
            if old not in api.refresh_tokens:
                return web.json_response({"error": "invalid_grant"}, status=400)
            api.refresh_tokens.discard(old)
            new = f"rt-{next(api.counter)}"
            api.refresh_tokens.add(new)
            body["refresh_token"] = new
        elif form.get("grant_type") != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        body["access_token"] = api.issue("at")
        if api.expires_in is not None:
            body["expires_in"] = api.expires_in
        if api.instance_url is not None:
            body["instance_url"] = api.instance_url
        return web.json_response(body)

    async def login(request: web.Request) -> web.Response:
        api.logins += 1
        data = await request.json()
        if data != {"username": USER, "password": PASSWORD}:
            return web.json_response({"error": "bad login"}, status=401)
        return web.json_response({"session": {"token": api.issue("st")}})

    async def data(request: web.Request) -> web.Response:
        if api.revoke_at is not None and len(api.data_statuses) + 1 == api.revoke_at:
            api.tokens.clear()
        credential = _credential(request)
        if not api.valid(credential):
            api.data_statuses.append(401)
            return web.json_response({"error": "unauthorized"}, status=401)
        api.data_statuses.append(200)
        if api.delay:
            await asyncio.sleep(api.delay)
        return web.json_response({"id": request.match_info["n"], "token": credential})

    async def static(request: web.Request) -> web.Response:
        kind = request.match_info["kind"]
        basic = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        ok = {
            "basic": request.headers.get("Authorization") == basic,
            "bearer": request.headers.get("Authorization") == f"Bearer {BEARER}",
            "header": request.headers.get("X-API-Key") == API_KEY,
            "query": request.query.get("api_key") == API_KEY,
            "cookie": request.cookies.get("key") == API_KEY,
        }[kind]
        if not ok:
            return web.json_response({"error": "unauthorized"}, status=401)
        return web.json_response({"kind": kind})

    async def echo(request: web.Request) -> web.Response:
        # Echoes every credential it got: a careless error message would print them.
        seen = {
            "authorization": request.headers.get("Authorization"),
            "key": request.headers.get("X-API-Key"),
            "query": request.query_string,
        }
        return web.json_response({"error": "boom", "seen": seen}, status=500)

    app = web.Application()
    app.router.add_post("/oauth/token", token)
    app.router.add_post("/login", login)
    app.router.add_get("/data/{n}", data)
    app.router.add_get("/static/{kind}", static)
    app.router.add_get("/echo", echo)
    return app


def ids_flow(auth: str, items: int, concurrency: int, extra: str = "") -> str:
    return (
        """
version: 1
name: t
inputs:
  type: object
  properties: {ids: {type: array, default: IDS}}
services:
  api:
    base_url: "{{ env.API }}"
    auth: AUTH
    RETRY
EXTRA
steps:
  - id: get
    for_each: inputs.ids
    concurrency: CONC
    request: {service: api, path: "/data/{{ item }}"}
    records: body
    fields: {id: id, token: token}
    emit: rows
""".replace("IDS", json.dumps(list(range(items))))
        .replace("AUTH", auth)
        .replace("RETRY", RETRY)
        .replace("CONC", str(concurrency))
        .replace("EXTRA", extra)
    )


CC_AUTH = (
    '{type: oauth2_client_credentials, token_url: "{{ env.API }}/oauth/token", '
    'client_id: cid, client_secret: "{{ secrets.CS }}", CLIENT_AUTH scope: [read, write], '
    "audience: https://api.example, params: {resource: orders}}"
)


# -- static credentials and secrets ---------------------------------------------------------


def test_static_auth_types_are_accepted_and_secrets_come_from_env_and_files(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    server = serve(api_app(Api()))
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    (secrets_dir / "PASS").write_text(PASSWORD + "\n")  # one trailing newline is dropped
    (secrets_dir / "TOKEN").write_text("the file loses to the environment\n")
    (secrets_dir / "KEY").write_text(API_KEY)
    services = {
        "basic": '{type: basic, username: alice, password: "{{ secrets.PASS }}"}',
        "bearer": '{type: bearer, token: "{{ secrets.TOKEN }}"}',
        "header": '{type: api_key, in: header, name: X-API-Key, value: "{{ secrets.KEY }}"}',
        "query": '{type: api_key, in: query, name: api_key, value: "{{ secrets.KEY }}"}',
        "cookie": '{type: api_key, in: cookie, name: key, value: "{{ secrets.KEY }}"}',
    }
    text = "version: 1\nname: t\nservices:\n"
    for name, auth in services.items():
        text += f'  {name}:\n    base_url: "{{{{ env.API }}}}"\n    auth: {auth}\n'
    text += "steps:\n"
    for name in services:
        text += (
            f"  - id: {name}\n    request: {{service: {name}, path: /static/{name}}}\n"
            "    records: body\n    emit: kinds\n"
        )
    write_flow(text)
    env = {"API": server.url, "TOKEN": BEARER, "RUNNER_SECRETS_DIR": str(secrets_dir)}
    result = cli("run", "flow.yaml", "--summary", "s.json", env=env)
    assert result.code == 0, result.stderr
    assert read_jsonl(tmp_path / "out/kinds.jsonl") == [{"kind": k} for k in services]
    assert summary_of(tmp_path)["status_counts"] == {"200": 5}
    # The query key was sent as a query parameter, the cookie as a cookie, nothing else.
    by_path = {r.path: r for r in server.requests}
    assert by_path["/static/query"].query == {"api_key": [API_KEY]}
    assert by_path["/static/cookie"].headers["Cookie"] == f"key={API_KEY}"
    assert "Authorization" not in by_path["/static/header"].headers


def test_missing_and_refused_secrets_are_exit_2_before_any_request(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    server = serve(api_app(Api()))
    write_flow(
        """
version: 1
name: t
services:
  api: {base_url: "{{ env.API }}", auth: {type: bearer, token: "{{ secrets.NOPE_TOKEN }}"}}
steps:
  - {id: a, request: {service: api, path: /static/bearer}}
"""
    )
    result = cli("run", "flow.yaml", "--summary", "s.json", env={"API": server.url})
    assert result.code == 2
    assert "missing secret NOPE_TOKEN" in result.stderr
    assert summary_of(tmp_path)["requests"] == 0

    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "y").write_text("never read")
    write_flow(
        """
version: 1
name: t
services:
  api: {base_url: "{{ env.API }}", auth: {type: bearer, token: "{{ secrets['x/y'] }}"}}
steps:
  - {id: a, request: {service: api, path: /static/bearer}}
"""
    )
    result = cli("run", "flow.yaml", env={"API": server.url, "RUNNER_SECRETS_DIR": str(tmp_path)})
    assert result.code == 2
    assert "'x/y'" in result.stderr and "never read" not in result.stderr
    assert server.requests == []


def test_a_wrong_secret_fails_with_the_401_and_never_shows_the_secret(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    server = serve(api_app(Api()))
    write_flow(
        """
version: 1
name: t
services:
  api: {base_url: "{{ env.API }}", auth: {type: bearer, token: "{{ secrets.TOKEN }}"}}
steps:
  - {id: a, request: {service: api, path: /static/bearer}}
"""
    )
    wrong = "wrong-token-9x"
    result = cli("run", "flow.yaml", "--summary", "s.json", env={"API": server.url, "TOKEN": wrong})
    assert result.code == 1
    assert "401" in result.stderr and "/static/bearer" in result.stderr
    assert wrong not in result.stdout + result.stderr
    summary = summary_of(tmp_path)
    assert summary["error"]["status"] == 401 and summary["error"]["step"] == "a"
    assert wrong not in json.dumps(summary)
    assert len(server.requests) == 1  # a static credential is not "refreshed" on 401


# -- OAuth2 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("client_auth", ["basic", "body"])
def test_client_credentials_one_token_request_serves_20_concurrent_calls(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path, client_auth: str
) -> None:
    api = Api(delay=0.05)
    server = serve(api_app(api))
    auth = CC_AUTH.replace("CLIENT_AUTH", f"client_auth: {client_auth},")
    write_flow(ids_flow(auth, items=20, concurrency=8))
    env = {"API": server.url, "CS": CLIENT_SECRET}
    result = cli("run", "flow.yaml", "-v", "--summary", "s.json", env=env)
    assert result.code == 0, result.stderr
    assert "at-1" not in result.stderr  # a run-time token is a secret too
    assert len(api.token_forms) == 1
    form = api.token_forms[0]
    expected = {
        "grant_type": "client_credentials",
        "scope": "read write",
        "audience": "https://api.example",
        "resource": "orders",
    }
    if client_auth == "body":
        expected |= {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
        assert api.token_auth == [None]
    else:
        assert api.token_auth == ["Basic " + base64.b64encode(b"cid:client-secret-1").decode()]
    assert form == expected
    rows = read_jsonl(tmp_path / "out/rows.jsonl")
    assert [r["id"] for r in rows] == [str(i) for i in range(20)]
    assert {r["token"] for r in rows} == {"at-1"}
    assert summary_of(tmp_path)["requests"] == 21  # the token request counts


def test_a_token_that_expires_mid_run_is_replaced_before_it_runs_out(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    api = Api(expires_in=1, delay=0.3)
    server = serve(api_app(api))
    write_flow(ids_flow(CC_AUTH.replace("CLIENT_AUTH", ""), items=10, concurrency=1))
    started = time.monotonic()
    result = cli("run", "flow.yaml", env={"API": server.url, "CS": CLIENT_SECRET})
    assert result.code == 0, result.stderr
    assert time.monotonic() - started >= 3
    # Renewed ahead of expiry (margin 10 % of 1 s): every data request was accepted.
    assert api.data_statuses == [200] * 10
    assert len(api.token_forms) >= 3
    tokens = [r["token"] for r in read_jsonl(tmp_path / "out/rows.jsonl")]
    assert len(set(tokens)) == len(api.token_forms)


def test_a_revoked_token_is_refreshed_once_and_a_rejected_one_fails(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    api = Api(revoke_at=3)
    server = serve(api_app(api))
    write_flow(ids_flow(CC_AUTH.replace("CLIENT_AUTH", ""), items=5, concurrency=1))
    env = {"API": server.url, "CS": CLIENT_SECRET}
    result = cli("run", "flow.yaml", "--summary", "s.json", env=env)
    assert result.code == 0, result.stderr
    assert api.data_statuses == [200, 200, 401, 200, 200, 200]
    assert len(api.token_forms) == 2
    tokens = [r["token"] for r in read_jsonl(tmp_path / "out/rows.jsonl")]
    assert tokens == ["at-1", "at-1", "at-2", "at-2", "at-2"]
    summary = summary_of(tmp_path)
    assert summary["requests"] == 8 and summary["status_counts"] == {"200": 7, "401": 1}

    # A server that rejects every token: one refresh, then the 401 fails the run.
    api2 = Api(expires_in=None)
    api2.valid = lambda token: False  # type: ignore[method-assign]
    server2 = serve(api_app(api2))
    result = cli("run", "flow.yaml", env={"API": server2.url, "CS": CLIENT_SECRET})
    assert result.code == 1
    assert "401" in result.stderr
    assert api2.data_statuses == [401, 401] and len(api2.token_forms) == 2


def test_wrong_client_secret_fails_the_token_request_without_showing_it(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    api = Api()
    server = serve(api_app(api))
    write_flow(ids_flow(CC_AUTH.replace("CLIENT_AUTH", "client_auth: body,"), 2, 1))
    wrong = "wrong-client-secret"
    result = cli("run", "flow.yaml", "--summary", "s.json", env={"API": server.url, "CS": wrong})
    assert result.code == 1
    assert "token request failed: 401" in result.stderr
    assert wrong not in result.stderr + result.stdout + (tmp_path / "s.json").read_text()
    assert api.data_statuses == []


def test_refresh_token_rotation_is_saved_at_once_even_when_the_run_fails(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    api = Api()
    server = serve(api_app(api))
    auth = (
        '{type: oauth2_refresh_token, token_url: "{{ env.API }}/oauth/token", client_id: cid, '
        'client_secret: "{{ secrets.CS }}", refresh_token: "{{ secrets.RT }}"}'
    )
    write_flow(
        ids_flow(auth, 1, 1) + "  - {id: fails, request: {service: api, path: /echo}, "
        "on_status: [{status: 500, action: fail}]}\n"
    )
    env = {"API": server.url, "CS": CLIENT_SECRET, "RT": "rt-0"}

    result = cli("run", "flow.yaml", env=env)  # no --state
    assert result.code == 2 and "--state" in result.stderr
    assert server.requests == []

    result = cli("run", "flow.yaml", "--state", "state.json", env=env)
    assert result.code == 1
    state_file = tmp_path / "state.json"
    state = json.loads(state_file.read_text())
    (rotated,) = api.refresh_tokens
    assert rotated != "rt-0"
    assert state["auth"] == {"api": {"refresh_token": rotated}}
    assert not state.get("streams")  # the failed run advanced no stream
    assert stat.S_IMODE(state_file.stat().st_mode) == 0o600

    # The next run sends the saved token, not the (spent) one from the secret.
    result = cli("run", "flow.yaml", "--state", "state.json", env=env)
    assert result.code == 1
    assert [f["refresh_token"] for f in api.token_forms] == ["rt-0", rotated]
    (newer,) = api.refresh_tokens
    assert json.loads(state_file.read_text())["auth"]["api"]["refresh_token"] == newer
    assert rotated not in result.stderr and newer not in result.stderr


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_refresh_token_rotation_is_saved_in_the_database_sink(
    serve: Serve,
    cli: Cli,
    write_flow: WriteFlow,
    tmp_path: Path,
    kind: str,
    request: pytest.FixtureRequest,
) -> None:
    from tests.destinations import Database, SqliteDatabase

    db: Database = (
        SqliteDatabase(tmp_path / "dest.db")
        if kind == "sqlite"
        else request.getfixturevalue("postgres_db")
    )
    api = Api()
    server = serve(api_app(api))
    auth = (
        '{type: oauth2_refresh_token, token_url: "{{ env.API }}/oauth/token", client_id: cid, '
        'client_secret: "{{ secrets.CS }}", refresh_token: "{{ secrets.RT }}"}'
    )
    write_flow(
        ids_flow(auth, 1, 1) + "  - {id: fails, request: {service: api, path: /echo}, "
        "on_status: [{status: 500, action: fail}]}\n"
    )
    env = {"API": server.url, "CS": CLIENT_SECRET, "RT": "rt-0"}

    def saved() -> str:
        rows = db._query(  # type: ignore[attr-defined]
            "SELECT value FROM _runner_state WHERE kind = 'auth' AND name = 'api'"
        )
        value = rows[0]["value"]
        token: str = (json.loads(value) if isinstance(value, str) else value)["refresh_token"]
        return token

    # The run fails after the token rotated: the new token is stored all the same.
    result = cli("run", "flow.yaml", "--sink", db.url, env=env)
    assert result.code == 1
    (rotated,) = api.refresh_tokens
    assert saved() == rotated
    assert db.state() == {}

    result = cli("run", "flow.yaml", "--sink", db.url, env=env)
    assert result.code == 1
    assert [f["refresh_token"] for f in api.token_forms] == ["rt-0", rotated]
    (newer,) = api.refresh_tokens
    assert saved() == newer
    assert rotated not in result.stderr and newer not in result.stderr


# -- session login, cookies, scope `auth` ---------------------------------------------------


def test_session_login_in_header_query_and_cookie_and_relogin_on_401(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    api = Api(expires_in=None, revoke_at=4)
    server = serve(api_app(api))
    login = '{method: POST, path: /login, json: {username: alice, password: "{{ secrets.PW }}"}}'
    placements = {
        "h": "in: header, name: X-Session",
        "q": "in: query, name: sid",
        "c": "in: cookie, name: sid",
    }
    text = "version: 1\nname: t\nservices:\n"
    for name, where in placements.items():
        text += (
            f'  {name}:\n    base_url: "{{{{ env.API }}}}"\n'
            f"    auth: {{type: session, request: {login}, token: body.session.token, {where}}}\n"
        )
    text += "steps:\n"
    for name in placements:
        for n in (1, 2):
            text += (
                f"  - id: {name}{n}\n    request: {{service: {name}, path: /data/{name}{n}}}\n"
                "    records: body\n    emit: rows\n"
            )
    write_flow(text)
    result = cli("run", "flow.yaml", env={"API": server.url, "PW": PASSWORD})
    assert result.code == 0, result.stderr
    rows = read_jsonl(tmp_path / "out/rows.jsonl")
    # Each service logs in once; the revocation at the 4th request costs q exactly one relogin.
    assert [r["token"] for r in rows] == ["st-1", "st-1", "st-2", "st-3", "st-4", "st-4"]
    assert api.logins == 4 and api.data_statuses.count(401) == 1
    data = [r for r in server.requests if r.path.startswith("/data/")]
    assert data[0].headers["X-Session"] == "st-1"
    assert data[2].query == {"sid": ["st-2"]}
    assert data[-1].headers["Cookie"] == "sid=st-4"


def test_cookie_jar_keeps_cookies_only_with_cookies_true(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    async def set_cookie(request: web.Request) -> web.Response:
        response = web.json_response({})
        response.set_cookie("jar", "v1")
        return response

    async def show(request: web.Request) -> web.Response:
        return web.json_response({"jar": request.cookies.get("jar")})

    app = web.Application()
    app.router.add_get("/set", set_cookie)
    app.router.add_get("/show", show)
    server = serve(app)
    for cookies, expected in (("true", "v1"), ("false", None)):
        write_flow(
            f"""
version: 1
name: t
services:
  api: {{base_url: "{{{{ env.API }}}}", cookies: {cookies}}}
steps:
  - {{id: set, request: {{service: api, path: /set}}}}
  - {{id: show, request: {{service: api, path: /show}}, records: body, emit: rows}}
"""
        )
        result = cli("run", "flow.yaml", env={"API": server.url})
        assert result.code == 0, result.stderr
        assert read_jsonl(tmp_path / "out/rows.jsonl") == [{"jar": expected}]


def test_base_url_from_the_token_response_like_salesforce_instance_url(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    instance_api = Api()
    instance = serve(api_app(instance_api))
    login_api = Api(instance_url=instance.url)
    login = serve(api_app(login_api))
    instance_api.tokens = login_api.tokens  # the instance accepts the login server's tokens
    write_flow(
        """
version: 1
name: t
services:
  sf:
    base_url: "{{ auth.sf.instance_url }}"
    auth:
      type: oauth2_client_credentials
      token_url: "{{ env.LOGIN }}/oauth/token"
      client_id: cid
      client_secret: "{{ secrets.CS }}"
steps:
  - id: one
    request: {service: sf, path: "/data/1"}
    records: body
    emit: rows
  - id: two
    request: {service: sf, path: "/data/2"}
    records: body
    emit: rows
"""
    )
    result = cli("run", "flow.yaml", env={"LOGIN": login.url, "CS": CLIENT_SECRET})
    assert result.code == 0, result.stderr
    assert read_jsonl(tmp_path / "out/rows.jsonl") == [
        {"id": "1", "token": "at-1"},
        {"id": "2", "token": "at-1"},
    ]
    assert len(login_api.token_forms) == 1
    assert [r.path for r in instance.requests] == ["/data/1", "/data/2"]


def test_auth_none_and_absolute_urls_get_credentials_only_on_the_service_origin(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    async def headers(request: web.Request) -> web.Response:
        return web.json_response({"auth": request.headers.get("Authorization")})

    own_app = web.Application()
    own_app.router.add_get("/h", headers)
    other_app = web.Application()
    other_app.router.add_get("/h", headers)
    own, other = serve(own_app), serve(other_app)
    write_flow(
        """
version: 1
name: t
services:
  api: {base_url: "{{ env.OWN }}", auth: {type: bearer, token: "{{ secrets.TOKEN }}"}}
steps:
  - {id: service, request: {service: api, path: /h}, records: body, emit: rows}
  - {id: none, auth: none, request: {service: api, path: /h}, records: body, emit: rows}
  - {id: same, request: {service: api, url: "{{ env.OWN }}/h"}, records: body, emit: rows}
  - {id: other, request: {service: api, url: "{{ env.OTHER }}/h"}, records: body, emit: rows}
"""
    )
    env = {"OWN": own.url, "OTHER": other.url, "TOKEN": BEARER}
    result = cli("run", "flow.yaml", env=env)
    assert result.code == 0, result.stderr
    bearer = f"Bearer {BEARER}"
    assert read_jsonl(tmp_path / "out/rows.jsonl") == [
        {"auth": bearer},
        {"auth": None},
        {"auth": bearer},
        {"auth": None},
    ]


def test_login_step_token_through_set_secret_is_redacted(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    api = Api(expires_in=None)
    server = serve(api_app(api))
    write_flow(
        """
version: 1
name: t
services:
  api: {base_url: "{{ env.API }}", RETRY}
steps:
  - id: login
    request: {service: api, method: POST, path: /login,
              json: {username: alice, password: "{{ secrets.PW }}"}}
    set: {token: {value: body.session.token, secret: true}}
  - id: use
    request: {service: api, path: /data/1,
              headers: {Authorization: "Bearer {{ steps.login.vars.token }}"}}
    records: body
    fields: {id: id}
    emit: rows
  - id: leak
    request: {service: api, path: /echo, headers: {X-API-Key: "{{ steps.login.vars.token }}"}}
""".replace("RETRY", RETRY)
    )
    env = {"API": server.url, "PW": PASSWORD}
    result = cli("run", "flow.yaml", "-v", "--summary", "s.json", env=env)
    assert result.code == 69  # the echo's 500 after retries
    assert api.data_statuses == [200]  # the token from the login step was accepted
    assert "body:" in result.stderr  # the echoed body is shown, with the token masked
    everything = result.stdout + result.stderr + (tmp_path / "s.json").read_text()
    assert "st-1" not in everything and PASSWORD not in everything
    assert "***" in result.stderr


def test_example_oauth_login_flow_against_the_demo_api(cli: Cli, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "runner.demo_api", "--port", str(port)]
    with server_process(command, f"{url}/health", cwd=ROOT, name="demo API"):
        env = {
            "DEMO_API_URL": url,
            "DEMO_CLIENT_SECRET": "demo-secret",
            "DEMO_PASSWORD": "demo-password",
        }
        result = cli("run", str(ROOT / "flows/oauth_login.yaml"), "-v", env=env)
    assert result.code == 0, result.stderr
    assert len(read_jsonl(tmp_path / "out/events.jsonl")) == 10
    assert len(read_jsonl(tmp_path / "out/orders.jsonl")) == 5
    assert "demo-secret" not in result.stderr and "demo-password" not in result.stderr


# -- redirects ------------------------------------------------------------------------------


def test_redirects_never_carry_credentials_to_another_origin(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    async def landing(request: web.Request) -> web.Response:
        return web.json_response({"at": "other"})

    other_app = web.Application()
    other_app.router.add_get("/land", landing)
    other = serve(other_app)

    async def hop(request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        if n == 0:
            # Keeps the query: a credential parameter in it must be dropped on the way.
            raise web.HTTPFound(f"{other.url}/land?keep=1&{request.query_string}")
        raise web.HTTPFound(f"/hop/{n - 1}")

    async def loop(request: web.Request) -> web.Response:
        raise web.HTTPFound("/loop")

    own_app = web.Application()
    own_app.router.add_get("/hop/{n}", hop)
    own_app.router.add_get("/loop", loop)
    own = serve(own_app)
    write_flow(
        """
version: 1
name: t
services:
  b: {base_url: "{{ env.OWN }}", auth: {type: bearer, token: "{{ secrets.TOKEN }}"},
      headers: {Cookie: "session=c00kie"}}
  k:
    base_url: "{{ env.OWN }}"
    auth: {type: api_key, name: X-API-Key, value: "{{ secrets.KEY }}"}
  q:
    base_url: "{{ env.OWN }}"
    auth: {type: api_key, in: query, name: api_key, value: "{{ secrets.KEY }}"}
steps:
  - {id: b, request: {service: b, path: /hop/2}, records: body, emit: rows}
  - {id: k, request: {service: k, path: /hop/0}, records: body, emit: rows}
  - {id: q, request: {service: q, path: /hop/0}, records: body, emit: rows}
"""
    )
    env = {"OWN": own.url, "OTHER": other.url, "TOKEN": BEARER, "KEY": API_KEY}
    result = cli("run", "flow.yaml", env=env)
    assert result.code == 0, result.stderr
    assert read_jsonl(tmp_path / "out/rows.jsonl") == [{"at": "other"}] * 3
    # Same-origin hops kept the credentials; the other origin got none of them.
    assert all(r.headers.get("Authorization") == f"Bearer {BEARER}" for r in own.requests[:3])
    for r in other.requests:
        assert "Authorization" not in r.headers and "X-API-Key" not in r.headers
        assert "Cookie" not in r.headers
        assert r.query == {"keep": ["1"]}

    write_flow(
        """
version: 1
name: t
services:
  api: {base_url: "{{ env.OWN }}"}
steps:
  - {id: loop, request: {service: api, path: /loop}}
"""
    )
    before = len(own.requests)
    result = cli("run", "flow.yaml", env=env)
    assert result.code == 1 and "too many redirects (10)" in result.stderr
    assert len(own.requests) - before == 11


# -- TLS, plain http, proxies ---------------------------------------------------------------


@dataclass
class Certs:
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("certs")

    def make(name: str, subject: str, san: str) -> tuple[Path, Path]:
        cert, key = folder / f"{name}.pem", folder / f"{name}.key"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-keyout", str(key), "-out", str(cert), "-subj", subject, "-addext", san],
            check=True,
            capture_output=True,
        )  # fmt: skip
        return cert, key

    cert, key = make("server", "/CN=localhost", "subjectAltName=IP:127.0.0.1,DNS:localhost")
    client_cert, client_key = make("client", "/CN=runner-client", "extendedKeyUsage=clientAuth")
    return Certs(cert, key, client_cert, client_key)


@pytest.fixture
def serve_tls() -> Iterator[Callable[[web.Application, ssl.SSLContext], str]]:
    """`serve_tls(app, context)` serves `app` over https on 127.0.0.1; returns its URL."""
    stops: list[Callable[[], None]] = []

    def start(app: web.Application, context: ssl.SSLContext) -> str:
        ready = threading.Event()
        found: dict[str, Any] = {}

        def run() -> None:
            loop = asyncio.new_event_loop()
            runner = web.AppRunner(app, access_log=None)
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
            loop.run_until_complete(site.start())
            found["url"] = f"https://127.0.0.1:{runner.addresses[0][1]}"
            found["loop"] = loop
            ready.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            loop.close()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        ready.wait(10)

        def stop() -> None:
            found["loop"].call_soon_threadsafe(found["loop"].stop)
            thread.join(10)

        stops.append(stop)
        return str(found["url"])

    yield start
    for stop in stops:
        stop()


def _server_context(certs: Certs) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.cert, certs.key)
    return context


def _tls_app(plain_url: str = "") -> web.Application:
    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"tls": True})

    async def down(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"{plain_url}/plain")

    app = web.Application()
    app.router.add_get("/ok", ok)
    app.router.add_get("/down", down)
    return app


TLS_FLOW = """
version: 1
name: t
services:
  api: {base_url: "{{ env.API }}", TLS}
steps:
  - {id: a, request: {service: api, path: PATH}, records: body, emit: rows}
"""


@pytest.mark.parametrize("event_loop", EVENT_LOOPS)
def test_tls_is_verified_by_default_and_ca_file_or_verify_false_make_it_pass(
    event_loop: str,
    serve: Serve,
    serve_tls: Any,
    certs: Certs,
    cli: Cli,
    write_flow: WriteFlow,
    tmp_path: Path,
) -> None:
    plain = serve(web.Application())
    url = serve_tls(_tls_app(plain.url), _server_context(certs))
    env = {"API": url, "RUNNER_EVENT_LOOP": event_loop}

    write_flow(TLS_FLOW.replace("TLS", "tls: {}").replace("PATH", "/ok"))
    result = cli("run", "flow.yaml", "--summary", "s.json", env=env)
    assert result.code == 1
    assert "TLS certificate verification failed" in result.stderr
    assert summary_of(tmp_path)["error"]["kind"] == "security"

    for tls in (f"tls: {{ca_file: {certs.cert}}}", "tls: {verify: false}"):
        write_flow(TLS_FLOW.replace("TLS", tls).replace("PATH", "/ok"))
        result = cli("run", "flow.yaml", env=env)
        assert result.code == 0, result.stderr
        assert read_jsonl(tmp_path / "out/rows.jsonl") == [{"tls": True}]

    # https -> http is refused even towards loopback.
    write_flow(TLS_FLOW.replace("TLS", f"tls: {{ca_file: {certs.cert}}}").replace("PATH", "/down"))
    result = cli("run", "flow.yaml", "--summary", "s.json", env=env)
    assert result.code == 1 and "redirect from https to http refused" in result.stderr
    assert summary_of(tmp_path)["error"]["kind"] == "security"
    assert plain.requests == []


@pytest.mark.parametrize("event_loop", EVENT_LOOPS)
def test_default_tls_trusts_the_system_cas_from_the_first_https_request_on(
    event_loop: str,
    serve: Serve,
    serve_tls: Any,
    certs: Certs,
    cli: Cli,
    write_flow: WriteFlow,
    tmp_path: Path,
) -> None:
    # The CLI loads the system's CAs on the first https request, after a plain one here; the
    # system's CA file is the test certificate, through OpenSSL's SSL_CERT_FILE.
    async def plain_ok(request: web.Request) -> web.Response:
        return web.json_response({"tls": False})

    plain_app = web.Application()
    plain_app.router.add_get("/ok", plain_ok)
    plain = serve(plain_app)
    url = serve_tls(_tls_app(), _server_context(certs))
    write_flow(
        """
version: 1
name: t
services:
  plain: {base_url: "{{ env.PLAIN }}"}
  secure: {base_url: "{{ env.API }}"}
steps:
  - {id: a, request: {service: plain, path: /ok}, records: body, emit: rows}
  - {id: b, request: {service: secure, path: /ok}, records: body, emit: rows}
"""
    )
    env = {"PLAIN": plain.url, "API": url, "RUNNER_EVENT_LOOP": event_loop}
    result = cli("run", "flow.yaml", env={**env, "SSL_CERT_FILE": str(certs.cert)})
    assert result.code == 0, result.stderr
    assert read_jsonl(tmp_path / "out/rows.jsonl") == [{"tls": False}, {"tls": True}]

    result = cli("run", "flow.yaml", env={**env, "SSL_CERT_FILE": str(certs.client_cert)})
    assert result.code == 1
    assert "step 'b'" in result.stderr and "TLS certificate verification failed" in result.stderr


def test_the_cli_imports_aiohttp_with_default_contexts_that_trust_nothing(certs: Certs) -> None:
    # aiohttp's import-time contexts are built without the CA bundle, so they could only
    # fail a request; a context made afterwards loads the CAs as usual.
    code = """
import ssl, sys
from runner.cli import _import_aiohttp_without_loading_cas
assert "aiohttp" not in sys.modules
_import_aiohttp_without_loading_cas()
import aiohttp.connector as connector
verified = connector._SSL_CONTEXT_VERIFIED
made_after = ssl.create_default_context()
print(verified.verify_mode == ssl.CERT_REQUIRED, verified.check_hostname,
      verified.cert_store_stats()["x509_ca"], made_after.cert_store_stats()["x509_ca"])
"""
    env = {"PATH": "/usr/bin:/bin", "SSL_CERT_FILE": str(certs.cert)}
    found = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert found.stdout.split() == ["True", "True", "0", "1"]


def test_client_certificate_is_presented(
    serve_tls: Any, certs: Certs, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(certs.client_cert))
    context.load_cert_chain(certs.cert, certs.key)
    context.verify_mode = ssl.CERT_REQUIRED
    url = serve_tls(_tls_app(), context)
    tls = (
        f"tls: {{ca_file: {certs.cert}, client_cert: {certs.client_cert}, "
        f"client_key: {certs.client_key}}}"
    )
    write_flow(TLS_FLOW.replace("TLS", tls).replace("PATH", "/ok"))
    result = cli("run", "flow.yaml", env={"API": url})
    assert result.code == 0, result.stderr
    assert read_jsonl(tmp_path / "out/rows.jsonl") == [{"tls": True}]

    write_flow(TLS_FLOW.replace("TLS", f"tls: {{ca_file: {certs.cert}}}").replace("PATH", "/ok"))
    result = cli("run", "flow.yaml", env={"API": url})
    assert result.code != 0  # the server refuses a client without a certificate


def test_plain_http_to_a_remote_host_is_refused_before_any_request(
    cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    write_flow(
        """
version: 1
name: t
services:
  api: {base_url: "{{ env.API }}"}
steps:
  - {id: a, request: {service: api, path: /x}}
"""
    )
    result = cli("run", "flow.yaml", "--summary", "s.json", env={"API": "http://api.example.com"})
    assert result.code == 2 and "plain http://" in result.stderr
    assert summary_of(tmp_path)["requests"] == 0

    # A literal URL: the run refuses it too, at load.
    write_flow(
        """
version: 1
name: t
services:
  api: {base_url: "http://api.example.com"}
steps:
  - {id: a, request: {service: api, path: /x}}
"""
    )
    result = cli("run", "flow.yaml", "--summary", "s.json")
    assert result.code == 2 and "plain http://" in result.stderr
    assert summary_of(tmp_path)["requests"] == 0


def test_validate_flags_a_literal_http_url_at_its_line(cli: Cli, write_flow: WriteFlow) -> None:
    write_flow(
        """version: 1
name: t
services:
  api:
    base_url: "http://api.example.com"
steps:
  - {id: a, request: {service: api, path: /x}}
"""
    )
    result = cli("validate", "flow.yaml")
    assert result.code == 2
    assert "flow.yaml:5:5: services.api.base_url:" in result.stderr and "http://" in result.stderr


def test_allow_insecure_http_and_proxies_from_the_environment(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    async def proxied(request: web.Request) -> web.Response:
        return web.json_response({"via": "proxy", "target": str(request.url)})

    proxy_app = web.Application()
    proxy_app.router.add_route("*", "/{tail:.*}", proxied)
    proxy = serve(proxy_app)
    target = serve(web.Application())
    write_flow(
        """
version: 1
name: t
services:
  api: {base_url: "{{ env.API }}"}
steps:
  - {id: a, request: {service: api, path: /thing}, records: body, emit: rows}
"""
    )
    env = {"API": target.url, "HTTP_PROXY": proxy.url, "NO_PROXY": "", "no_proxy": ""}
    result = cli("run", "flow.yaml", env=env)
    assert result.code == 0, result.stderr
    assert read_jsonl(tmp_path / "out/rows.jsonl") == [
        {"via": "proxy", "target": f"{target.url}/thing"}
    ]
    assert target.requests == []

    # allow_insecure_http lets plain http:// go to a remote host (here, through the proxy).
    write_flow(
        """
version: 1
name: t
services:
  api: {base_url: "http://api.example.com", allow_insecure_http: true}
steps:
  - {id: a, request: {service: api, path: /thing}, records: body, emit: rows}
"""
    )
    result = cli("run", "flow.yaml", env=env)
    assert result.code == 0, result.stderr
    assert read_jsonl(tmp_path / "out/rows.jsonl") == [
        {"via": "proxy", "target": "http://api.example.com/thing"}
    ]


# -- the canary -----------------------------------------------------------------------------


CANARY = "canary-7f3a9c"
CANARY_FLOW = """
version: 1
name: canary
inputs:
  type: object
  properties: {mode: {type: string, default: echo}}
services:
  bearer: {base_url: "{{ env.API }}", auth: {type: bearer, token: "{{ secrets.CANARY }}"}, RETRY}
  basic:
    base_url: "{{ env.API }}"
    auth: {type: basic, username: u, password: "{{ secrets.CANARY }}"}
  key:
    base_url: "{{ env.API }}"
    auth: {type: api_key, name: X-API-Key, value: "{{ secrets.CANARY }}"}
    RETRY
  query:
    base_url: "{{ env.API }}"
    auth: {type: api_key, in: query, name: k, value: "{{ secrets.CANARY }}"}
    RETRY
  oauth:
    base_url: "{{ env.API }}"
    auth: {type: oauth2_client_credentials, token_url: "{{ env.API }}/oauth/token",
           client_id: cid, client_secret: "{{ secrets.CANARY }}", client_auth: body}
steps:
  - id: start
    request: {service: bearer, path: /static/bearer, query: {q: "{{ secrets.CANARY }}"},
              headers: {X-Trace: "t-{{ secrets.CANARY }}"}}
    on_status:
      - {status: 401, action: skip, message: "got {{ url }}"}
  - id: basic
    request: {service: basic, path: /static/basic}
    on_status: [{status: 401, action: skip}]
  - id: echo_key
    request: {service: key, path: /echo}
    on_status: [{status: 500, action: skip}]
  - id: echo_query
    request: {service: query, path: /echo, query: {again: "{{ secrets.CANARY }}"}}
    on_status: [{status: 500, action: skip}]
  - id: oauth
    when: "inputs.mode == 'oauth'"
    request: {service: oauth, path: /data/1, query: {c: "{{ secrets.CANARY }}"}}
  - id: last
    request: {service: key, path: /echo, query: {c: "{{ secrets.CANARY }}"}}
    on_status: [{status: 500, action: fail, message: "failed at {{ url }}: {{ body.seen }}"}]
""".replace("RETRY", RETRY)


def test_canary_secret_appears_nowhere(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    """One value planted as token, password, api key and client secret; every path that could
    print it is exercised (401s, a 500 echoing it, URLs holding it, --dry-run, JSON logs with
    -v, the summary, outputs, state); it must appear in no output, file or message."""
    api = Api()
    server = serve(api_app(api))
    write_flow(CANARY_FLOW)
    env = {"API": server.url, "CANARY": CANARY}
    runs = [
        cli("run", "flow.yaml", "--dry-run", env=env),
        cli("run", "flow.yaml", "--dry-run", env={"API": server.url}),  # secrets need not exist
        cli("run", "flow.yaml", "-v", "--log-format", "json", "--summary", "s.json",
            "--state", "state.json", env=env),
        cli("run", "flow.yaml", "-v", "--summary", "s2.json", "--input", "mode=oauth",
            "--output", "-", "--state", "state.json", env=env),
    ]  # fmt: skip
    assert [r.code for r in runs] == [0, 0, 1, 1], [r.stderr for r in runs]
    assert "t-***" in runs[0].stdout and "q=***" in runs[0].stdout
    # The echo run failed at the last step, with the echoed body and the URL in its message.
    echo = summary_of(tmp_path)
    assert echo["error"]["step"] == "last" and echo["error"]["status"] == 500
    assert "failed at" in echo["error"]["message"] and "***" in echo["error"]["message"]
    for line in runs[2].stderr.splitlines():
        json.loads(line)  # --log-format json: one object a line
    # The oauth run failed on the token request: the canary is a wrong client secret.
    oauth = summary_of(tmp_path, "s2.json")
    assert oauth["error"]["step"] == "oauth" and oauth["error"]["status"] == 401
    assert "token request failed: 401" in runs[3].stderr
    # The server did receive the canary in every place: the flow exercised every path.
    sent = json.dumps([[r.headers, r.query, r.body.decode()] for r in server.requests])
    for where in ("Bearer " + CANARY, f'"X-API-Key": "{CANARY}"', "client_secret=" + CANARY):
        assert where in sent
    texts = {f"run {i}": r.stdout + r.stderr for i, r in enumerate(runs)}
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.name != "flow.yaml":
            texts[str(path.relative_to(tmp_path))] = path.read_text(errors="replace")
    assert "s.json" in texts and "s2.json" in texts and "out/manifest.json" not in texts
    assert [name for name, text in texts.items() if CANARY in text] == []


def test_netrc_credentials_are_never_added(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    """aiohttp's trust_env would add ~/.netrc Basic credentials to a request without
    Authorization (an `auth: none` step) and crash on one with it; proxies stay honoured."""
    server = serve(api_app(Api()))
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login nuser password npass-123\n")
    netrc.chmod(0o600)
    write_flow(
        """
version: 1
name: t
services:
  api: {base_url: "{{ env.API }}", auth: {type: bearer, token: "{{ secrets.TOKEN }}"}, RETRY}
steps:
  - {id: a, request: {service: api, path: /static/bearer}, records: body, emit: rows}
  - id: b
    auth: none
    request: {service: api, path: /echo}
    on_status: [{status: 500, action: skip}]
""".replace("RETRY", RETRY)
    )
    env = {"API": server.url, "TOKEN": BEARER, "NETRC": str(netrc)}
    result = cli("run", "flow.yaml", env=env)
    assert result.code == 0, result.stderr
    assert [(r.path, r.headers.get("Authorization")) for r in server.requests] == [
        ("/static/bearer", f"Bearer {BEARER}"),
        ("/echo", None),
        ("/echo", None),
    ]
