"""The hand-written baseline: a plain aiohttp loop doing the benchmark's jobs, nothing more.

    python benchmarks/peers/loop.py sequential BASE_URL OUT.jsonl [--orjson] [--uvloop]
    python benchmarks/peers/loop.py fanout BASE_URL OUT.jsonl [--orjson] [--uvloop] [-c 16]

`--uvloop` runs it on uvloop's event loop, as the runner does when uvloop is installed.

What anyone would write by hand: no retries, no checks beyond the status, records written
as JSONL through a buffered file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable
from typing import Any

import aiohttp


def codecs(use_orjson: bool) -> tuple[Callable[[bytes], Any], Callable[[Any], bytes]]:
    if use_orjson:
        import orjson

        return orjson.loads, lambda obj: orjson.dumps(obj) + b"\n"
    encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
    return json.loads, lambda obj: (encoder.encode(obj) + "\n").encode()


def project(rec: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": rec["id"],
        "email": rec["email"],
        "amount": rec["amount"],
        "updated_at": rec["updated_at"],
        "country": rec["address"]["country"],
    }


async def sequential(base: str, out: str, use_orjson: bool) -> int:
    loads, dumps = codecs(use_orjson)
    count = 0
    async with aiohttp.ClientSession() as session:
        with open(out, "wb") as fh:
            page = 1
            while True:
                params = {"page": page, "per_page": 100}
                async with session.get(f"{base}/items", params=params) as resp:
                    resp.raise_for_status()
                    body = loads(await resp.read())
                for rec in body["data"]:
                    fh.write(dumps(project(rec)))
                    count += 1
                if page >= body["total_pages"]:
                    break
                page += 1
    return count


async def fanout(base: str, out: str, use_orjson: bool, concurrency: int) -> int:
    loads, dumps = codecs(use_orjson)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/ids") as resp:
            resp.raise_for_status()
            ids = loads(await resp.read())
        semaphore = asyncio.Semaphore(concurrency)

        async def fetch(i: int) -> dict[str, Any]:
            async with semaphore, session.get(f"{base}/items/{i}") as resp:
                resp.raise_for_status()
                return project(loads(await resp.read()))

        records = await asyncio.gather(*(fetch(i) for i in ids))
    with open(out, "wb") as fh:
        for rec in records:
            fh.write(dumps(rec))
    return len(records)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workload", choices=["sequential", "fanout"])
    parser.add_argument("base_url")
    parser.add_argument("out")
    parser.add_argument("--orjson", action="store_true")
    parser.add_argument("--uvloop", action="store_true", help="uvloop's event loop, as the runner")
    parser.add_argument("-c", "--concurrency", type=int, default=16)
    args = parser.parse_args()
    factory = None
    if args.uvloop:
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        if args.workload == "sequential":
            runner.run(sequential(args.base_url, args.out, args.orjson))
        else:
            runner.run(fanout(args.base_url, args.out, args.orjson, args.concurrency))


if __name__ == "__main__":
    main()
