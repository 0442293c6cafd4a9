"""End to end: incremental state (`--state`) across runs: cursors, failures, cut-short runs and
the lock, through the real CLI against real local servers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.conftest import Cli, CliResult, Serve, ServerThread, WriteFlow, app_with, read_jsonl

HEAD = """\
version: 1
name: incremental
services:
  api:
    base_url: "{{ env.API }}"
    retry: {max_attempts: 2, initial_delay: 0.01}
"""


def state_of(tmp_path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((tmp_path / "state.json").read_text())
    return data


def cursors(tmp_path: Path) -> dict[str, Any]:
    return {k: v.get("cursor") for k, v in state_of(tmp_path)["streams"].items()}


def run(cli: Cli, server: ServerThread, *args: str) -> CliResult:
    return cli(
        "run",
        "flow.yaml",
        "--state",
        "state.json",
        "--summary",
        "s.json",
        *args,
        env={"API": server.url},
    )


def test_cursor_across_three_runs_with_a_failure_in_the_middle(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    rows = [{"id": i, "seq": i * 10} for i in range(1, 6)]
    visible = {"count": 3}
    failing = {"on": False}

    async def items(request: web.Request) -> web.Response:
        since = int(request.query.get("since", "0"))
        page = int(request.query["page"])
        if failing["on"] and page == 2:
            return web.json_response({"error": "boom"}, status=500)
        newer = [r for r in rows[: visible["count"]] if r["seq"] > since]
        return web.json_response({"data": newer[(page - 1) * 2 : page * 2]})

    server = serve(app_with(("GET", "/items", items)))
    write_flow(
        HEAD
        + """
steps:
  - id: items
    request: {service: api, path: /items, query: {since: "{{ state.items.cursor }}"}}
    paginate: {type: page_number}
    records: body.data
    emit: items
outputs:
  items: {cursor: seq}
"""
    )
    # Run 1: no state yet, so `since` is null and left out of the query.
    first = run(cli, server)
    assert first.code == 0, first.stderr
    assert [r.query for r in server.requests] == [{"page": ["1"]}, {"page": ["2"]}, {"page": ["3"]}]
    assert read_jsonl(tmp_path / "out" / "items.jsonl") == rows[:3]
    assert state_of(tmp_path)["streams"] == {"items": {"cursor": 30}}
    state_bytes = (tmp_path / "state.json").read_bytes()
    out_bytes = (tmp_path / "out" / "items.jsonl").read_bytes()
    manifest_bytes = (tmp_path / "out" / "manifest.json").read_bytes()

    # Run 2: two new records, the first page of them is mapped, then the second page fails.
    visible["count"] = 5
    failing["on"] = True
    del server.requests[:]
    second = run(cli, server)
    assert second.code == 69, second.stderr
    assert server.requests[0].query == {"since": ["30"], "page": ["1"]}
    assert json.loads((tmp_path / "s.json").read_text())["status"] == "failed"
    assert (tmp_path / "state.json").read_bytes() == state_bytes
    assert (tmp_path / "out" / "items.jsonl").read_bytes() == out_bytes
    assert (tmp_path / "out" / "manifest.json").read_bytes() == manifest_bytes

    # Run 3: asks again from the old cursor, and advances to the newest record.
    failing["on"] = False
    del server.requests[:]
    third = run(cli, server)
    assert third.code == 0, third.stderr
    assert [r.query for r in server.requests] == [
        {"since": ["30"], "page": ["1"]},
        {"since": ["30"], "page": ["2"]},
    ]
    assert read_jsonl(tmp_path / "out" / "items.jsonl") == rows[3:]
    assert state_of(tmp_path) == {"version": 1, "streams": {"items": {"cursor": 50}}, "auth": {}}


def test_datetime_cursor_compares_instants_and_an_empty_run_keeps_it(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    batches = [
        [
            {"id": 1, "at": "2024-01-01T00:00:00Z"},
            {"id": 2, "at": "2024-01-01T00:00:00.5Z"},  # the latest instant
            {"id": 3, "at": "2024-01-01T01:00:00+02:00"},  # 23:00 the day before
            {"id": 4, "at": "2024-01-01T00:00:00.2"},  # no zone: UTC
            {"id": 5, "at": None},  # null values are skipped
        ],
        [],
        [{"id": 6, "at": "2023-12-31T23:59:59Z"}],  # older than the cursor
    ]
    seen: list[str | None] = []

    async def items(request: web.Request) -> web.Response:
        seen.append(request.query.get("since"))
        return web.json_response(batches[len(seen) - 1])

    server = serve(app_with(("GET", "/items", items)))
    (tmp_path / "state.json").write_text(
        json.dumps({"version": 1, "streams": {"items": {"cursor": "2023-12-31T23:30:00Z"}}})
    )
    write_flow(
        HEAD
        + """
steps:
  - id: items
    request: {service: api, path: /items, query: {since: "{{ state.items.cursor }}"}}
    records: body
    emit: items
outputs:
  items: {cursor: {field: at, type: datetime}}
"""
    )
    result = run(cli, server)
    assert result.code == 0, result.stderr
    # The original string of the greatest instant is stored (a string compare would pick id 3).
    assert cursors(tmp_path) == {"items": "2024-01-01T00:00:00.5Z"}

    result = run(cli, server)
    assert result.code == 0, result.stderr
    assert read_jsonl(tmp_path / "out" / "items.jsonl") == []
    assert cursors(tmp_path) == {"items": "2024-01-01T00:00:00.5Z"}

    result = run(cli, server)
    assert result.code == 0, result.stderr
    assert cursors(tmp_path) == {"items": "2024-01-01T00:00:00.5Z"}
    assert seen == ["2023-12-31T23:30:00Z"] + ["2024-01-01T00:00:00.5Z"] * 2


def test_bad_datetime_cursor_fails_and_keeps_state(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    async def items(request: web.Request) -> web.Response:
        return web.json_response([{"id": 1, "at": "yesterday"}])

    server = serve(app_with(("GET", "/items", items)))
    (tmp_path / "state.json").write_text(
        json.dumps({"version": 1, "streams": {"items": {"cursor": "2024-01-01T00:00:00Z"}}})
    )
    before = (tmp_path / "state.json").read_bytes()
    write_flow(
        HEAD
        + """
steps:
  - id: items
    request: {service: api, path: /items}
    records: body
    emit: items
outputs:
  items: {cursor: {field: at, type: datetime}}
"""
    )
    result = run(cli, server)
    assert result.code == 1
    assert "yesterday" in result.stderr
    assert (tmp_path / "state.json").read_bytes() == before


def test_cut_short_streams_keep_their_cursor(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    async def pages(request: web.Request) -> web.Response:
        page = int(request.query["page"])
        return web.json_response({"data": [{"n": page}], "pages": 3})

    async def one(request: web.Request) -> web.Response:
        return web.json_response({"n": int(request.match_info["n"])})

    server = serve(app_with(("GET", "/pages", pages), ("GET", "/one/{n}", one)))
    (tmp_path / "state.json").write_text(
        json.dumps(
            {
                "version": 1,
                "streams": {
                    s: {"cursor": 0} for s in ("paged_cut", "paged_all", "each_cut", "each_all")
                },
                "auth": {},
            }
        )
    )
    write_flow(
        HEAD
        + """
steps:
  - id: paged_cut
    request: {service: api, path: /pages}
    paginate: {type: page_number, total_pages: body.pages, max_pages: 2}
    records: body.data
    emit: paged_cut
  - id: paged_all
    request: {service: api, path: /pages}
    paginate: {type: page_number, total_pages: body.pages, max_pages: 3}
    records: body.data
    emit: paged_all
  - id: each_cut
    for_each: "[`1`, `2`, `3`, `4`]"
    max_items: 2
    request: {service: api, path: "/one/{{ item }}"}
    records: body
    emit: each_cut
  - id: each_all
    for_each: "[`1`, `2`, `3`]"
    max_items: 3
    request: {service: api, path: "/one/{{ item }}"}
    records: body
    emit: each_all
outputs:
  paged_cut: {cursor: n}
  paged_all: {cursor: n}
  each_cut: {cursor: n}
  each_all: {cursor: n}
"""
    )
    result = run(cli, server)
    assert result.code == 0, result.stderr
    assert read_jsonl(tmp_path / "out" / "paged_cut.jsonl") == [{"n": 1}, {"n": 2}]
    assert read_jsonl(tmp_path / "out" / "each_cut.jsonl") == [{"n": 1}, {"n": 2}]
    # Pages or items left unfetched: the next run must start from the old cursor again.
    assert cursors(tmp_path) == {"paged_cut": 0, "paged_all": 3, "each_cut": 0, "each_all": 3}
    assert len(server.requests) == 2 + 3 + 2 + 3


def _start_cli(tmp_path: Path, server: ServerThread) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNER_")}
    env["API"] = server.url
    return subprocess.Popen(
        [sys.executable, "-m", "runner.cli", "run", "flow.yaml", "--state", "state.json"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_request(server: ServerThread, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 20
    while not server.requests:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_second_run_on_the_same_state_exits_75_at_once(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    import asyncio

    held = {"s": 30.0}

    async def items(request: web.Request) -> web.Response:
        # Held until the second run has exited: it cannot have waited for the lock.
        deadline = time.monotonic() + held["s"]
        while held["s"] and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return web.json_response([{"id": 1}])

    server = serve(app_with(("GET", "/items", items)))
    write_flow(
        HEAD
        + """
steps:
  - id: items
    request: {service: api, path: /items}
    records: body
    emit: items
outputs:
  items: {cursor: id}
"""
    )
    holder = _start_cli(tmp_path, server)
    try:
        _wait_for_request(server, holder)
        second = run(cli, server)
        assert second.code == 75, second.stderr
        assert "another run holds the state file" in second.stderr
        assert "state.json" in second.stderr
        assert holder.poll() is None  # the first still holds the lock: the second did not wait
        held["s"] = 0
        assert len(server.requests) == 1  # the second run sent nothing
        summary = json.loads((tmp_path / "s.json").read_text())
        assert summary["exit_code"] == 75 and summary["status"] == "failed"
        assert holder.wait(20) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.communicate()
    assert cursors(tmp_path) == {"items": 1}


def test_lock_is_released_when_the_holder_is_killed(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    import asyncio

    delay = {"s": 30.0}

    async def items(request: web.Request) -> web.Response:
        # Held until the test lets go (a plain long sleep would hold the server's teardown).
        deadline = time.monotonic() + delay["s"]
        while delay["s"] and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return web.json_response([{"id": 7}])

    server = serve(app_with(("GET", "/items", items)))
    write_flow(
        HEAD
        + """
steps:
  - id: items
    request: {service: api, path: /items}
    records: body
    emit: items
outputs:
  items: {cursor: id}
"""
    )
    (tmp_path / "state.json").write_text(
        json.dumps({"version": 1, "streams": {"items": {"cursor": 3}}, "auth": {}})
    )
    holder = _start_cli(tmp_path, server)
    try:
        _wait_for_request(server, holder)
        os.kill(holder.pid, signal.SIGKILL)
        assert holder.wait(10) == -signal.SIGKILL
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.communicate()
    assert cursors(tmp_path) == {"items": 3}
    delay["s"] = 0
    result = run(cli, server)
    assert result.code == 0, result.stderr
    assert cursors(tmp_path) == {"items": 7}
