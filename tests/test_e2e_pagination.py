"""End to end: every paginator, loops, stops, fan-out, concurrency and rate limits, through the
real CLI against real local servers (aiohttp apps and json-server from npm)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import (
    Cli,
    CliResult,
    Serve,
    ServerThread,
    WriteFlow,
    app_with,
    free_port,
    read_jsonl,
    run_cli_measured,
    server_process,
    summary_of,
)

HEAD = """\
version: 1
name: pages
services:
  api:
    base_url: "{{ env.API }}"
"""


def records(tmp_path: Path, stream: str = "items") -> list[Any]:
    return read_jsonl(tmp_path / "out" / f"{stream}.jsonl")


def run(cli: Cli, server: ServerThread, **env: str) -> CliResult:
    return cli("run", "flow.yaml", "--summary", "s.json", env={"API": server.url, **env})


def queries(server: ServerThread) -> list[dict[str, list[str]]]:
    return [r.query for r in server.requests]


def ids(n: int, start: int = 1) -> list[dict[str, int]]:
    return [{"id": i} for i in range(start, start + n)]


# -- page_number, offset -------------------------------------------------------------------


def test_page_number_with_size_and_total_pages(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    async def items(request: web.Request) -> web.Response:
        page = int(request.query["page"])
        size = int(request.query["per_page"])
        data = ids(size, (page - 1) * size + 1) if page <= 3 else []
        return web.json_response({"data": data, "total_pages": 3})

    server = serve(app_with(("GET", "/items", items)))
    write_flow(
        HEAD
        + """
steps:
  - id: items
    request: {service: api, path: /items, query: {status: open}}
    paginate: {type: page_number, size_param: per_page, size: 2, total_pages: body.total_pages}
    records: body.data
    emit: items
"""
    )
    result = run(cli, server)
    assert result.code == 0, result.stderr
    assert records(tmp_path) == ids(6)
    # Exactly three requests: no page 4 once total_pages is reached.
    assert queries(server) == [
        {"status": ["open"], "page": [str(n)], "per_page": ["2"]} for n in (1, 2, 3)
    ]
    s = summary_of(tmp_path)
    assert s["requests"] == 3 and s["records"] == {"items": 6}


def test_offset_with_total_read_from_xml_text(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    async def items(request: web.Request) -> web.Response:
        offset, limit = int(request.query["offset"]), int(request.query["limit"])
        rows = "".join(
            f"<item><id>{i}</id></item>" for i in range(offset + 1, min(offset + limit, 5) + 1)
        )
        text = f'<?xml version="1.0"?><list total="5"><count>5</count>{rows}</list>'
        return web.Response(text=text, content_type="application/xml")

    server = serve(app_with(("GET", "/items", items)))
    write_flow(
        HEAD
        + """
steps:
  - id: items
    request: {service: api, path: /items}
    response: {xml: {force_list: [item]}}
    paginate: {type: offset, limit: 2, total: 'body.list."@total"'}
    records: body.list.item
    fields: {id: id}
    emit: items
"""
    )
    result = run(cli, server)
    assert result.code == 0, result.stderr
    assert records(tmp_path) == [{"id": str(i)} for i in range(1, 6)]
    assert queries(server) == [{"offset": [o], "limit": ["2"]} for o in ("0", "2", "4")]


def test_in_none_with_page_number_in_a_template(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    async def page(request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        return web.json_response({"rows": ids(2, n * 10), "pages": 3})

    server = serve(app_with(("GET", "/pages/{n}.json", page)))
    write_flow(
        HEAD
        + """
steps:
  - id: items
    request:
      service: api
      path: "/pages/{{ page.number }}.json"
      headers: {X-Page: "p{{ page.number }}"}
    paginate: {type: page_number, start: 0, in: none, total_pages: body.pages}
    records: body.rows
    emit: items
"""
    )
    result = run(cli, server)
    assert result.code == 0, result.stderr
    assert records(tmp_path) == ids(2, 0) + ids(2, 10) + ids(2, 20)
    assert server.paths() == ["/pages/0.json", "/pages/1.json", "/pages/2.json"]
    assert queries(server) == [{}, {}, {}]
    assert [r.headers["X-Page"] for r in server.requests] == ["p0", "p1", "p2"]


# -- cursors -------------------------------------------------------------------------------------


def test_cursor_from_a_header_sent_in_a_header(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    pages = {None: ("c2", ids(2)), "c2": ("c3", ids(2, 3)), "c3": ("", ids(1, 5))}

    async def items(request: web.Request) -> web.Response:
        nxt, data = pages[request.headers.get("X-Cursor")]
        return web.json_response(data, headers={"X-Next-Cursor": nxt})

    server = serve(app_with(("GET", "/items", items)))
    write_flow(
        HEAD
        + """
steps:
  - id: items
    request: {service: api, path: /items, query: {limit: 2}}
    paginate: {type: cursor, cursor: 'headers."x-next-cursor"', param: X-Cursor, in: header}
    records: body
    emit: items
"""
    )
    result = run(cli, server)
    assert result.code == 0, result.stderr
    assert records(tmp_path) == ids(5)
    assert [r.headers.get("X-Cursor") for r in server.requests] == [None, "c2", "c3"]
    assert queries(server) == [{"limit": ["2"]}] * 3


def test_cursor_from_the_last_record(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    async def items(request: web.Request) -> web.Response:
        after = int(request.query.get("after_id", "0"))
        return web.json_response({"data": [r for r in ids(7) if r["id"] > after][:3]})

    server = serve(app_with(("GET", "/items", items)))
    write_flow(
        HEAD
        + """
steps:
  - id: items
    request: {service: api, path: /items}
    paginate: {type: cursor, cursor: "body.data[-1].id", param: after_id}
    records: body.data
    emit: items
"""
    )
    result = run(cli, server)
    assert result.code == 0, result.stderr
    assert records(tmp_path) == ids(7)
    # 3 + 3 + 1 records: the short page still has a last id, so one empty page ends it.
    assert queries(server) == [{}, {"after_id": ["3"]}, {"after_id": ["6"]}, {"after_id": ["7"]}]


def test_cursor_in_the_json_body_of_a_post_search(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    async def search(request: web.Request) -> web.Response:
        body = await request.json()
        after = body["page"].get("after") or 0
        data = [r for r in ids(5) if r["id"] > after][: body["page"]["size"]]
        nxt = data[-1]["id"] if data and data[-1]["id"] < 5 else None
        return web.json_response({"hits": data, "next": nxt})

    server = serve(app_with(("POST", "/search", search)))
    write_flow(
        HEAD
        + """
steps:
  - id: items
    request:
      service: api
      method: POST
      path: /search
      json: {query: {status: open}, page: {size: 2}}
    paginate: {type: cursor, cursor: body.next, param: page.after, in: body}
    records: body.hits
    emit: items
"""
    )
    result = run(cli, server)
    assert result.code == 0, result.stderr
    assert records(tmp_path) == ids(5)
    assert [json.loads(r.body) for r in server.requests] == [
        {"query": {"status": "open"}, "page": {"size": 2}},
        {"query": {"status": "open"}, "page": {"size": 2, "after": 2}},
        {"query": {"status": "open"}, "page": {"size": 2, "after": 4}},
    ]
    assert all(r.method == "POST" for r in server.requests)
    assert all(r.headers["Content-Type"] == "application/json" for r in server.requests)


# -- next URLs ----------------------------------------------------------------------------------


def test_relative_next_url_is_sent_as_given(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    async def items(request: web.Request) -> web.Response:
        token = request.query.get("token")
        if token is None:
            return web.json_response({"data": ids(2), "next": "items?token=t2&limit=2"})
        if token == "t2":
            return web.json_response({"data": ids(2, 3), "next": "/api/v1/items?token=t3"})
        return web.json_response({"data": ids(1, 5), "next": None})

    server = serve(app_with(("GET", "/api/v1/items", items)))
    write_flow(
        HEAD
        + """
steps:
  - id: items
    request:
      service: api
      path: /api/v1/items
      query: {limit: 2, status: open}
      headers: {X-Trace: abc}
    paginate: {type: next_url, next_url: body.next}
    records: body.data
    emit: items
"""
    )
    result = run(cli, server)
    assert result.code == 0, result.stderr
    assert records(tmp_path) == ids(5)
    assert server.paths() == ["/api/v1/items"] * 3
    # The step's query is not added to the next URLs again.
    assert queries(server) == [
        {"limit": ["2"], "status": ["open"]},
        {"token": ["t2"], "limit": ["2"]},
        {"token": ["t3"]},
    ]
    assert [r.headers.get("X-Trace") for r in server.requests] == ["abc"] * 3


def test_link_header_with_several_rels(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    async def tickets(request: web.Request) -> web.Response:
        page = int(request.query.get("page", "1"))
        links = ['</tickets?page=1&per_page=2>; rel="first"']
        if page > 1:
            links.append(f'</tickets?page={page - 1}&per_page=2>; rel="prev"')
        if page < 3:
            links.append(f'<{server.url}/tickets?page={page + 1}&per_page=2>; rel="next"')
        links.append('</tickets?page=3&per_page=2>; rel="last"')
        data = [{"id": i, "open": i % 2 == 1} for i in range(page * 2 - 1, page * 2 + 1)]
        return web.json_response(data, headers={"Link": ", ".join(links)})

    server = serve(app_with(("GET", "/tickets", tickets)))
    write_flow(
        HEAD
        + """
steps:
  - id: items
    request: {service: api, path: /tickets, query: {per_page: 2}}
    paginate: {type: link_header}
    records: body
    filter: open
    fields: {id: id}
    emit: items
"""
    )
    result = run(cli, server)
    assert result.code == 0, result.stderr
    assert records(tmp_path) == [{"id": 1}, {"id": 3}, {"id": 5}]
    assert queries(server) == [
        {"per_page": ["2"]},
        {"page": ["2"], "per_page": ["2"]},
        {"page": ["3"], "per_page": ["2"]},
    ]


def test_next_url_on_another_origin_is_refused_unless_allowed(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    async def other(request: web.Request) -> web.Response:
        return web.json_response({"data": ids(1, 3), "next": None})

    elsewhere = serve(app_with(("GET", "/more", other)))

    async def items(request: web.Request) -> web.Response:
        return web.json_response({"data": ids(2), "next": f"{elsewhere.url}/more?x=1"})

    server = serve(app_with(("GET", "/items", items)))
    flow = (
        HEAD
        + """EXTRA
steps:
  - id: items
    request: {service: api, path: /items}
    paginate: {type: next_url, next_url: body.next}
    records: body.data
    emit: items
"""
    )
    write_flow(flow.replace("EXTRA", ""))
    result = run(cli, server)
    assert result.code == 1
    assert "another origin" in result.stderr and "allow_cross_host" in result.stderr
    s = summary_of(tmp_path)
    assert s["error"]["kind"] == "security" and s["error"]["step"] == "items"
    assert elsewhere.requests == []
    assert not (tmp_path / "out" / "items.jsonl").exists()

    write_flow(
        flow.replace(
            "EXTRA",
            '    allow_cross_host: true\n    auth: {type: bearer, token: "{{ secrets.TOKEN }}"}',
        )
    )
    result = run(cli, server, TOKEN="tok-123")
    assert result.code == 0, result.stderr
    assert records(tmp_path) == ids(3)
    assert [r.query for r in elsewhere.requests] == [{"x": ["1"]}]
    # Following another host is allowed, but the service's credentials stay on its own origin.
    assert server.requests[-1].headers["Authorization"] == "Bearer tok-123"
    assert "Authorization" not in elsewhere.requests[0].headers


def test_json_server_pages_by_link_header_and_by_total_count(
    json_server: str, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    write_flow(
        HEAD
        + """
steps:
  - id: by_link
    request: {service: api, path: /posts, query: {_page: 1, _limit: 10}}
    paginate: {type: link_header}
    records: body
    fields: {id: id, title: title}
    emit: by_link
  - id: by_number
    request: {service: api, path: /posts, query: {_limit: 10}}
    paginate: {type: page_number, param: _page, total: 'headers."x-total-count"'}
    records: body
    fields: {id: id, title: title}
    emit: by_number
"""
    )
    result = cli("run", "flow.yaml", "--summary", "s.json", env={"API": json_server})
    assert result.code == 0, result.stderr
    expected = [{"id": i, "title": f"post {i}"} for i in range(1, 96)]
    assert records(tmp_path, "by_link") == expected
    assert records(tmp_path, "by_number") == expected
    # Ten pages each, and no request for an eleventh.
    assert summary_of(tmp_path)["requests"] == 20


# -- stops and loops -------------------------------------------------------------------------


def test_same_cursor_twice_fails_the_step(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    nexts = {None: "a", "a": "b", "b": "a"}

    async def items(request: web.Request) -> web.Response:
        cursor = request.query.get("cursor")
        return web.json_response({"data": [{"id": cursor or "first"}], "next": nexts[cursor]})

    server = serve(app_with(("GET", "/items", items)))
    write_flow(
        HEAD
        + """
steps:
  - id: items
    request: {service: api, path: /items}
    paginate: {type: cursor, cursor: body.next}
    records: body.data
    emit: items
"""
    )
    result = run(cli, server)
    assert result.code == 1
    assert "pagination loop: the same cursor 'a' came twice" in result.stderr
    assert len(server.requests) == 3
    assert summary_of(tmp_path)["error"]["step"] == "items"


def test_same_next_url_twice_fails_the_step(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    async def items(request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        # Page 2 links to itself, spelled relative: the same URL once resolved.
        return web.json_response({"data": ids(1, n), "next": "/p/2" if n == 1 else "2"})

    server = serve(app_with(("GET", "/p/{n}", items)))
    write_flow(
        HEAD
        + """
steps:
  - id: items
    request: {service: api, path: /p/1}
    paginate: {type: next_url, next_url: body.next}
    records: body.data
    emit: items
"""
    )
    result = run(cli, server)
    assert result.code == 1
    assert f"the same next URL '{server.url}/p/2' came twice" in result.stderr
    assert server.paths() == ["/p/1", "/p/2"]
    assert summary_of(tmp_path)["status"] == "failed"


def test_repeated_last_page_ends_with_a_warning(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    async def items(request: web.Request) -> web.Response:
        # A server that repeats its last page forever for any page past the end.
        page = min(int(request.query["page"]), 2)
        return web.json_response(ids(2, page * 2 - 1))

    server = serve(app_with(("GET", "/items", items)))
    write_flow(
        HEAD
        + """
steps:
  - id: items
    request: {service: api, path: /items}
    paginate: {type: page_number}
    records: body
    emit: items
"""
    )
    result = run(cli, server)
    assert result.code == 0, result.stderr
    assert records(tmp_path) == ids(4)
    assert len(server.requests) == 3
    assert "page 3 repeated the previous page's records" in result.stderr
    assert any("repeated" in w for w in summary_of(tmp_path)["warnings"])


def test_stop_when_skip_and_max_pages(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    async def items(request: web.Request) -> web.Response:
        page = int(request.query["page"])
        if request.path == "/b" and page == 3:
            return web.json_response({"error": "gone"}, status=404)
        return web.json_response({"data": ids(2, page * 2 - 1), "last": page == 2})

    server = serve(app_with(("GET", "/a", items), ("GET", "/b", items), ("GET", "/c", items)))
    write_flow(
        HEAD
        + """
steps:
  - id: a
    request: {service: api, path: /a}
    paginate: {type: page_number, stop_when: body.last}
    records: body.data
    emit: a
  - id: b
    request: {service: api, path: /b}
    paginate: {type: page_number}
    on_status: [{status: 404, action: skip}]
    records: body.data
    emit: b
  - id: c
    request: {service: api, path: /c}
    paginate: {type: page_number, max_pages: 4}
    records: body.data
    filter: "id > `4`"
    emit: c
"""
    )
    result = run(cli, server)
    assert result.code == 0, result.stderr
    # stop_when: page 2 is mapped, then nothing more.
    assert records(tmp_path, "a") == ids(4)
    # A skipped page counts as a page with no records.
    assert records(tmp_path, "b") == ids(4)
    # Pages whose records are all filtered out still go on: records are counted before filter.
    assert records(tmp_path, "c") == ids(4, 5)
    assert [(r.path, r.query["page"][0]) for r in server.requests] == [
        ("/a", "1"),
        ("/a", "2"),
        ("/b", "1"),
        ("/b", "2"),
        ("/b", "3"),
        ("/c", "1"),
        ("/c", "2"),
        ("/c", "3"),
        ("/c", "4"),
    ]
    s = summary_of(tmp_path)
    assert s["skipped"] == {"b": 1}
    assert s["records"] == {"a": 4, "b": 4, "c": 4}


def test_stop_action_ends_the_pagination_and_keeps_records(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    async def items(request: web.Request) -> web.Response:
        page = int(request.query["page"])
        return web.json_response({"data": ids(2, page * 2 - 1), "done": page == 2})

    server = serve(app_with(("GET", "/items", items)))
    write_flow(
        HEAD
        + """
steps:
  - id: items
    request: {service: api, path: /items}
    paginate: {type: page_number}
    on_status: [{status: 200, when: body.done, action: stop}]
    records: body.data
    emit: items
"""
    )
    result = run(cli, server)
    assert result.code == 0, result.stderr
    # `stop` maps nothing more: page 2's records are not emitted.
    assert records(tmp_path) == ids(2)
    assert len(server.requests) == 2


# -- fan-out, concurrency, rate limits ----------------------------------------------------------


class InFlight:
    """Counts requests in flight on the server, per path prefix and overall."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0

    async def hold(self, seconds: float) -> None:
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            await asyncio.sleep(seconds)
        finally:
            self.now -= 1


@pytest.mark.parametrize(("method", "sent"), [("GET", ["1", "2", "3"]), ("POST", ["1", "2"])])
def test_next_page_is_on_its_way_while_a_page_is_mapped_one_request_at_a_time(
    method: str, sent: list[str], serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    in_flight = InFlight()

    async def items(request: web.Request) -> web.Response:
        await in_flight.hold(0.05)
        page = int(request.query["page"])
        # Page 2's records lack `meta`: its fields fail to render, after page 3 was asked for.
        data = [{"id": page, "meta": {"label": "x"}} if page != 2 else {"id": page}]
        return web.json_response({"data": data})

    server = serve(app_with((method, "/items", items)))
    write_flow(
        HEAD
        + f"""
steps:
  - id: items
    request: {{service: api, method: {method}, path: /items}}
    paginate: {{type: page_number, max_pages: 10}}
    records: body.data
    fields: {{id: id, label: "{{{{ record.meta.label }}}}"}}
    emit: items
"""
    )
    result = run(cli, server)
    assert result.code == 1
    assert "meta" in result.stderr and "Traceback" not in result.stderr
    # GET: page 3 was sent while page 2 was mapped (and dropped when that failed); a POST
    # waits for its page to be mapped, so a failure never leaves one sent for nothing.
    assert [q["page"][0] for q in queries(server)] == sent
    assert in_flight.peak == 1
    assert not (tmp_path / "out" / "items.jsonl").exists()


def test_for_each_concurrency_keeps_input_order(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    gauge = InFlight()

    async def item(request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        # Later items answer sooner: output order must still be input order.
        await gauge.hold(0.02 * (10 - n % 10))
        return web.json_response({"id": n})

    server = serve(app_with(("GET", "/items/{n}", item)))
    write_flow(
        HEAD
        + """
inputs:
  type: object
  properties: {ids: {type: array, default: [9, 3, 7, 1, 12, 5, 8, 2, 11, 4, 6, 10]}}
steps:
  - id: items
    for_each: "inputs.ids"
    concurrency: 3
    max_items: 10
    request: {service: api, path: "/items/{{ item }}"}
    records: body
    fields: {id: id, index: "{{ item_index }}"}
    emit: items
"""
    )
    result = run(cli, server)
    assert result.code == 0, result.stderr
    expected = [9, 3, 7, 1, 12, 5, 8, 2, 11, 4]
    assert records(tmp_path) == [{"id": n, "index": i} for i, n in enumerate(expected)]
    assert sorted(server.paths()) == sorted(f"/items/{n}" for n in expected)
    assert gauge.peak == 3


def test_for_each_waits_for_a_slow_first_item_within_its_window(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    # concurrency 2: at most 4 items (twice the concurrency) from the oldest unwritten one.
    started: list[tuple[int, bool]] = []  # (item, item 0 already answered)
    first_done = asyncio.Event()

    async def item(request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        started.append((n, first_done.is_set()))
        if n == 0:
            await asyncio.sleep(0.3)
            first_done.set()
        return web.json_response({"id": n})

    server = serve(app_with(("GET", "/items/{n}", item)))
    write_flow(
        HEAD
        + """
inputs:
  type: object
  properties: {ids: {type: array, default: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]}}
steps:
  - id: items
    for_each: "inputs.ids"
    concurrency: 2
    request: {service: api, path: "/items/{{ item }}"}
    records: body
    emit: items
"""
    )
    result = run(cli, server)
    assert result.code == 0, result.stderr
    assert records(tmp_path) == [{"id": n} for n in range(10)]
    # While item 0 was held, items 1 to 3 were sent and answered; the rest waited for it.
    assert sorted(n for n, after in started if not after) == [0, 1, 2, 3]
    assert sorted(n for n, _ in started) == list(range(10))


def test_service_max_concurrency_caps_two_steps_at_once(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    gauge = InFlight()

    async def thing(request: web.Request) -> web.Response:
        await gauge.hold(0.05)
        return web.json_response({"id": int(request.match_info["n"])})

    server = serve(app_with(("GET", "/a/{n}", thing), ("GET", "/b/{n}", thing)))
    write_flow(
        HEAD
        + """\
    max_concurrency: 2
steps:
  - id: each
    for_each: "[`1`, `2`, `3`, `4`, `5`, `6`]"
    concurrency: 4
    steps:
      - id: a
        request: {service: api, path: "/a/{{ item }}"}
        records: body
        emit: a
      - id: b
        request: {service: api, path: "/b/{{ item }}"}
        records: body
        emit: b
  - id: more
    for_each: "[`7`, `8`, `9`, `10`]"
    concurrency: 4
    request: {service: api, path: "/a/{{ item }}"}
    records: body
    emit: a
"""
    )
    result = run(cli, server)
    assert result.code == 0, result.stderr
    assert records(tmp_path, "a") == ids(10)
    assert records(tmp_path, "b") == ids(6)
    assert len(server.requests) == 16
    assert gauge.peak == 2


def test_rate_limit_holds_in_every_window_at_the_server(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    async def thing(request: web.Request) -> web.Response:
        return web.json_response({"id": int(request.match_info["n"])})

    server = serve(app_with(("GET", "/a/{n}", thing), ("GET", "/b/{n}", thing)))
    write_flow(
        HEAD
        + """\
    rate_limit: {requests: 5, per_seconds: 1}
steps:
  - id: a
    for_each: "[`1`, `2`, `3`, `4`, `5`, `6`, `7`]"
    concurrency: 4
    request: {service: api, path: "/a/{{ item }}"}
    records: body
    emit: items
  - id: b
    request: {service: api, path: "/b/{{ page.number }}"}
    paginate: {type: page_number, in: none, max_pages: 5}
    records: body
    emit: items
"""
    )
    started = time.monotonic()
    result = run(cli, server)
    assert result.code == 0, result.stderr
    assert records(tmp_path) == ids(7) + ids(5)
    times = sorted(r.at for r in server.requests)
    assert len(times) == 12
    # No window of 1 s holds more than 5 requests (a few ms of slack for the trip to the server).
    for i in range(len(times) - 5):
        assert times[i + 5] - times[i] >= 0.98, (i, [round(t - times[0], 3) for t in times])
    assert times[-1] - times[0] >= 1.98
    assert time.monotonic() - started >= 2


def test_retry_after_pauses_the_whole_service(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    limited: list[float] = []

    async def thing(request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        if n == 1 and not limited:
            limited.append(time.monotonic())
            return web.json_response({}, status=429, headers={"Retry-After": "1"})
        await asyncio.sleep(0.1)
        return web.json_response({"id": n})

    server = serve(app_with(("GET", "/a/{n}", thing)))
    write_flow(
        HEAD
        + """\
    retry: {initial_delay: 0.01}
steps:
  - id: a
    for_each: "[`1`, `2`, `3`, `4`, `5`, `6`, `7`, `8`]"
    concurrency: 3
    request: {service: api, path: "/a/{{ item }}"}
    records: body
    emit: items
"""
    )
    result = run(cli, server)
    assert result.code == 0, result.stderr
    assert records(tmp_path) == ids(8)
    assert len(server.requests) == 9
    t429 = limited[0]
    # Requests sent before the 429 was seen arrive at once; every later one waits out the pause.
    later = [r.at - t429 for r in server.requests if r.at > t429 + 0.05]
    assert len(later) >= 6
    assert min(later) >= 0.95, later
    s = summary_of(tmp_path)
    assert s["retries"] == 1 and s["status_counts"] == {"200": 8, "429": 1}


def test_ratelimit_remaining_zero_waits_for_reset(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    async def items(request: web.Request) -> web.Response:
        page = int(request.query["page"])
        headers = (
            {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "1"}
            if page == 1
            else {"RateLimit": "limit=5, remaining=0, reset=1"}
            if page == 2
            else {}
        )
        return web.json_response({"data": ids(1, page), "pages": 3}, headers=headers)

    server = serve(app_with(("GET", "/items", items)))
    write_flow(
        HEAD
        + """
steps:
  - id: items
    request: {service: api, path: /items}
    paginate: {type: page_number, total_pages: body.pages}
    records: body.data
    emit: items
"""
    )
    result = run(cli, server)
    assert result.code == 0, result.stderr
    assert records(tmp_path) == ids(3)
    at = [r.at for r in server.requests]
    assert at[1] - at[0] >= 0.95 and at[2] - at[1] >= 0.95


# -- memory -------------------------------------------------------------------------------------


def test_memory_stays_flat_over_many_pages(
    serve: Serve, write_flow: WriteFlow, tmp_path: Path
) -> None:
    async def items(request: web.Request) -> web.Response:
        page = int(request.query["page"])
        base = page * 1000
        rows = ",".join(
            f'{{"id":{base + i},"name":"record number {base + i}","tags":["a","b"]}}'
            for i in range(500)
        )
        return web.Response(
            text=f'{{"data":[{rows}],"pages":{request.query["pages"]}}}',
            content_type="application/json",
        )

    server = serve(app_with(("GET", "/items", items)))
    write_flow(
        HEAD
        + """
inputs:
  type: object
  properties: {pages: {type: integer}}
steps:
  - id: items
    request: {service: api, path: /items, query: {pages: "{{ inputs.pages }}"}}
    paginate: {type: page_number, total_pages: body.pages}
    records: body.data
    fields: {id: id, name: name}
    emit: items
"""
    )

    def peak_rss_kib(pages: int) -> int:
        run = run_cli_measured(
            "run", "flow.yaml", "--input", f"pages={pages}", "--output-dir", f"out{pages}",
            cwd=tmp_path, env={"API": server.url},
        )  # fmt: skip
        assert run.code == 0, run.stderr
        assert (tmp_path / f"out{pages}" / "items.jsonl").read_bytes().count(b"\n") == pages * 500
        return run.peak_rss_kib

    small = peak_rss_kib(50)
    large = peak_rss_kib(200)
    print(f"peak RSS: {small} KiB for 50 pages, {large} KiB for 200 pages")
    assert large - small < 15 * 1024, (small, large)


# -- json-server (npm) ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def json_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """json-server 0.17.4 from npm with 95 posts; skipped when npm or the install is missing."""
    if shutil.which("npm") is None or shutil.which("npx") is None or shutil.which("node") is None:
        pytest.skip("npm/node not available")
    folder = tmp_path_factory.mktemp("json_server")
    try:
        install = subprocess.run(
            ["npm", "i", "--no-audit", "--no-fund", "json-server@0.17.4"],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=180,
        )
    except subprocess.TimeoutExpired:
        pytest.skip("npm install of json-server timed out")
    if install.returncode != 0:
        pytest.skip(f"npm install of json-server failed: {install.stderr[-300:]}")
    posts = [{"id": i, "title": f"post {i}", "body": "x" * (i % 7)} for i in range(1, 96)]
    (folder / "db.json").write_text(json.dumps({"posts": posts}))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = ["npx", "json-server", "-H", "127.0.0.1", "-p", str(port), "db.json"]
    with server_process(command, f"{url}/posts/1", cwd=folder, name="json-server"):
        yield url
