"""A fault-injection aiohttp app: one route per fault, each able to fail the first N requests.

`build_chaos_app()` returns a fresh app (so every test has its own counters). Most routes read
`?fail=N` (default: always fail) and answer the good JSON body `GOOD` once they have failed N
times; `hits(app, route)` tells how many requests a route received.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import zlib
from collections import Counter
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from functools import lru_cache

from aiohttp import web

GOOD = {"data": [{"id": 1}, {"id": 2}, {"id": 3}]}
GOOD_BYTES = json.dumps(GOOD).encode()
HITS: web.AppKey[Counter[str]] = web.AppKey("hits", Counter)
HUGE_BYTES = 80 * 1024 * 1024
BOMB_BYTES = 200 * 1024 * 1024


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@lru_cache(maxsize=1)
def gzip_bomb() -> bytes:
    """BOMB_BYTES of zeros, gzipped to about 200 KB."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = b"\0" * (1024 * 1024)
    parts = [compressor.compress(block) for _ in range(BOMB_BYTES // len(block))]
    parts.append(compressor.flush())
    return b"".join(parts)


def hits(app: web.Application, route: str) -> int:
    return app[HITS][route]


def _failing(request: web.Request, route: str) -> bool:
    """Counts the request; True while the route has failed fewer than `?fail=N` times."""
    counter = request.app[HITS]
    counter[route] += 1
    fail = int(request.query.get("fail", "1000000"))
    return counter[route] <= fail


def _good() -> web.Response:
    return web.Response(body=GOOD_BYTES, content_type="application/json")


async def _prepare(request: web.Request, **headers: str) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
    response.headers.update(headers)
    await response.prepare(request)
    return response


async def stall(request: web.Request) -> web.StreamResponse:
    """Headers and a first byte, then nothing: only the read timeout can end it."""
    if not _failing(request, "stall"):
        return _good()
    response = await _prepare(request)
    await response.write(b"{")
    # Silent until the client hangs up (a plain long sleep would hold up the server's shutdown).
    while request.transport is not None and not request.transport.is_closing():
        await asyncio.sleep(0.05)
    return response


async def drip(request: web.Request) -> web.StreamResponse:
    """The good body a few bytes every 0.3 s: slow but never silent for a whole read timeout."""
    request.app[HITS]["drip"] += 1
    response = await _prepare(request)
    step = max(1, len(GOOD_BYTES) // 6)
    for start in range(0, len(GOOD_BYTES), step):
        await response.write(GOOD_BYTES[start : start + step])
        await asyncio.sleep(0.3)
    await response.write_eof()
    return response


async def reset(request: web.Request) -> web.StreamResponse:
    """Announces the whole body, sends half of it, then closes the connection."""
    if not _failing(request, "reset"):
        return _good()
    response = web.StreamResponse(
        status=200,
        headers={"Content-Type": "application/json", "Content-Length": str(len(GOOD_BYTES))},
    )
    await response.prepare(request)
    await response.write(GOOD_BYTES[: len(GOOD_BYTES) // 2])
    await asyncio.sleep(0.05)
    assert request.transport is not None
    request.transport.close()
    return response


async def truncated_gzip(request: web.Request) -> web.Response:
    """A gzip stream cut in the middle, with a Content-Length that matches what is sent."""
    if not _failing(request, "truncated_gzip"):
        return _good()
    payload = json.dumps({"data": [{"id": i, "pad": "x" * 50} for i in range(2000)]}).encode()
    packed = gzip.compress(payload)
    return web.Response(
        body=packed[: len(packed) // 2],
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )


async def deflate(request: web.Request) -> web.Response:
    """The good body with Content-Encoding: deflate, as zlib (RFC 9110) or raw (some servers)."""
    request.app[HITS]["deflate"] += 1
    wbits = zlib.MAX_WBITS if request.match_info["kind"] == "zlib" else -zlib.MAX_WBITS
    compressor = zlib.compressobj(6, zlib.DEFLATED, wbits)
    body = compressor.compress(GOOD_BYTES) + compressor.flush()
    return web.Response(
        body=body, headers={"Content-Type": "application/json", "Content-Encoding": "deflate"}
    )


async def storm(request: web.Request) -> web.Response:
    """503 with a Retry-After of the form `{form}`: seconds, date, none or large."""
    form = request.match_info["form"]
    if not _failing(request, f"storm/{form}"):
        return _good()
    headers: dict[str, str] = {}
    if form == "seconds":
        headers["Retry-After"] = "1"
    elif form == "date":
        # Two seconds ahead; HTTP dates have whole seconds, so the wait is between 1 and 2 s.
        headers["Retry-After"] = format_datetime(datetime.now(UTC) + timedelta(seconds=2), True)
    elif form == "large":
        headers["Retry-After"] = "3600"
    return web.json_response({"error": "service unavailable"}, status=503, headers=headers)


async def rate_limited(request: web.Request) -> web.Response:
    """429 with X-RateLimit headers: no quota left, reset in 0.2 s."""
    if not _failing(request, "ratelimit"):
        return _good()
    return web.json_response(
        {"error": "slow down"},
        status=429,
        headers={
            "X-RateLimit-Limit": "10",
            "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset": "0.2",
        },
    )


async def wrong_type(request: web.Request) -> web.Response:
    """An HTML error page from a proxy, labelled as JSON."""
    request.app[HITS]["wrong_type"] += 1
    html = "<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"
    return web.Response(text=html, content_type="application/json")


async def huge(request: web.Request) -> web.StreamResponse:
    """HUGE_BYTES of one JSON string, generated as it is sent (the server holds 1 MiB)."""
    request.app[HITS]["huge"] += 1
    response = await _prepare(request)
    chunk = b"x" * (1024 * 1024)
    await response.write(b'{"data": "')
    try:
        for _ in range(HUGE_BYTES // len(chunk)):
            await response.write(chunk)
    except (ConnectionError, RuntimeError):
        return response  # the client hung up, as it should
    await response.write(b'"}')
    await response.write_eof()
    return response


async def bomb(request: web.Request) -> web.Response:
    """A small gzip body that inflates to BOMB_BYTES."""
    request.app[HITS]["bomb"] += 1
    return web.Response(
        body=gzip_bomb(),
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )


async def redirect_loop(request: web.Request) -> web.Response:
    """/loop/a -> /loop/b -> /loop/a ..."""
    request.app[HITS]["loop"] += 1
    other = "b" if request.match_info["name"] == "a" else "a"
    raise web.HTTPFound(f"/loop/{other}")


async def post_unavailable(request: web.Request) -> web.Response:
    """A POST endpoint that answers 503 for its first N requests, then 201."""
    if _failing(request, "post"):
        return web.json_response({"error": "busy"}, status=503)
    return web.json_response({"data": [{"id": 1, "created": True}]}, status=201)


def build_chaos_app() -> web.Application:
    # Compressing the bomb takes about a second: do it before serving, not inside a request
    # that a client with a 1 s read timeout is waiting on.
    gzip_bomb()
    app = web.Application()
    app[HITS] = Counter()
    app.router.add_get("/stall", stall)
    app.router.add_get("/drip", drip)
    app.router.add_get("/reset", reset)
    app.router.add_get("/truncated-gzip", truncated_gzip)
    app.router.add_get("/deflate/{kind}", deflate)
    app.router.add_get("/storm/{form}", storm)
    app.router.add_get("/ratelimit", rate_limited)
    app.router.add_get("/wrong-type", wrong_type)
    app.router.add_get("/huge", huge)
    app.router.add_get("/bomb", bomb)
    app.router.add_get("/loop/{name}", redirect_loop)
    app.router.add_post("/post", post_unavailable)
    return app
