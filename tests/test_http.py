"""runner.http against real local servers: retries, timeouts, redirects, limits, auth refresh."""

from __future__ import annotations

import asyncio
import gzip
import json
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from runner.clock import SystemClock
from runner.errors import DecodeError, RenderError, RunError, SecurityError, UnavailableError
from runner.http import (
    PreparedRequest,
    RateLimit,
    RetryPolicy,
    ServiceClient,
    SlidingWindow,
    Stats,
    Timeouts,
    TransportError,
    backoff_delay,
    build_url,
    encode_multipart,
    encode_query,
    is_loopback,
    origin,
    rate_limit_wait,
    redirect_request,
    retry_after_seconds,
)
from runner.redact import Redactor

FAST = RetryPolicy(max_attempts=3, initial_delay=0.01, max_delay=0.05)
TIMEOUTS = Timeouts(connect=2, read=5, total=10)
MB = 1024 * 1024

Serve = Callable[[web.Application], Awaitable[str]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Starts aiohttp apps on 127.0.0.1, port 0; returns each one's base URL."""
    runners: list[web.AppRunner] = []

    async def start(app: web.Application) -> str:
        app_runner = web.AppRunner(app)
        await app_runner.setup()
        await web.TCPSite(app_runner, "127.0.0.1", 0).start()
        runners.append(app_runner)
        host, port = app_runner.addresses[0][:2]
        return f"http://{host}:{port}"

    yield start
    for app_runner in runners:
        await app_runner.cleanup()


RawHandler = Callable[[int, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[RawHandler], Awaitable[str]]]:
    """A bare TCP server for broken HTTP (cut bodies, stalls); handlers get the connection count."""
    servers: list[asyncio.Server] = []

    async def start(handler: RawHandler) -> str:
        count = 0

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal count
            count += 1
            await reader.readuntil(b"\r\n\r\n")
            try:
                await handler(count, reader, writer)
            finally:
                writer.close()

        server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def make_client() -> AsyncIterator[Callable[..., ServiceClient]]:
    clients: list[ServiceClient] = []

    def make(**kwargs: Any) -> ServiceClient:
        kwargs.setdefault("stats", Stats())
        kwargs.setdefault("redactor", Redactor())
        client = ServiceClient("api", **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


class SleepRecorder(SystemClock):
    """The system's clock, but its sleep is the test's."""

    def __init__(self, sleep: Callable[[float], Awaitable[None]]) -> None:
        self._record = sleep

    async def sleep(self, seconds: float) -> None:
        await self._record(seconds)


async def send(
    client: ServiceClient,
    request: PreparedRequest,
    retry: RetryPolicy = FAST,
    **kwargs: Any,
) -> Any:
    kwargs.setdefault("timeouts", TIMEOUTS)
    kwargs.setdefault("max_body_bytes", 10 * MB)
    return await client.send(request, retry=retry, **kwargs)


def get(url: str, **kwargs: Any) -> PreparedRequest:
    return PreparedRequest(method=kwargs.pop("method", "GET"), url=url, **kwargs)


def flaky_app(
    fail_times: int, status: int = 503, headers: dict[str, str] | None = None
) -> tuple[web.Application, list[float]]:
    """Answers `status` `fail_times` times, then 200; records when each request arrived."""
    arrivals: list[float] = []

    async def handler(request: web.Request) -> web.Response:
        arrivals.append(time.monotonic())
        if len(arrivals) <= fail_times:
            return web.Response(status=status, headers=headers or {}, text="busy")
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/x", handler)
    return app, arrivals


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# ---------------------------------------------------------------- retries


async def test_retries_503_then_200(
    serve: Serve, make_client: Callable[..., ServiceClient]
) -> None:
    app, arrivals = flaky_app(2)
    base = await serve(app)
    client = make_client()
    response = await send(client, get(base + "/x"))
    assert (response.status, response.body, response.attempts) == (200, b'{"ok": true}', 3)
    assert len(arrivals) == 3
    assert client.stats.requests == 3 and client.stats.retries == 2
    assert client.stats.status_counts == {"503": 2, "200": 1}
    assert response.url == base + "/x"


async def test_last_retryable_status_is_returned(
    serve: Serve, make_client: Callable[..., ServiceClient]
) -> None:
    app, arrivals = flaky_app(99, status=502)
    client = make_client()
    response = await send(client, get(await serve(app) + "/x"))
    assert (response.status, response.attempts, len(arrivals)) == (502, 3, 3)


async def test_backoff_waits_are_full_jitter(
    serve: Serve, make_client: Callable[..., ServiceClient]
) -> None:
    app, _ = flaky_app(99)
    waits: list[float] = []

    async def recording_sleep(seconds: float) -> None:
        waits.append(seconds)

    client = make_client(clock=SleepRecorder(recording_sleep))
    policy = RetryPolicy(max_attempts=4, initial_delay=1.0, multiplier=3.0, max_delay=5.0)
    response = await send(client, get(await serve(app) + "/x"), policy)
    assert response.attempts == 4
    assert len(waits) == 3
    for wait, ceiling in zip(waits, [1.0, 3.0, 5.0], strict=True):
        assert 0 <= wait <= ceiling


async def test_continuation_shares_the_attempt_count(
    serve: Serve, make_client: Callable[..., ServiceClient]
) -> None:
    app, arrivals = flaky_app(99)
    waits: list[float] = []

    async def recording_sleep(seconds: float) -> None:
        waits.append(seconds)

    client = make_client(clock=SleepRecorder(recording_sleep))
    policy = RetryPolicy(max_attempts=4, initial_delay=0.01)
    response = await send(
        client, get(await serve(app) + "/x"), policy, first_attempt=3, initial_wait=7.0
    )
    assert (response.status, response.attempts, len(arrivals)) == (503, 4, 2)
    assert waits[0] == 7.0
    assert client.stats.retries == 2  # both sends of this call are resends


async def test_retry_after_seconds_honoured(
    serve: Serve, make_client: Callable[..., ServiceClient]
) -> None:
    app, arrivals = flaky_app(1, headers={"Retry-After": "1"})
    client = make_client()
    response = await send(client, get(await serve(app) + "/x"))
    assert response.status == 200
    assert arrivals[1] - arrivals[0] >= 0.95


async def test_retry_after_http_date_honoured(
    serve: Serve, make_client: Callable[..., ServiceClient]
) -> None:
    # HTTP dates have whole seconds: 1.6 s ahead waits between 0.6 and 1.6 s.
    app, arrivals = flaky_app(
        1, headers={"Retry-After": formatdate(time.time() + 1.6, usegmt=True)}
    )
    client = make_client()
    response = await send(client, get(await serve(app) + "/x"))
    assert response.status == 200
    assert 0.55 <= arrivals[1] - arrivals[0] <= 2.0


async def test_retry_after_above_max_fails_at_once(
    serve: Serve, make_client: Callable[..., ServiceClient]
) -> None:
    app, arrivals = flaky_app(99, status=429, headers={"Retry-After": "500"})
    client = make_client()
    started = time.monotonic()
    with pytest.raises(UnavailableError) as caught:
        await send(client, get(await serve(app) + "/x"))
    assert time.monotonic() - started < 1
    assert len(arrivals) == 1
    error = caught.value
    assert error.message == "Retry-After of 500 s exceeds max_retry_after (120 s)"
    assert (error.status, error.method, error.attempts) == (429, "GET", 1)
    assert error.url is not None and error.url.endswith("/x")
    assert error.exit_code == 69


@pytest.mark.parametrize(
    ("kwargs", "headers", "expected_sends"),
    [
        ({}, {}, 1),
        ({"retry_unsafe": True}, {}, 3),
        ({}, {"idempotency-key": "k-1"}, 3),
    ],
    ids=["post-not-retried", "retry-unsafe", "idempotency-key"],
)
async def test_post_retried_only_when_safe(
    serve: Serve,
    make_client: Callable[..., ServiceClient],
    kwargs: dict[str, Any],
    headers: dict[str, str],
    expected_sends: int,
) -> None:
    app, arrivals = flaky_app(99)
    client = make_client()
    request = get(await serve(app) + "/x", method="POST", body=b"{}", headers=headers)
    response = await send(client, request, **kwargs)
    assert response.status == 503
    assert len(arrivals) == expected_sends == response.attempts


async def test_connection_refused_raises_after_max_attempts(
    make_client: Callable[..., ServiceClient],
) -> None:
    client = make_client()
    url = f"http://127.0.0.1:{free_port()}/x"
    with pytest.raises(TransportError) as caught:
        await send(client, get(url))
    error = caught.value
    assert error.attempts == 3
    assert "cannot connect" in error.message
    assert (error.method, error.url, error.exit_code) == ("GET", url, 69)
    assert client.stats.requests == 3 and client.stats.retries == 2


async def test_post_transport_failure_is_not_retried(
    make_client: Callable[..., ServiceClient],
) -> None:
    client = make_client()
    with pytest.raises(TransportError) as caught:
        await send(client, get(f"http://127.0.0.1:{free_port()}/x", method="POST"))
    assert caught.value.attempts == 1
    assert client.stats.requests == 1


async def test_error_url_is_redacted(make_client: Callable[..., ServiceClient]) -> None:
    redactor = Redactor()
    redactor.add("sekret-key")
    client = make_client(redactor=redactor)
    request = get(f"http://127.0.0.1:{free_port()}/x", query=[("api_key", "sekret-key")])
    with pytest.raises(TransportError) as caught:
        await send(client, request, RetryPolicy(max_attempts=1))
    assert caught.value.url is not None
    assert "sekret" not in caught.value.url and "api_key=***" in caught.value.url
    assert "sekret" not in str(caught.value)


async def test_stall_after_headers_hits_read_timeout(
    raw_server: Callable[[RawHandler], Awaitable[str]],
    make_client: Callable[..., ServiceClient],
) -> None:
    connections: list[int] = []

    async def stall(n: int, _r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(n)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await writer.drain()
        await asyncio.sleep(3)

    base = await raw_server(stall)
    client = make_client()
    started = time.monotonic()
    with pytest.raises(TransportError) as caught:
        await send(
            client,
            get(base + "/x"),
            RetryPolicy(max_attempts=2, initial_delay=0.01),
            timeouts=Timeouts(connect=1, read=0.2, total=30),
        )
    assert time.monotonic() - started < 2
    assert caught.value.message == "timed out after 0.2 s waiting for data (read timeout)"
    assert caught.value.attempts == 2 and len(connections) == 2


async def test_truncated_body_is_retried(
    raw_server: Callable[[RawHandler], Awaitable[str]],
    make_client: Callable[..., ServiceClient],
) -> None:
    async def cut_once(n: int, _r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if n == 1:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nwhole")
        await writer.drain()

    client = make_client()
    response = await send(client, get(await raw_server(cut_once) + "/x"))
    assert (response.status, response.body, response.attempts) == (200, b"whole", 2)


async def test_truncated_body_fails_after_attempts(
    raw_server: Callable[[RawHandler], Awaitable[str]],
    make_client: Callable[..., ServiceClient],
) -> None:
    async def cut(n: int, _r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await writer.drain()

    client = make_client()
    with pytest.raises(TransportError) as caught:
        await send(client, get(await raw_server(cut) + "/x"))
    assert caught.value.message.startswith("response body cut short")
    assert caught.value.attempts == 3


# ---------------------------------------------------------------- bodies and headers


async def gzip_app() -> web.Application:
    async def small(request: web.Request) -> web.Response:
        body = gzip.compress(b'{"hello": "world"}')
        return web.Response(
            body=body, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
        )

    async def bomb(request: web.Request) -> web.Response:
        body = gzip.compress(b"\0" * (20 * MB), compresslevel=9)
        return web.Response(body=body, headers={"Content-Encoding": "gzip"})

    async def links(request: web.Request) -> web.Response:
        response = web.Response(text="x")
        response.headers.add("Link", '<https://a/2>; rel="next"')
        response.headers.add("Link", '<https://a/9>; rel="last"')
        response.headers["X-Custom"] = "v"
        return response

    app = web.Application()
    app.router.add_get("/small", small)
    app.router.add_get("/bomb", bomb)
    app.router.add_get("/links", links)
    return app


async def test_gzip_is_decoded(serve: Serve, make_client: Callable[..., ServiceClient]) -> None:
    client = make_client()
    response = await send(client, get(await serve(await gzip_app()) + "/small"))
    assert response.body == b'{"hello": "world"}'
    assert response.content_type == "application/json"


async def test_max_body_bytes_counts_decompressed_bytes(
    serve: Serve, make_client: Callable[..., ServiceClient]
) -> None:
    client = make_client()
    with pytest.raises(DecodeError) as caught:
        await send(client, get(await serve(await gzip_app()) + "/bomb"), max_body_bytes=MB)
    assert caught.value.message.startswith(f"response body exceeds max_body_bytes ({MB}")
    assert caught.value.attempts == 1 and caught.value.status == 200
    assert client.stats.requests == 1


async def test_headers_lower_case_and_repeated_joined(
    serve: Serve, make_client: Callable[..., ServiceClient]
) -> None:
    client = make_client()
    response = await send(client, get(await serve(await gzip_app()) + "/links"))
    assert response.headers["link"] == '<https://a/2>; rel="next", <https://a/9>; rel="last"'
    assert response.headers["x-custom"] == "v"
    assert response.reason == "OK"


async def test_multipart_and_query_reach_the_server(
    serve: Serve, make_client: Callable[..., ServiceClient], tmp_path: Path
) -> None:
    seen: dict[str, Any] = {}

    async def upload(request: web.Request) -> web.Response:
        form = await request.post()
        upload = form["doc"]
        assert isinstance(upload, web.FileField)
        seen.update(
            note=form["note"],
            filename=upload.filename,
            content_type=upload.content_type,
            data=upload.file.read(),
            query=list(request.query.items()),
        )
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/upload", upload)
    file = tmp_path / "report.csv"
    file.write_bytes(b"a,b\r\n1,2\r\n")
    body, content_type = encode_multipart({"note": "héllo", "doc": {"file": str(file)}})
    request = get(
        await serve(app) + "/upload",
        method="POST",
        body=body,
        headers={"Content-Type": content_type},
        query=encode_query({"tags": ["a b", None, "c&d"], "flag": False, "skip": None}),
    )
    response = await send(make_client(), request)
    assert response.status == 200
    assert seen == {
        "note": "héllo",
        "filename": "report.csv",
        "content_type": "text/csv",
        "data": b"a,b\r\n1,2\r\n",
        "query": [("tags", "a b"), ("tags", "c&d"), ("flag", "false")],
    }


# ---------------------------------------------------------------- redirects


async def redirect_app(other: str = "") -> tuple[web.Application, list[web.Request]]:
    seen: list[web.Request] = []

    async def echo(request: web.Request) -> web.Response:
        seen.append(request)
        body = await request.read()
        return web.json_response(
            {
                "method": request.method,
                "body": body.decode(),
                "headers": {k.lower(): v for k, v in request.headers.items()},
                "query": list(request.query.items()),
            }
        )

    def redirect(status: int, location: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(request: web.Request) -> web.Response:
            return web.Response(status=status, headers={"Location": location})

        return handler

    app = web.Application()
    app.router.add_route("*", "/echo", echo)
    app.router.add_route("*", "/r1", redirect(302, "r2"))  # relative
    app.router.add_route("*", "/r2", redirect(301, "/echo?from=r2"))
    app.router.add_route("*", "/r307", redirect(307, "/echo"))
    app.router.add_route("*", "/r303", redirect(303, "/echo"))
    app.router.add_route("*", "/loop", redirect(302, "/loop"))
    if other:
        app.router.add_route("*", "/away", redirect(302, other + "/echo?api_key=K&x=1"))
    return app, seen


async def test_redirects_followed_and_counted(
    serve: Serve, make_client: Callable[..., ServiceClient]
) -> None:
    app, _ = await redirect_app()
    base = await serve(app)
    client = make_client()
    response = await send(client, get(base + "/r1"))
    assert response.status == 200
    assert response.url == base + "/echo?from=r2"
    assert response.attempts == 1
    assert client.stats.requests == 3
    assert client.stats.status_counts == {"302": 1, "301": 1, "200": 1}


async def test_307_keeps_method_and_body_303_becomes_get(
    serve: Serve, make_client: Callable[..., ServiceClient]
) -> None:
    app, _ = await redirect_app()
    base = await serve(app)
    client = make_client()
    headers = {"Content-Type": "application/json"}
    kept = await send(client, get(base + "/r307", method="POST", body=b'{"a":1}', headers=headers))
    assert kept.status == 200
    echoed = json.loads(kept.body)
    assert (echoed["method"], echoed["body"]) == ("POST", '{"a":1}')
    changed = await send(
        client, get(base + "/r303", method="POST", body=b'{"a":1}', headers=headers)
    )
    echoed = json.loads(changed.body)
    assert (echoed["method"], echoed["body"]) == ("GET", "")
    assert "content-type" not in echoed["headers"]


async def test_cross_origin_redirect_strips_credentials(
    serve: Serve, make_client: Callable[..., ServiceClient]
) -> None:
    other_app, other_seen = await redirect_app()
    other = await serve(other_app)
    app, _ = await redirect_app(other)
    base = await serve(app)
    assert origin(base) != origin(other)  # another port: another origin
    client = make_client()
    request = get(
        base + "/away",
        headers={"Authorization": "Bearer T", "X-Api-Key": "K", "X-Trace": "t-1"},
        cookies={"sid": "S"},
        sensitive_headers={"X-Api-Key"},
        sensitive_query={"api_key"},
    )
    response = await send(client, request)
    assert response.status == 200
    arrived = other_seen[0]
    assert "Authorization" not in arrived.headers
    assert "X-Api-Key" not in arrived.headers
    assert "Cookie" not in arrived.headers
    assert arrived.headers["X-Trace"] == "t-1"
    assert list(arrived.query.items()) == [("x", "1")]
    assert response.url == other + "/echo?x=1"


async def test_same_origin_redirect_keeps_credentials(
    serve: Serve, make_client: Callable[..., ServiceClient]
) -> None:
    app, seen = await redirect_app()
    base = await serve(app)
    request = get(
        base + "/r307",
        headers={"Authorization": "Bearer T", "X-Api-Key": "K"},
        cookies={"sid": "S"},
        sensitive_headers={"X-Api-Key"},
    )
    await send(make_client(), request)
    assert seen[0].headers["Authorization"] == "Bearer T"
    assert seen[0].headers["X-Api-Key"] == "K"
    assert seen[0].cookies["sid"] == "S"


async def test_too_many_redirects(serve: Serve, make_client: Callable[..., ServiceClient]) -> None:
    app, _ = await redirect_app()
    client = make_client()
    with pytest.raises(RunError) as caught:
        await send(client, get(await serve(app) + "/loop"))
    assert caught.value.message == "too many redirects (10)"
    assert client.stats.requests == 11


def test_redirect_hop_rules() -> None:
    request = PreparedRequest(
        method="POST",
        url="https://api.example/v1/items",
        query=[("page", "2")],
        headers={"Authorization": "x", "Content-Type": "application/json"},
        body=b"{}",
    )
    with pytest.raises(SecurityError, match="redirect from https to http refused: http://api"):
        redirect_request(request, 302, "http://api.example/v1/other")
    with pytest.raises(SecurityError, match="not loopback"):
        redirect_request(
            PreparedRequest(method="GET", url="http://127.0.0.1:8080/a"), 302, "http://evil.test/"
        )
    hop = redirect_request(request, 302, "../other?q=1#frag")
    assert (hop.method, hop.body, hop.url) == ("GET", None, "https://api.example/other?q=1")
    assert hop.headers == {"Authorization": "x"}
    hop = redirect_request(request, 308, "?page=3")
    assert (hop.method, hop.body, hop.url) == ("POST", b"{}", "https://api.example/v1/items?page=3")
    hop = redirect_request(request, 307, "https://api.example:443/v2")  # default port: same origin
    assert hop.headers["Authorization"] == "x"
    hop = redirect_request(request, 307, "https://files.example/v2")
    assert "Authorization" not in hop.headers


async def test_plain_http_to_remote_host_refused(make_client: Callable[..., ServiceClient]) -> None:
    client = make_client()
    with pytest.raises(SecurityError, match="not loopback"):
        await send(client, get("http://example.com/x"))
    assert client.stats.requests == 0


def test_is_loopback_and_origin() -> None:
    assert all(is_loopback(h) for h in ["127.0.0.1", "127.9.9.9", "::1", "[::1]", "LocalHost"])
    assert not any(is_loopback(h) for h in ["128.0.0.1", "example.com", "10.0.0.1", "::2"])
    assert origin("https://Api.Example/x") == ("https", "api.example", 443)
    assert origin("http://h:8080/x?y") == ("http", "h", 8080)


# ---------------------------------------------------------------- rate limits and concurrency


def recording_app(delay: float = 0.0) -> tuple[web.Application, list[float], list[int]]:
    arrivals: list[float] = []
    peak = [0, 0]  # in flight now, most in flight

    async def handler(request: web.Request) -> web.Response:
        arrivals.append(time.monotonic())
        peak[0] += 1
        peak[1] = max(peak)
        await asyncio.sleep(delay)
        peak[0] -= 1
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/x", handler)
    return app, arrivals, peak


async def test_rate_limit_measured_at_server(
    serve: Serve, make_client: Callable[..., ServiceClient]
) -> None:
    app, arrivals, _ = recording_app()
    base = await serve(app)
    client = make_client(rate_limit=RateLimit(3, 0.4))
    await asyncio.gather(*(send(client, get(base + "/x")) for _ in range(9)))
    arrivals.sort()
    assert len(arrivals) == 9
    for first, fourth in zip(arrivals, arrivals[3:], strict=False):
        assert fourth - first >= 0.4 - 0.02  # no 4 requests in any 0.4 s window


async def test_max_concurrency_measured_at_server(
    serve: Serve, make_client: Callable[..., ServiceClient]
) -> None:
    app, arrivals, peak = recording_app(delay=0.05)
    base = await serve(app)
    client = make_client(max_concurrency=2)
    await asyncio.gather(*(send(client, get(base + "/x")) for _ in range(8)))
    assert len(arrivals) == 8
    assert peak[1] == 2


async def test_429_with_retry_after_pauses_the_whole_service(
    serve: Serve, make_client: Callable[..., ServiceClient]
) -> None:
    limited: list[float] = []
    others: list[float] = []
    first_seen = asyncio.Event()

    async def limited_handler(request: web.Request) -> web.Response:
        limited.append(time.monotonic())
        if len(limited) == 1:
            first_seen.set()
            return web.Response(status=429, headers={"Retry-After": "1"})
        return web.Response(text="ok")

    async def other_handler(request: web.Request) -> web.Response:
        others.append(time.monotonic())
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/limited", limited_handler)
    app.router.add_get("/other", other_handler)
    base = await serve(app)
    client = make_client()
    limited_task = asyncio.create_task(send(client, get(base + "/limited")))
    await first_seen.wait()
    await asyncio.sleep(0.1)
    other = await send(client, get(base + "/other"))
    assert other.status == 200 and (await limited_task).status == 200
    assert others[0] - limited[0] >= 0.95
    assert limited[1] - limited[0] >= 0.95


async def test_x_ratelimit_headers_pause_the_service(
    serve: Serve, make_client: Callable[..., ServiceClient]
) -> None:
    arrivals: list[float] = []

    async def handler(request: web.Request) -> web.Response:
        arrivals.append(time.monotonic())
        return web.Response(
            text="ok", headers={"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "0.6"}
        )

    app = web.Application()
    app.router.add_get("/x", handler)
    base = await serve(app)
    client = make_client()
    await send(client, get(base + "/x"))
    await send(client, get(base + "/x"))
    assert arrivals[1] - arrivals[0] >= 0.55


def test_rate_limit_header_forms() -> None:
    now = 1_700_000_000.0
    assert rate_limit_wait({"x-ratelimit-remaining": "0", "x-ratelimit-reset": "5"}, now) == 5
    epoch = {"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(int(now) + 30)}
    assert rate_limit_wait(epoch, now) == 30
    assert rate_limit_wait({"x-ratelimit-remaining": "3", "x-ratelimit-reset": "5"}, now) is None
    assert rate_limit_wait({"ratelimit-remaining": "0", "ratelimit-reset": "7"}, now) == 7
    assert rate_limit_wait({"ratelimit": "limit=10, remaining=0, reset=5"}, now) == 5
    assert rate_limit_wait({"ratelimit": '"default";r=0;t=9'}, now) == 9
    assert rate_limit_wait({"ratelimit": "limit=10, remaining=4, reset=5"}, now) is None
    assert rate_limit_wait({}, now) is None


def test_retry_after_forms() -> None:
    now = 1_700_000_000.0
    assert retry_after_seconds("3", now) == 3
    assert retry_after_seconds(formatdate(now + 20, usegmt=True), now) == 20
    assert retry_after_seconds(formatdate(now - 20, usegmt=True), now) == 0
    assert retry_after_seconds("soon", now) is None
    assert retry_after_seconds(None, now) is None


class FakeClock:
    """Timing unit tests only: time moves when someone sleeps."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)
        await asyncio.sleep(0)


async def test_sliding_window_with_fake_clock() -> None:
    clock = FakeClock()
    window = SlidingWindow(RateLimit(3, 1.0), clock, clock.sleep)
    granted: list[float] = []

    async def take() -> None:
        await window.acquire()
        granted.append(clock.now)

    await asyncio.gather(*(take() for _ in range(7)))
    assert granted == [0, 0, 0, 1, 1, 1, 2]
    clock.now = 2.5  # the slots of t=1 have left the window, the one of t=2 has not
    for _ in range(3):
        await take()
    assert granted[-3:] == [2.5, 2.5, 3.0]


def test_backoff_bounds() -> None:
    rng = random.Random(7)
    policy = RetryPolicy(initial_delay=0.5, multiplier=2, max_delay=3)
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 3.0), (9, 3.0)]:
        samples = [backoff_delay(policy, attempt, rng) for _ in range(200)]
        assert all(0 <= s <= ceiling for s in samples)
        assert max(samples) > ceiling * 0.8  # full jitter spreads over the whole range


# ---------------------------------------------------------------- 401 refresh


class FakeAuth:
    """An auth layer stand-in: bearer tokens, refreshed on demand."""

    def __init__(self, refreshable: bool = True) -> None:
        self.token = "old"
        self.refreshable = refreshable
        self.applied = 0
        self.refreshed = 0

    async def apply(self, request: PreparedRequest) -> PreparedRequest:
        self.applied += 1
        headers = {**request.headers, "Authorization": f"Bearer {self.token}"}
        return PreparedRequest(
            method=request.method,
            url=request.url,
            query=list(request.query),
            headers=headers,
            body=request.body,
            sensitive_headers={*request.sensitive_headers, "Authorization"},
        )

    async def refresh(self, failed: PreparedRequest) -> bool:
        self.refreshed += 1
        assert failed.headers["Authorization"] == f"Bearer {self.token}"
        if self.refreshable:
            self.token = "new"
        return self.refreshable


def auth_app(valid: str) -> tuple[web.Application, list[str]]:
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        if request.headers.get("Authorization") != valid:
            return web.Response(status=401, text="expired")
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/x", handler)
    return app, seen


async def test_401_refreshes_once_and_resends(
    serve: Serve, make_client: Callable[..., ServiceClient]
) -> None:
    app, seen = auth_app("Bearer new")
    auth = FakeAuth()
    client = make_client()
    response = await send(client, get(await serve(app) + "/x"), authorize=auth)
    assert response.status == 200
    assert seen == ["Bearer old", "Bearer new"]
    assert (auth.applied, auth.refreshed) == (2, 1)
    assert response.attempts == 1  # the resend does not count toward max_attempts


async def test_401_refreshes_only_once(
    serve: Serve, make_client: Callable[..., ServiceClient]
) -> None:
    app, seen = auth_app("Bearer never")
    auth = FakeAuth()
    response = await send(make_client(), get(await serve(app) + "/x"), authorize=auth)
    assert response.status == 401
    assert len(seen) == 2 and auth.refreshed == 1


async def test_401_not_refreshable_is_returned(
    serve: Serve, make_client: Callable[..., ServiceClient]
) -> None:
    app, seen = auth_app("Bearer new")
    auth = FakeAuth(refreshable=False)
    response = await send(make_client(), get(await serve(app) + "/x"), authorize=auth)
    assert response.status == 401
    assert seen == ["Bearer old"]


# ---------------------------------------------------------------- building blocks


def test_build_url() -> None:
    assert build_url("https://h/api/", "/v2/x") == "https://h/api/v2/x"
    assert build_url("https://h/api", "v2/x") == "https://h/api/v2/x"
    assert build_url("https://h", "/x") == "https://h/x"


def test_encode_query() -> None:
    assert encode_query(
        {
            "a": None,
            "b": True,
            "c": False,
            "d": [1, None, "x", True],
            "e": 2.5,
            "f": {"k": [1, "é"]},
            "g": "",
            "h": 0,
        }
    ) == [
        ("b", "true"),
        ("c", "false"),
        ("d", "1"),
        ("d", "x"),
        ("d", "true"),
        ("e", "2.5"),
        ("f", '{"k":[1,"é"]}'),
        ("g", ""),
        ("h", "0"),
    ]


def test_encode_multipart_bytes(tmp_path: Path) -> None:
    file = tmp_path / "a.bin"
    file.write_bytes(b"\x00\x01")
    body, content_type = encode_multipart(
        {
            "text": "v",
            "n": 3,
            "gone": None,
            "f": {"file": str(file), "filename": 'x"y.png', "content_type": "image/png"},
        }
    )
    boundary = content_type.split("boundary=", 1)[1]
    assert content_type.startswith("multipart/form-data; boundary=")
    assert (
        body
        == (
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="text"\r\n\r\nv\r\n'
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="n"\r\n\r\n3\r\n'
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="f"; filename="x%22y.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + b"\x00\x01\r\n"
        + f"--{boundary}--\r\n".encode()
    )
    with pytest.raises(RenderError, match="cannot read"):
        encode_multipart({"f": {"file": str(tmp_path / "missing")}})
    with pytest.raises(RenderError, match="a part is a string or"):
        encode_multipart({"f": {"path": "x"}})


async def test_cookie_jar_only_when_asked(
    serve: Serve, make_client: Callable[..., ServiceClient]
) -> None:
    seen: list[str | None] = []

    async def login(request: web.Request) -> web.Response:
        response = web.Response(text="ok")
        response.set_cookie("session", "abc")
        return response

    async def whoami(request: web.Request) -> web.Response:
        seen.append(request.cookies.get("session"))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/login", login)
    app.router.add_get("/whoami", whoami)
    base = await serve(app)
    for client in (make_client(cookies=True), make_client()):
        await send(client, get(base + "/login"))
        await send(client, get(base + "/whoami"))
    assert seen == ["abc", None]
