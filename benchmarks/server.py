"""The benchmark's local API: deterministic records, paged lists and single-record lookups.

    python benchmarks/server.py [--port 0] [--delay 0]   # prints its base URL, then serves

Every URL starts with `/n/<total>`, the size of the data set, so one server serves the
50,000-record workload and the scaling runs alike:

    GET /n/<total>/items?page=P&per_page=S  -> {"data": [...S records...], "page": P,
                                                "per_page": S, "total": T, "total_pages": N}
    GET /n/<total>/items/<id>               -> one record
    GET /n/<total>/ids                      -> [1, 2, ..., total]

`--delay S` makes every single-record lookup wait S seconds first: an API's own latency, for
workloads bound by waiting rather than by the client's CPU. Bodies are built once and
cached (bounded), so the server costs every client the same and as little as possible: the
clients, not the server, are what is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections import OrderedDict
from typing import Any

import orjson
from aiohttp import web

STATUSES = ("active", "active", "active", "paused", "closed")
COUNTRIES = ("DE", "FR", "NL", "SE", "ES", "IT", "PL", "PT")
CACHE_PAGES = 1200  # about 30 MB of bodies at 100 records a page


def record(i: int) -> dict[str, Any]:
    """Record `i`: ten top-level fields, one nested object, one list; about 400 bytes."""
    return {
        "id": i,
        "name": f"Customer {i:07d}",
        "email": f"customer{i}@example.com",
        "amount": round((i * 7919 % 100000) / 100, 2),
        "currency": "EUR",
        "status": STATUSES[i % len(STATUSES)],
        "updated_at": f"2024-{i % 12 + 1:02d}-{i % 28 + 1:02d}T{i % 24:02d}:{i % 60:02d}:00Z",
        "tags": ["bench", f"group-{i % 17}"],
        "address": {
            "street": f"{i % 500} Benchmark Street",
            "city": f"City {i % 97}",
            "country": COUNTRIES[i % len(COUNTRIES)],
        },
        "notes": "Lorem ipsum dolor sit amet, consectetur adipiscing elit.",
    }


class Bodies:
    """Encoded response bodies, kept in a bounded LRU cache."""

    def __init__(self) -> None:
        self._cache: OrderedDict[tuple[Any, ...], bytes] = OrderedDict()

    def get(self, key: tuple[Any, ...], build: Any) -> bytes:
        body = self._cache.get(key)
        if body is None:
            body = orjson.dumps(build())
            self._cache[key] = body
            if len(self._cache) > CACHE_PAGES:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return body


def _int(request: web.Request, name: str, default: int) -> int:
    try:
        return int(request.query.get(name, default))
    except ValueError as exc:
        raise web.HTTPBadRequest(text=f"{name} must be an integer") from exc


def make_app(delay: float = 0.0) -> web.Application:
    bodies = Bodies()

    def json_response(body: bytes) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    async def items(request: web.Request) -> web.Response:
        total = int(request.match_info["total"])
        page = _int(request, "page", 1)
        per_page = _int(request, "per_page", 100)
        if page < 1 or not 1 <= per_page <= 1000:
            raise web.HTTPBadRequest(text="page >= 1 and 1 <= per_page <= 1000")
        pages = -(-total // per_page)

        def build() -> dict[str, Any]:
            first = (page - 1) * per_page + 1
            last = min(total, page * per_page)
            return {
                "data": [record(i) for i in range(first, last + 1)],
                "page": page,
                "per_page": per_page,
                "total": total,
                "total_pages": pages,
            }

        return json_response(bodies.get(("items", total, page, per_page), build))

    async def item(request: web.Request) -> web.Response:
        total = int(request.match_info["total"])
        i = int(request.match_info["id"])
        if not 1 <= i <= total:
            raise web.HTTPNotFound()
        if delay:
            await asyncio.sleep(delay)
        return json_response(bodies.get(("item", i), lambda: record(i)))

    async def ids(request: web.Request) -> web.Response:
        total = int(request.match_info["total"])
        return json_response(bodies.get(("ids", total), lambda: list(range(1, total + 1))))

    app = web.Application()
    app.router.add_get(r"/n/{total:\d+}/items", items)
    app.router.add_get(r"/n/{total:\d+}/items/{id:\d+}", item)
    app.router.add_get(r"/n/{total:\d+}/ids", ids)
    return app


async def serve(host: str, port: int, delay: float = 0.0) -> None:
    runner = web.AppRunner(make_app(delay), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    server = site._server
    assert server is not None and server.sockets
    bound = server.sockets[0].getsockname()[1]
    print(f"http://{host}:{bound}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each lookup")
    args = parser.parse_args()
    try:
        asyncio.run(serve(args.host, args.port, args.delay))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
