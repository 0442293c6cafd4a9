"""End-to-end: `parallel: true` blocks through the real CLI against a local aiohttp app:
branches at the same time, each stream in its own order, the first failure cancelling the
others before they send again, `concurrency`, `end` in a branch, and the validate errors."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from aiohttp import web

from tests.conftest import (
    ROOT,
    Cli,
    Serve,
    WriteFlow,
    free_port,
    read_jsonl,
    server_process,
    summary_of,
)


class Pages:
    """Paged lists whose pages take `delay` seconds; `/fail` answers 500 after `fail_after`."""

    def __init__(self, pages: int, delay: float, fail_after: float = 0.0) -> None:
        self.pages = pages
        self.delay = delay
        self.fail_after = fail_after
        self.failed_at: float | None = None
        self.spans: dict[str, list[tuple[float, float]]] = {}

    def app(self) -> web.Application:
        async def page(request: web.Request) -> web.Response:
            name = request.match_info["name"]
            number = int(request.query.get("page", "1"))
            started = time.monotonic()
            await asyncio.sleep(self.delay)
            self.spans.setdefault(name, []).append((started, time.monotonic()))
            rows = [{"stream": name, "n": number * 10 + i} for i in range(3)]
            return web.json_response({"data": rows, "total_pages": self.pages})

        async def fail(request: web.Request) -> web.Response:
            await asyncio.sleep(self.fail_after)
            self.failed_at = time.monotonic()
            return web.json_response({"error": "broken"}, status=500)

        async def missing(request: web.Request) -> web.Response:
            return web.json_response({"error": "gone"}, status=404)

        app = web.Application()
        app.router.add_get("/fail", fail)
        app.router.add_get("/missing", missing)
        app.router.add_get("/list/{name}", page)
        return app


def _branch(name: str, indent: str = "      ") -> str:
    return (
        f"{indent}- id: {name}\n"
        f"{indent}  request: {{service: api, path: /list/{name}}}\n"
        f"{indent}  paginate: {{type: page_number, total_pages: body.total_pages}}\n"
        f"{indent}  records: body.data\n"
        f"{indent}  emit: {name}\n"
    )


HEADER = """\
version: 1
services:
  api:
    base_url: "{{ env.API }}"
    retry: {max_attempts: 1}
steps:
"""


def test_branches_run_at_the_same_time_and_keep_their_order(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    pages = Pages(pages=5, delay=0.1)
    server = serve(pages.app())
    write_flow(
        HEADER
        + "  - id: both\n    parallel: true\n    steps:\n"
        + _branch("orders")
        + _branch("invoices")
        + """\
  - id: after
    request:
      service: api
      path: /list/after
      query: {seen: "{{ steps.orders.records | length }}"}
"""
        + "\noutputs: {}\n"
    )
    assert cli("validate", "flow.yaml").code == 0
    result = cli("run", "flow.yaml", "--output-dir", "out", env={"API": server.url})
    assert result.code == 0, result.stderr
    for name in ("orders", "invoices"):
        rows = read_jsonl(tmp_path / "out" / f"{name}.jsonl")
        assert [r["n"] for r in rows] == [p * 10 + i for p in range(1, 6) for i in range(3)]
    # The two streams overlapped in time; the step after the block read its branch.
    orders, invoices = pages.spans["orders"], pages.spans["invoices"]
    assert orders[0][0] < invoices[-1][1] and invoices[0][0] < orders[-1][1]
    assert server.requests[-1].path == "/list/after"
    assert server.requests[-1].query["seen"] == ["15"]
    assert server.requests[-1].at >= max(orders[-1][1], invoices[-1][1])


def test_concurrency_bounds_the_branches(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    pages = Pages(pages=3, delay=0.05)
    server = serve(pages.app())
    write_flow(
        HEADER
        + "  - id: both\n    parallel: true\n    concurrency: 1\n    steps:\n"
        + _branch("orders")
        + _branch("invoices")
    )
    result = cli("run", "flow.yaml", "--output-dir", "out", env={"API": server.url})
    assert result.code == 0, result.stderr
    orders, invoices = pages.spans["orders"], pages.spans["invoices"]
    first, second = (orders, invoices) if orders[0][0] < invoices[0][0] else (invoices, orders)
    assert second[0][0] >= first[-1][1]


def test_the_first_failure_cancels_the_others_at_once(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    pages = Pages(pages=100, delay=0.2, fail_after=0.5)
    server = serve(pages.app())
    write_flow(
        HEADER
        + "  - id: both\n    parallel: true\n    steps:\n"
        + _branch("slow")
        + """\
      - id: broken
        request: {service: api, path: /fail}
        on_status: [{status: 500, action: fail}]
  - id: never
    request: {service: api, path: /list/never}
"""
    )
    started = time.monotonic()
    result = cli("run", "flow.yaml", "--summary", "s.json", env={"API": server.url})
    assert result.code == 1
    assert time.monotonic() - started < 10
    assert "run failed in step 'broken': GET " in result.stderr and "-> 500" in result.stderr
    summary = summary_of(tmp_path)
    assert summary["status"] == "failed"
    assert summary["error"]["step"] == "broken"
    # No request of the other branch reached the server after the failure was answered.
    assert pages.failed_at is not None
    slow = [r for r in server.requests if r.path == "/list/slow"]
    assert slow and all(r.at < pages.failed_at for r in slow)
    assert len(slow) <= 4
    assert all(r.path != "/list/never" for r in server.requests)


def test_end_in_a_branch_ends_that_branch_only(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    pages = Pages(pages=2, delay=0.0)
    server = serve(pages.app())
    write_flow(
        HEADER
        + """\
  - id: both
    parallel: true
    steps:
      - id: gone
        request: {service: api, path: /missing}
        on_status: [{status: 404, action: end}]
"""
        + _branch("orders")
        + """\
  - id: after
    request: {service: api, path: /list/after}
"""
    )
    result = cli("run", "flow.yaml", "--output-dir", "out", env={"API": server.url})
    assert result.code == 0, result.stderr
    assert len(read_jsonl(tmp_path / "out" / "orders.jsonl")) == 6
    assert server.requests[-1].path == "/list/after"


def test_validate_keeps_the_branches_independent(cli: Cli, write_flow: WriteFlow) -> None:
    write_flow(
        """\
version: 1
services:
  api: {base_url: "http://127.0.0.1:1"}
steps:
  - id: both
    parallel: true
    steps:
      - id: a
        request: {service: api, path: /a}
        records: body
        emit: rows
        on_status: [{status: 404, action: goto, goto: b}]
      - id: b
        request: {service: api, path: "/b/{{ steps.a.vars.x }}"}
        records: body
        emit: rows
  - id: c
    parallel: true
    for_each: "[`1`]"
    steps:
      - {id: d, request: {service: api, path: /d}}
  - id: e
    steps:
      - {id: f, request: {service: api, path: /f}}
"""
    )
    result = cli("validate", "flow.yaml")
    assert result.code == 2
    out = result.stderr
    assert (
        "flow.yaml:12:49: steps[0].steps[0].on_status[0].goto: goto between the steps of a "
        "parallel block is not allowed" in out
    )
    assert (
        "steps[0].steps[1].request.path: steps.a is in another branch of the parallel block "
        "'both'" in out
    )
    assert (
        "flow.yaml:16:9: steps[0].steps[1].emit: stream 'rows' is also emitted by step 'a'" in out
    )
    assert "steps[1].for_each: a parallel block runs its steps once" in out
    assert "flow.yaml:22:5: steps[2]: missing required key 'for_each' (needed by 'steps')" in out


def test_example_flows_with_include_defaults_use_and_parallel(cli: Cli, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "runner.demo_api", "--port", str(port)]
    env = {"DEMO_API_URL": url, "DEMO_TOKEN": "demo-token"}
    with server_process(command, f"{url}/health", cwd=ROOT, name="demo API"):
        flows = ROOT / "flows"
        lists = cli("run", str(flows / "paginated_orders.yaml"), "--output-dir", "a", env=env)
        crud = cli("run", str(flows / "customers_roundtrip.yaml"), "--output-dir", "b", env=env)
    assert lists.code == 0, lists.stderr
    assert crud.code == 0, crud.stderr
    orders = read_jsonl(tmp_path / "a" / "orders.jsonl")
    assert orders and [o["id"] for o in orders] == sorted(o["id"] for o in orders)
    assert read_jsonl(tmp_path / "a" / "events.jsonl")
    assert read_jsonl(tmp_path / "a" / "open_tickets.jsonl")
    ops = [r["op"] for r in read_jsonl(tmp_path / "b" / "roundtrip.jsonl")]
    assert ops == ["created", "read", "replaced", "patched"]
