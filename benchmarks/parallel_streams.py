"""Two independent paginated streams, one after the other and in a `parallel: true` block.

    python benchmarks/parallel_streams.py [--pages 250] [--delay 0.05] [--rounds 3]

A local aiohttp server answers each page after `--delay` seconds (the API's own latency);
each stream reads `--pages` pages. The same two steps run as two top-level steps
(sequential) and as the children of a parallel block; the wall time of the whole CLI process
is measured, rounds alternating, and the medians printed. Expected: the parallel block takes
about half the sequential time, since each stream spends its time waiting on the server.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from aiohttp import web

STEPS = """\
  - id: STREAM
    request: {service: api, path: /STREAM, query: {per_page: 10}}
    paginate: {type: page_number, total_pages: body.total_pages}
    records: body.data
    emit: STREAM
"""

HEADER = """\
version: 1
services:
  api: {base_url: "{{ env.API }}"}
steps:
"""


def flow(parallel: bool) -> str:
    children = STEPS.replace("STREAM", "orders") + STEPS.replace("STREAM", "invoices")
    if not parallel:
        return HEADER + children
    indented = "".join(f"    {line}\n" for line in children.splitlines())
    return HEADER + "  - id: both\n    parallel: true\n    steps:\n" + indented


def start_server(pages: int, delay: float) -> tuple[str, Any]:
    async def page(request: web.Request) -> web.Response:
        number = int(request.query.get("page", "1"))
        await asyncio.sleep(delay)
        rows = [{"id": (number - 1) * 10 + i, "stream": request.path} for i in range(10)]
        return web.json_response({"data": rows, "total_pages": pages})

    app = web.Application()
    app.router.add_get("/{stream}", page)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, access_log=None)
    ready = threading.Event()
    url: list[str] = []

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        url.append(f"http://127.0.0.1:{port}")
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    ready.wait(10)
    return url[0], loop


def run_once(folder: Path, name: str, api: str) -> float:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "runner.cli", "run", name, "--output-dir", f"out-{name}"],
        cwd=folder,
        env={**os.environ, "API": api},
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        raise SystemExit(f"{name} failed: {result.stderr}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pages", type=int, default=250)
    parser.add_argument("--delay", type=float, default=0.05)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    api, _ = start_server(args.pages, args.delay)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "sequential.yaml").write_text(flow(parallel=False))
        (folder / "parallel.yaml").write_text(flow(parallel=True))
        times: dict[str, list[float]] = {"sequential.yaml": [], "parallel.yaml": []}
        for _ in range(args.rounds):
            for name in times:
                times[name].append(run_once(folder, name, api))
        for name in times:
            lines = (folder / f"out-{name}" / "orders.jsonl").read_text().count("\n")
            assert lines == args.pages * 10, (name, lines)
    sequential = statistics.median(times["sequential.yaml"])
    parallel = statistics.median(times["parallel.yaml"])
    floor = args.pages * args.delay
    shape = f"{args.pages} pages, {args.delay * 1000:.0f} ms a page, {args.rounds} rounds"
    print(f"two streams x {shape}")
    print(f"sequential: {sequential:.2f} s (median of {times['sequential.yaml']})")
    print(f"parallel:   {parallel:.2f} s (median of {times['parallel.yaml']})")
    print(f"ratio:      {parallel / sequential:.2f} (server latency alone: {floor:.1f} s a stream)")


if __name__ == "__main__":
    main()
