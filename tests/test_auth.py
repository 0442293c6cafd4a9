"""Auth strategies against a real local authorization server and protected resource."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

import pytest
from aiohttp import web

from runner.auth import ServiceAuth
from runner.clock import SystemClock
from runner.errors import DecodeError, RunError, UnavailableError, UsageError
from runner.http import PreparedRequest, RetryPolicy, ServiceClient, Stats, Timeouts
from runner.redact import Redactor

CLIENT_ID = "client one"
CLIENT_SECRET = "s3cret:&+/value"  # needs form-urlencoding inside client_secret_basic
API_KEY = "key-0123456789"
STATIC_TOKEN = "static-bearer-token"
USER, PASSWORD = "alice", "pa:ss word"
FAST_RETRY = RetryPolicy(max_attempts=3, initial_delay=0.01, max_delay=0.02)
TIMEOUTS = Timeouts(connect=5, read=5, total=10)


@dataclass
class AuthServer:
    """State of the fake authorization server, readable and changeable by the tests."""

    base_url: str = ""
    expires_in: float = 2.0
    token_status: int = 200  # anything else: the token endpoint fails with it
    token_delay: float = 0.0
    token_requests: int = 0
    login_requests: int = 0
    resource_401s: int = 0
    login_body: bytes | None = None  # replaces the JSON login response
    token_forms: list[dict[str, str]] = field(default_factory=list)
    token_auth_headers: list[str | None] = field(default_factory=list)
    tokens: dict[str, float | None] = field(default_factory=dict)  # token -> expiry (loop time)
    refresh_tokens: set[str] = field(default_factory=lambda: {"rt-0"})
    seen_credentials: list[str] = field(default_factory=list)
    counter: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def issue(self, prefix: str, expires_in: float | None) -> str:
        token = f"{prefix}-{next(self.counter)}"
        now = asyncio.get_running_loop().time()
        self.tokens[token] = None if expires_in is None else now + expires_in
        return token

    def valid(self, token: str | None) -> bool:
        if token is None or token not in self.tokens:
            return False
        expiry = self.tokens[token]
        return expiry is None or asyncio.get_running_loop().time() < expiry

    def revoke_all(self) -> None:
        self.tokens.clear()


def _client_of(request: web.Request, form: dict[str, str]) -> tuple[str | None, str | None]:
    header = request.headers.get("Authorization")
    if header is not None and header.startswith("Basic "):
        raw_id, _, raw_secret = base64.b64decode(header[6:]).decode().partition(":")
        return unquote_plus(raw_id), unquote_plus(raw_secret)
    return form.get("client_id"), form.get("client_secret")


def _app(state: AuthServer) -> web.Application:
    async def token(request: web.Request) -> web.Response:
        state.token_requests += 1
        form = {k: str(v) for k, v in (await request.post()).items()}
        state.token_forms.append(form)
        state.token_auth_headers.append(request.headers.get("Authorization"))
        if state.token_delay:
            await asyncio.sleep(state.token_delay)
        if state.token_status != 200:
            return web.json_response({"error": "unavailable"}, status=state.token_status)
        client_id, client_secret = _client_of(request, form)
        if client_id != CLIENT_ID or client_secret != CLIENT_SECRET:
            # Echoes the secret it got, as careless servers do: it must be redacted.
            detail = {"error": "invalid_client", "detail": f"bad secret {client_secret}"}
            return web.json_response(detail, status=401)
        body: dict[str, Any] = {"token_type": "bearer", "expires_in": state.expires_in}
        if form.get("grant_type") == "client_credentials":
            body["scope"] = form.get("scope", "")
        elif form.get("grant_type") == "refresh_token":
            old = form.get("refresh_token", "")
            if old not in state.refresh_tokens:
                return web.json_response({"error": "invalid_grant"}, status=400)
            state.refresh_tokens.discard(old)  # rotation: the old one is spent
            new = f"rt-{next(state.counter)}"
            state.refresh_tokens.add(new)
            body["refresh_token"] = new
        else:
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        body["access_token"] = state.issue("at", state.expires_in)
        return web.json_response(body)

    async def login(request: web.Request) -> web.Response:
        state.login_requests += 1
        if state.login_body is not None:
            return web.Response(body=state.login_body, content_type="text/html")
        data = await request.json()
        if data != {"user": USER, "password": PASSWORD}:
            return web.json_response({"error": "bad login"}, status=403)
        session = state.issue("sess", None)
        return web.json_response({"data": {"session": session}}, headers={"X-Req": "1"})

    async def resource(request: web.Request) -> web.Response:
        found: str | None = None
        authorization = request.headers.get("Authorization", "")
        if authorization.startswith("Bearer "):
            token = authorization[7:]
            if state.valid(token) or token == STATIC_TOKEN:
                found = token
        elif authorization == "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode():
            found = "basic"
        for candidate in (
            request.headers.get("X-API-Key"),
            request.query.get("api_key"),
            request.cookies.get("api_key"),
        ):
            if candidate == API_KEY:
                found = "api_key"
        for candidate in (
            request.headers.get("X-Session"),
            request.query.get("sid"),
            request.cookies.get("sid"),
        ):
            if state.valid(candidate):
                found = candidate
        if found is None:
            state.resource_401s += 1
            return web.json_response({"error": "unauthorized"}, status=401)
        state.seen_credentials.append(found)
        return web.json_response({"ok": True, "credential": found})

    app = web.Application()
    app.router.add_post("/oauth/token", token)
    app.router.add_post("/api/login", login)
    app.router.add_get("/api/resource", resource)
    return app


@pytest.fixture
async def server() -> AsyncIterator[AuthServer]:
    state = AuthServer()
    runner = web.AppRunner(_app(state))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    state.base_url = f"http://127.0.0.1:{port}"
    yield state
    await runner.cleanup()


class FakeStore:
    def __init__(self, saved: str | None = None) -> None:
        self.saved = saved
        self.writes: list[str] = []

    def refresh_token(self, service: str) -> str | None:
        assert service == "api"
        return self.saved

    def save_refresh_token(self, service: str, token: str) -> None:
        assert service == "api"
        self.saved = token
        self.writes.append(token)


@dataclass
class Harness:
    """A service client for the protected resource, and the auth under test."""

    auth: ServiceAuth
    client: ServiceClient
    stats: Stats
    redactor: Redactor
    base_url: str

    async def get(self, config: dict[str, Any]) -> dict[str, Any]:
        authorize = self.auth.authorizer(config, self.base_url)
        request = PreparedRequest("GET", self.base_url.rstrip("/") + "/api/resource")
        response = await self.client.send(
            request,
            retry=FAST_RETRY,
            timeouts=TIMEOUTS,
            max_body_bytes=1 << 20,
            authorize=authorize,
        )
        assert response.status == 200, response.body
        body: dict[str, Any] = json.loads(response.body)
        return body


@contextlib.asynccontextmanager
async def harness(server: AuthServer, store: FakeStore | None = None) -> AsyncIterator[Harness]:
    stats, redactor = Stats(), Redactor()
    auth = ServiceAuth(
        "api",
        stats=stats,
        redactor=redactor,
        refresh_token_store=store,
        retry=FAST_RETRY,
        timeouts=TIMEOUTS,
    )
    client = ServiceClient("api", stats=stats, redactor=redactor)
    try:
        yield Harness(auth, client, stats, redactor, server.base_url + "/")
    finally:
        await auth.close()
        await client.close()


def client_credentials(server: AuthServer, **extra: Any) -> dict[str, Any]:
    return {
        "type": "oauth2_client_credentials",
        "token_url": server.base_url + "/oauth/token",
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        **extra,
    }


def session_config(**extra: Any) -> dict[str, Any]:
    return {
        "type": "session",
        "request": {"path": "/api/login", "json": {"user": USER, "password": PASSWORD}},
        "token": "body.data.session",
        **extra,
    }


# -- static credentials --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "credential"),
    [
        ({"type": "basic", "username": USER, "password": PASSWORD}, "basic"),
        ({"type": "bearer", "token": STATIC_TOKEN}, STATIC_TOKEN),
        ({"type": "api_key", "in": "header", "name": "X-API-Key", "value": API_KEY}, "api_key"),
        ({"type": "api_key", "in": "query", "name": "api_key", "value": API_KEY}, "api_key"),
        ({"type": "api_key", "in": "cookie", "name": "api_key", "value": API_KEY}, "api_key"),
    ],
)
async def test_static_credentials_are_accepted(
    server: AuthServer, config: dict[str, Any], credential: str
) -> None:
    async with harness(server) as h:
        assert (await h.get(config))["credential"] == credential
        assert await h.auth.authorizer(config, None).refresh(PreparedRequest("GET", "x")) is False
        assert h.auth.token_response is None
    assert server.token_requests == 0


async def test_static_credentials_are_marked_sensitive_and_redacted() -> None:
    redactor = Redactor()
    auth = ServiceAuth("api", stats=Stats(), redactor=redactor)
    original = PreparedRequest("GET", "https://api.example/x", query=[("api_key", "old")])
    header = auth.authorizer(
        {"type": "api_key", "in": "header", "name": "X-API-Key", "value": API_KEY}, None
    )
    sent = await header.apply(original)
    assert sent.headers == {"X-API-Key": API_KEY}
    assert sent.sensitive_headers == {"X-API-Key"}
    assert original.headers == {}  # a copy, the original untouched
    query = auth.authorizer(
        {"type": "api_key", "in": "query", "name": "api_key", "value": API_KEY}, None
    )
    sent = await query.apply(await query.apply(original))  # idempotent: replaced, not repeated
    assert sent.query == [("api_key", API_KEY)]
    assert sent.sensitive_query == {"api_key"}
    basic = auth.authorizer({"type": "basic", "username": USER}, None)  # password optional
    sent = await basic.apply(original)
    encoded = base64.b64encode(f"{USER}:".encode()).decode()
    assert sent.headers["Authorization"] == f"Basic {encoded}"
    auth.authorizer({"type": "basic", "username": USER, "password": PASSWORD}, None)
    full = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert redactor.redact(f"{API_KEY} {PASSWORD} {full} {USER}") == f"*** *** *** {USER}"
    await auth.close()


async def test_same_config_gets_the_same_authorizer() -> None:
    auth = ServiceAuth("api", stats=Stats(), redactor=Redactor())
    first = auth.authorizer({"type": "bearer", "token": "abc"}, None)
    assert auth.authorizer({"type": "bearer", "token": "abc"}, None) is first
    assert auth.authorizer({"type": "bearer", "token": "xyz"}, None) is not first
    with pytest.raises(UsageError, match="unknown auth type"):
        auth.authorizer({"type": "kerberos"}, None)
    with pytest.raises(UsageError, match="token is required"):
        auth.authorizer({"type": "bearer"}, None)
    await auth.close()


# -- OAuth2 client credentials -------------------------------------------------------------


@pytest.mark.parametrize("client_auth", ["basic", "body"])
async def test_client_credentials(server: AuthServer, client_auth: str) -> None:
    config = client_credentials(
        server,
        client_auth=client_auth,
        scope=["read", "write"],
        audience="https://api.example",
        params={"resource": "crm", "debug": True, "unset": None},
    )
    async with harness(server) as h:
        body = await h.get(config)
        assert body["credential"].startswith("at-")
        await h.get(config)
        assert h.auth.token_response is not None
        assert h.auth.token_response["access_token"] == body["credential"]
        assert h.auth.token_response["scope"] == "read write"
        # Token requests count as requests: one token request and two resource requests.
        assert h.stats.requests == 3
        for secret in (CLIENT_SECRET, body["credential"]):
            assert h.redactor.redact(f"x {secret} y") == "x *** y"
    assert server.token_requests == 1
    form = server.token_forms[0]
    assert form["grant_type"] == "client_credentials"
    assert form["scope"] == "read write"
    assert form["audience"] == "https://api.example"
    assert form["resource"] == "crm" and form["debug"] == "true" and "unset" not in form
    header = server.token_auth_headers[0]
    if client_auth == "basic":
        assert header is not None and header.startswith("Basic ")
        assert "client_secret" not in form
    else:
        assert header is None
        assert form["client_id"] == CLIENT_ID and form["client_secret"] == CLIENT_SECRET


async def test_concurrent_requests_share_one_token_request(server: AuthServer) -> None:
    server.token_delay = 0.1
    config = client_credentials(server)
    async with harness(server) as h:
        bodies = await asyncio.gather(*(h.get(config) for _ in range(20)))
    assert server.token_requests == 1
    assert len({b["credential"] for b in bodies}) == 1


async def test_token_is_renewed_before_it_expires(server: AuthServer) -> None:
    config = client_credentials(server)  # expires_in 2 s: renewed after 1.8 s
    async with harness(server) as h:
        first = (await h.get(config))["credential"]
        await asyncio.sleep(2.1)
        second = (await h.get(config))["credential"]
    assert first != second
    assert server.token_requests == 2
    assert server.resource_401s == 0  # renewed in advance, not after a rejection


class MonotonicAt(SystemClock):
    """The system's clock, but its monotonic time is the test's `now[0]`."""

    def __init__(self, now: list[float]) -> None:
        self._now = now

    def monotonic(self) -> float:
        return self._now[0]


async def test_refresh_margin_with_a_fake_clock(server: AuthServer) -> None:
    server.expires_in = 100  # margin: min(30, 10) = 10 s
    now = [1000.0]
    stats, redactor = Stats(), Redactor()
    auth = ServiceAuth("api", stats=stats, redactor=redactor, clock=MonotonicAt(now))
    authorize = auth.authorizer(client_credentials(server), None)
    request = PreparedRequest("GET", "https://api.example/x")
    try:
        first = (await authorize.apply(request)).headers["Authorization"]
        now[0] += 89.9
        assert (await authorize.apply(request)).headers["Authorization"] == first
        assert server.token_requests == 1
        server.expires_in = 1000  # the next token's margin: min(30, 100) = 30 s
        now[0] += 0.1
        assert (await authorize.apply(request)).headers["Authorization"] != first
        assert server.token_requests == 2
        now[0] += 969.9
        await authorize.apply(request)
        assert server.token_requests == 2
        now[0] += 0.1
        await authorize.apply(request)
        assert server.token_requests == 3
    finally:
        await auth.close()


async def test_revoked_token_is_refreshed_once_on_401(server: AuthServer) -> None:
    server.expires_in = 3600
    config = client_credentials(server)
    async with harness(server) as h:
        first = (await h.get(config))["credential"]
        server.revoke_all()
        second = (await h.get(config))["credential"]
    assert first != second
    assert server.resource_401s == 1
    assert server.token_requests == 2


async def test_concurrent_401s_share_one_refresh(server: AuthServer) -> None:
    server.expires_in = 3600
    server.token_delay = 0.05
    config = client_credentials(server)
    async with harness(server) as h:
        await h.get(config)
        server.revoke_all()
        bodies = await asyncio.gather(*(h.get(config) for _ in range(10)))
    assert len({b["credential"] for b in bodies}) == 1
    assert server.token_requests == 2


async def test_wrong_client_secret_fails_the_run_without_showing_it(server: AuthServer) -> None:
    wrong = "wrong-secret-value"
    async with harness(server) as h:
        with pytest.raises(RunError) as caught:
            await h.get(client_credentials(server, client_secret=wrong))
    error = caught.value
    assert type(error) is RunError and error.exit_code == 1
    assert error.status == 401
    assert "token request failed: 401 Unauthorized" in str(error)
    assert server.base_url + "/oauth/token" in str(error)
    assert "invalid_client" in str(error)  # the body excerpt is shown...
    basic = base64.b64encode(f"client+one:{wrong}".encode()).decode()
    for shown in (str(error), repr(error.as_dict()), str(error.body)):
        assert wrong not in shown and basic not in shown  # ...with the echoed secret masked
    assert server.token_requests == 1  # a 4xx is not retried


async def test_token_endpoint_5xx_is_retried_then_unavailable(server: AuthServer) -> None:
    server.token_status = 503
    async with harness(server) as h:
        with pytest.raises(UnavailableError) as caught:
            await h.get(client_credentials(server))
    assert caught.value.exit_code == 69
    assert caught.value.status == 503
    assert server.token_requests == FAST_RETRY.max_attempts
    assert h.stats.requests == FAST_RETRY.max_attempts
    assert server.resource_401s == 0  # nothing was sent without a token


async def test_non_json_token_response_is_a_decode_error(server: AuthServer) -> None:
    async with harness(server) as h:
        config = {**session_config(), "token": "body.token"}
        server.login_body = b"<html>login page</html>"
        with pytest.raises(DecodeError, match="login response is not JSON") as caught:
            await h.get(config)
    assert caught.value.url == server.base_url + "/api/login"
    assert caught.value.exit_code == 1


# -- OAuth2 refresh token ------------------------------------------------------------------


async def test_refresh_token_rotation_is_saved_at_once_and_used(server: AuthServer) -> None:
    server.expires_in = 3600
    store = FakeStore()
    config = {
        "type": "oauth2_refresh_token",
        "token_url": server.base_url + "/oauth/token",
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "refresh_token": "rt-0",
    }
    async with harness(server, store) as h:
        await h.get(config)
        assert server.token_forms[0]["refresh_token"] == "rt-0"
        assert store.writes == list(server.refresh_tokens)  # the one the server now accepts
        rotated = store.writes[0]
        assert h.redactor.redact(rotated) == "***"
        server.revoke_all()  # the access token dies: the rotated refresh token is used
        await h.get(config)
        assert server.token_forms[1]["refresh_token"] == rotated
        assert len(store.writes) == 2
    # The next run starts from the saved token: the configured "rt-0" is spent.
    async with harness(server, store) as h:
        await h.get(config)
        assert server.token_forms[2]["refresh_token"] == store.writes[1]
    assert server.token_requests == 3
    assert server.refresh_tokens == {store.saved}


async def test_refresh_token_needs_a_store() -> None:
    auth = ServiceAuth("api", stats=Stats(), redactor=Redactor())
    config = {"type": "oauth2_refresh_token", "token_url": "https://x/t", "refresh_token": "r"}
    with pytest.raises(UsageError, match="needs --state") as caught:
        auth.authorizer(config, None)
    assert caught.value.exit_code == 2
    await auth.close()


# -- session login -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "placement",
    [
        {"in": "header", "name": "X-Session"},
        {"in": "query", "name": "sid"},
        {"in": "cookie", "name": "sid"},
        {"prefix": "Bearer "},  # the default: header Authorization
    ],
)
async def test_session_login(server: AuthServer, placement: dict[str, str]) -> None:
    config = session_config(**placement)
    async with harness(server) as h:
        first = (await h.get(config))["credential"]
        assert first.startswith("sess-")
        assert (await h.get(config))["credential"] == first
        assert h.auth.token_response == {"data": {"session": first}}
        assert h.redactor.redact(first) == "***"
        server.revoke_all()  # the session ends: one new login, then the call succeeds
        second = (await h.get(config))["credential"]
    assert second != first
    assert server.login_requests == 2
    assert server.resource_401s == 1


async def test_session_token_from_a_header_and_a_missing_token(server: AuthServer) -> None:
    async with harness(server) as h:
        config = session_config(token='headers."x-req"', **{"in": "header", "name": "X-Session"})
        authorize = h.auth.authorizer(config, h.base_url)
        sent = await authorize.apply(PreparedRequest("GET", "https://x/"))
        assert sent.headers["X-Session"] == "1"
        missing = session_config(token="body.nothing")
        with pytest.raises(RunError, match=r"'body\.nothing' gave null") as caught:
            await h.get(missing)
    assert caught.value.url == server.base_url + "/api/login"


async def test_failed_login_fails_the_run(server: AuthServer) -> None:
    config = session_config()
    config["request"] = {"path": "/api/login", "json": {"user": USER, "password": "wrong"}}
    async with harness(server) as h:
        with pytest.raises(RunError, match="session login failed: 403 Forbidden") as caught:
            await h.get(config)
    assert type(caught.value) is RunError and caught.value.exit_code == 1
    assert caught.value.url == server.base_url + "/api/login"
    assert server.login_requests == 1


# -- against a third-party mock server -----------------------------------------------------

MOCK_SERVER_SCRIPT = """
import { createRequire } from "node:module";
import { pathToFileURL } from "node:url";
const require = createRequire(process.argv[2] + "/package.json");
const { OAuth2Server } = await import(pathToFileURL(require.resolve("oauth2-mock-server")).href);
const server = new OAuth2Server();
await server.issuer.keys.generate("RS256");
await server.start(0, "127.0.0.1");
console.log(server.issuer.url);
"""


@pytest.fixture(scope="session")
def oauth2_mock_server_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with node_modules/oauth2-mock-server: $OAUTH2_MOCK_SERVER_DIR, else npm installs."""
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    given = os.environ.get("OAUTH2_MOCK_SERVER_DIR")
    folder = Path(given) if given else tmp_path_factory.mktemp("oauth2-mock-server")
    if not (folder / "node_modules" / "oauth2-mock-server").is_dir():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("npm is not installed")
        try:
            subprocess.run(
                [
                    npm,
                    "install",
                    "--no-audit",
                    "--no-fund",
                    "--prefix",
                    str(folder),
                    "oauth2-mock-server@9.3.0",
                ],
                check=True,
                capture_output=True,
                timeout=120,
            )
        except (subprocess.SubprocessError, OSError) as exc:
            pytest.skip(f"oauth2-mock-server could not be installed: {exc}")
    return folder


async def test_client_credentials_from_oauth2_mock_server(
    oauth2_mock_server_dir: Path, tmp_path: Path
) -> None:
    script = tmp_path / "server.mjs"
    script.write_text(MOCK_SERVER_SCRIPT)
    process = await asyncio.create_subprocess_exec(
        "node",
        str(script),
        str(oauth2_mock_server_dir),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), timeout=20)
        issuer = line.decode().strip()
        if not issuer.startswith("http"):
            pytest.skip("oauth2-mock-server did not start")
        stats, redactor = Stats(), Redactor()
        auth = ServiceAuth("idp", stats=stats, redactor=redactor, retry=FAST_RETRY)
        config = {
            "type": "oauth2_client_credentials",
            "token_url": issuer + "/token",
            "client_id": "runner",
            "client_secret": "runner-secret",
            "scope": "read",
        }
        try:
            sent = await auth.authorizer(config, None).apply(PreparedRequest("GET", issuer))
        finally:
            await auth.close()
        token = sent.headers["Authorization"].removeprefix("Bearer ")
        assert token.count(".") == 2  # a JWT
        payload = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
        assert payload["scope"] == "read"
        assert auth.token_response is not None
        assert auth.token_response["token_type"] == "Bearer"
        assert redactor.redact(token) == "***"
        assert stats.requests == 1
    finally:
        process.terminate()
        await process.wait()
