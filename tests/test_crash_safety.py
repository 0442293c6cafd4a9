"""Crash safety: SIGKILL at random moments leaves the last good outputs and the state file as
they were; SIGTERM and SIGINT stop the run, commit nothing and exit 143 / 130 within 5 s."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import EVENT_LOOPS, Cli, Serve, read_jsonl

PAGE_SIZE = 250
PAGES = 16
PER_RUN = PAGE_SIZE * PAGES
STREAMS = ("items", "meta")


def paged_app(page_delay: float = 0.03, stall_page: int | None = None) -> web.Application:
    """`/items?since=S&page=N`: records S+1 .. S+4000 over 16 pages; `/meta?since=S`: one record.

    `stall_page`: that page never answers (for the signal tests).
    """

    async def items(request: web.Request) -> web.Response:
        since = int(request.query["since"])
        page = int(request.query["page"])
        if page == stall_page:
            # Until the client hangs up (a plain long sleep would hold up the server's shutdown).
            while request.transport is not None and not request.transport.is_closing():
                await asyncio.sleep(0.05)
            return web.json_response({})
        await asyncio.sleep(page_delay)
        first = since + (page - 1) * PAGE_SIZE + 1
        data = [{"seq": n, "name": f"item-{n}"} for n in range(first, first + PAGE_SIZE)]
        return web.json_response({"data": data, "total_pages": PAGES})

    async def meta(request: web.Request) -> web.Response:
        return web.json_response({"since": int(request.query["since"])})

    app = web.Application()
    app.router.add_get("/items", items)
    app.router.add_get("/meta", meta)
    return app


def flow_text(base_url: str) -> str:
    return f"""\
version: 1
name: crash
services:
  api:
    base_url: "{base_url}"
    retry: {{max_attempts: 2, initial_delay: 0.01}}
steps:
  - id: meta
    request: {{service: api, path: /meta, query: {{since: "{{{{ state.items.cursor or 0 }}}}"}}}}
    records: body
    emit: meta
  - id: items
    request: {{service: api, path: /items, query: {{since: "{{{{ state.items.cursor or 0 }}}}"}}}}
    paginate: {{type: page_number, param: page, total_pages: body.total_pages}}
    records: body.data
    emit: items
outputs:
  items:
    cursor: seq
"""


def expected_records(since: int) -> dict[str, list[dict[str, Any]]]:
    """What a complete run from cursor `since` writes."""
    items = [{"seq": n, "name": f"item-{n}"} for n in range(since + 1, since + PER_RUN + 1)]
    return {"items": items, "meta": [{"since": since}]}


def snapshot(out: Path) -> dict[str, bytes | None]:
    names = [*(f"{s}.jsonl" for s in STREAMS), "manifest.json"]
    return {n: (out / n).read_bytes() if (out / n).exists() else None for n in names}


def records_of(data: bytes | None) -> list[Any] | None:
    if data is None:
        return None
    return [json.loads(line) for line in data.decode("utf-8").splitlines()]


def matches_manifest(snap: dict[str, bytes | None]) -> bool:
    manifest_bytes = snap["manifest.json"]
    if manifest_bytes is None:
        return False
    manifest = json.loads(manifest_bytes)
    assert set(manifest["streams"]) == set(STREAMS)
    for entry in manifest["streams"].values():
        data = snap[entry["file"]]
        if data is None:
            return False
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            return False
        if len(data.splitlines()) != entry["count"]:
            return False
    return True


def read_cursor(state: Path) -> int | None:
    if not state.exists():
        return None
    data = json.loads(state.read_text(encoding="utf-8"))  # valid JSON, always
    assert data["version"] == 1
    cursor: int | None = data["streams"]["items"]["cursor"]
    return cursor


def check_after_kill(
    out: Path, state: Path, good: dict[str, bytes | None], cursor: int | None
) -> tuple[dict[str, bytes | None], int | None]:
    """Asserts what a kill may leave; returns the new last good files and cursor."""
    new_cursor = read_cursor(state)
    since = cursor or 0
    assert new_cursor in (cursor, since + PER_RUN)
    snap = snapshot(out)
    new = expected_records(since)
    if snap != good:
        if snap["manifest.json"] != good["manifest.json"]:
            # The manifest moved: that is the commit point, so every file is the new version.
            assert matches_manifest(snap)
            for stream in STREAMS:
                assert records_of(snap[f"{stream}.jsonl"]) == new[stream]
        else:
            # Killed among the renames: each file is the old one or the complete new one, and
            # the manifest (still the old one) tells the reader this commit did not finish.
            assert new_cursor == cursor
            for stream in STREAMS:
                name = f"{stream}.jsonl"
                assert snap[name] == good[name] or records_of(snap[name]) == new[stream]
    if new_cursor != cursor:
        # The state is written last: a new cursor means the outputs were committed.
        assert matches_manifest(snap)
        assert records_of(snap["items.jsonl"]) == new["items"]
    return snap, new_cursor


def test_sigkill_at_random_moments_never_corrupts_outputs_or_state(
    serve: Serve, cli: Cli, tmp_path: Path
) -> None:
    server = serve(paged_app())
    (tmp_path / "flow.yaml").write_text(flow_text(server.url), encoding="utf-8")
    out, state = tmp_path / "out", tmp_path / "state.json"
    args = ["run", "flow.yaml", "--state", "state.json", "--summary", "s.json"]

    first = cli(*args)
    assert first.code == 0, first.stderr
    good, cursor = snapshot(out), read_cursor(state)
    assert cursor == PER_RUN and matches_manifest(good)

    rng = random.Random(20261127)
    outcomes = {"killed": 0, "finished": 0}
    for _ in range(15):
        proc = subprocess.Popen(
            [sys.executable, "-m", "runner.cli", *args],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            proc.wait(rng.uniform(0, 1.5))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
        code = proc.wait(10)
        outcomes["killed" if code == -signal.SIGKILL else "finished"] += 1
        assert code in (0, -signal.SIGKILL)
        good, cursor = check_after_kill(out, state, good, cursor)
    assert outcomes["killed"] >= 5  # the test exercised what it claims to

    final = cli(*args)
    assert final.code == 0, final.stderr
    assert "Traceback" not in final.stderr
    snap = snapshot(out)
    assert matches_manifest(snap)
    assert read_cursor(state) == (cursor or 0) + PER_RUN
    expected = expected_records(cursor or 0)
    for stream in STREAMS:
        assert read_jsonl(out / f"{stream}.jsonl") == expected[stream]


@pytest.mark.parametrize("event_loop", EVENT_LOOPS)
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_sending_commits_nothing_and_exits_in_time(
    sig: signal.Signals, code: int, event_loop: str, serve: Serve, tmp_path: Path
) -> None:
    server = serve(paged_app(page_delay=0, stall_page=3))
    (tmp_path / "flow.yaml").write_text(flow_text(server.url), encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    # A last good version, and a state, that the interrupted run must leave byte for byte.
    (out / "items.jsonl").write_bytes(b'{"seq":1,"name":"old"}\n')
    (out / "meta.jsonl").write_bytes(b'{"since":0}\n')
    (out / "manifest.json").write_bytes(b'{"run_id": "old"}\n')
    state_bytes = b'{"version": 1, "streams": {"items": {"cursor": 0}}, "auth": {}}\n'
    (tmp_path / "state.json").write_bytes(state_bytes)
    before = snapshot(out)

    args = ["run", "flow.yaml", "--state", "state.json", "--summary", "s.json"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "runner.cli", *args],
        cwd=tmp_path,
        env={**os.environ, "RUNNER_EVENT_LOOP": event_loop},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 20
    while not any(r.query.get("page") == ["3"] for r in server.requests):
        assert time.monotonic() < deadline and proc.poll() is None, "the run never got to page 3"
        time.sleep(0.02)
    sent_before = len(server.requests)
    signalled = time.monotonic()
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=10)
    elapsed = time.monotonic() - signalled

    assert proc.returncode == code, stderr
    assert elapsed < 5
    assert f"interrupted by {sig.name}" in stderr
    assert "Traceback" not in stderr
    time.sleep(0.2)
    assert len(server.requests) == sent_before  # stopped sending
    assert snapshot(out) == before
    assert (tmp_path / "state.json").read_bytes() == state_bytes
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["status"] == "interrupted"
    assert summary["exit_code"] == code
    # The records fetched so far are kept only in the partial files, never published.
    partials = list(out.glob(".items.jsonl.*.partial"))
    assert len(partials) <= 1
