"""End to end: `cursor.start`, `cursor.lookback` (`state.<stream>.since`) and
`cursor.skip_seen` across runs of the real CLI against a real local server whose data
changes between runs."""

from __future__ import annotations

import json
from collections import Counter
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
    retry: {max_attempts: 1}
"""


def state_of(tmp_path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((tmp_path / "state.json").read_text())
    return data


def run(cli: Cli, server: ServerThread, *args: str) -> CliResult:
    return cli("run", "flow.yaml", "--state", "state.json", *args, env={"API": server.url})


def inclusive_server(rows: list[dict[str, Any]]) -> web.Application:
    """`GET /items?updated_since=T&page=N&limit=L`: rows with updated_at >= T (inclusive,
    compared as instants), oldest first, a page at a time."""
    from runner.expressions import parse_datetime

    async def items(request: web.Request) -> web.Response:
        since = request.query.get("updated_since")
        page = int(request.query.get("page", "1"))
        limit = int(request.query.get("limit", "100"))
        found = sorted(
            (
                r
                for r in rows
                if since is None or parse_datetime(r["updated_at"]) >= parse_datetime(since)
            ),
            key=lambda r: (parse_datetime(r["updated_at"]), r["id"]),
        )
        return web.json_response(found[(page - 1) * limit : page * limit])

    return app_with(("GET", "/items", items))


SKIP_SEEN_FLOW = """
steps:
  - id: items
    request: {service: api, path: /items, query: {updated_since: "{{ state.items.cursor }}"}}
    paginate: {type: page_number, size_param: limit, size: 2}
    records: body
    fields: {id: id, updated_at: updated_at, v: v}
    emit: items
outputs:
  items:
    primary_key: [id]
    cursor: {field: updated_at, type: datetime, start: "2024-01-01T00:00:00Z", skip_seen: true}
"""


def test_skip_seen_emits_every_record_exactly_once_over_five_runs(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    rows: list[dict[str, Any]] = []
    server = serve(inclusive_server(rows))
    write_flow(HEAD + SKIP_SEEN_FLOW)

    def add(id_: int, at: str) -> None:
        rows.append({"id": id_, "updated_at": at, "v": 1})

    # What the server holds before each run: new records, several at the last timestamp,
    # one written in another form of the same instant, and one older than the cursor.
    batches = [
        [(1, "2024-01-01T00:00:00Z"), (2, "2024-01-02T00:00:00Z"), (3, "2024-01-02T00:00:00Z")],
        [(4, "2024-01-02T00:00:00Z"), (5, "2024-01-02T00:00:00.000Z")],
        [],
        [(6, "2024-01-03T00:00:00Z"), (7, "2024-01-03T00:00:00Z"), (8, "2023-12-31T00:00:00Z")],
        [
            (9, "2024-01-03T00:00:00+00:00"),
            (10, "2024-01-04T12:00:00Z"),
            (11, "2024-01-04T12:00:00Z"),
        ],
    ]
    emitted: list[int] = []
    seen_sizes = []
    queries = []
    for number, batch in enumerate(batches):
        for id_, at in batch:
            add(id_, at)
        server.requests.clear()
        result = run(cli, server, "--output-dir", f"out{number}")
        assert result.code == 0, result.stderr
        emitted += [r["id"] for r in read_jsonl(tmp_path / f"out{number}" / "items.jsonl")]
        queries.append(server.requests[0].query.get("updated_since"))
        entry = state_of(tmp_path)["streams"]["items"]
        seen_sizes.append(len(entry["seen"]))

    # Exactly once each, but the record older than the stored cursor (never asked for).
    assert Counter(emitted) == Counter({i: 1 for i in range(1, 12) if i != 8})
    # The first run asks from `start`; each later one from the stored cursor, inclusively.
    assert queries == [
        ["2024-01-01T00:00:00Z"],
        ["2024-01-02T00:00:00Z"],
        ["2024-01-02T00:00:00Z"],
        ["2024-01-02T00:00:00Z"],
        ["2024-01-03T00:00:00Z"],
    ]
    # The state holds only the keys at the greatest value.
    assert state_of(tmp_path)["streams"]["items"] == {
        "cursor": "2024-01-04T12:00:00Z",
        "seen": [[10], [11]],
    }
    assert seen_sizes == [2, 4, 4, 2, 2]
    # A sixth run with nothing new emits nothing and keeps the state.
    before = state_of(tmp_path)
    result = run(cli, server, "--output-dir", "out5")
    assert result.code == 0, result.stderr
    assert read_jsonl(tmp_path / "out5" / "items.jsonl") == []
    assert state_of(tmp_path) == before


def test_without_skip_seen_the_inclusive_flow_repeats_the_boundary(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    rows = [{"id": 1, "updated_at": "2024-01-02T00:00:00Z", "v": 1}]
    server = serve(inclusive_server(rows))
    write_flow(HEAD + SKIP_SEEN_FLOW.replace(", skip_seen: true", ""))
    assert run(cli, server, "--output-dir", "a").code == 0
    assert run(cli, server, "--output-dir", "b").code == 0
    # The duplicate skip_seen exists for.
    assert read_jsonl(tmp_path / "b" / "items.jsonl") == rows
    assert state_of(tmp_path)["streams"]["items"] == {"cursor": "2024-01-02T00:00:00Z"}


def test_start_and_lookback_give_since_and_the_cursor_is_stored_unchanged(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    rows = [{"id": 1, "updated_at": "2024-03-01T10:30:00Z", "v": 1}]
    app = inclusive_server(rows)

    async def numbers(_: web.Request) -> web.Response:
        return web.json_response([{"id": 1}])

    app.router.add_get("/numbers", numbers)
    server = serve(app)
    write_flow(
        HEAD
        + """
steps:
  - id: items
    request:
      service: api
      path: /items
      query: {updated_since: "{{ state.items.since }}", cursor_now: "{{ state.items.cursor }}"}
    records: body
    emit: items
  - id: numbers
    request: {service: api, path: /numbers, query: {updated_since: "{{ state.numbers.since }}"}}
    records: "body[].{id: id, seq: `1700000000`}"
    emit: numbers
outputs:
  items:
    cursor: {field: updated_at, type: datetime, start: "2024-01-01", lookback: PT1H}
  numbers:
    cursor: {field: seq, type: number, lookback: 3600}
"""
    )
    first = run(cli, server)
    assert first.code == 0, first.stderr
    # Before the first run: `start` (lookback does not apply to it); none for `numbers`.
    assert server.requests[0].query == {
        "updated_since": ["2024-01-01"],
        "cursor_now": ["2024-01-01"],
    }
    assert server.requests[1].query == {}
    assert state_of(tmp_path)["streams"] == {
        "items": {"cursor": "2024-03-01T10:30:00Z"},
        "numbers": {"cursor": 1700000000},
    }
    server.requests.clear()
    second = run(cli, server)
    assert second.code == 0, second.stderr
    assert server.requests[0].query == {
        "updated_since": ["2024-03-01T09:30:00Z"],
        "cursor_now": ["2024-03-01T10:30:00Z"],
    }
    assert server.requests[1].query == {"updated_since": ["1699996400"]}
    assert state_of(tmp_path)["streams"]["items"] == {"cursor": "2024-03-01T10:30:00Z"}


def test_start_is_never_stored_by_itself(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    rows: list[dict[str, Any]] = []
    server = serve(inclusive_server(rows))
    write_flow(HEAD + SKIP_SEEN_FLOW)
    result = run(cli, server)
    assert result.code == 0, result.stderr
    assert state_of(tmp_path)["streams"] == {}


def test_dry_run_shows_the_mapping_and_what_state_templates_read(
    cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    write_flow(
        HEAD.replace('"{{ env.API }}"', "https://api.example.com")
        + """
steps:
  - id: items
    request: {service: api, path: /items, query: {updated_since: "{{ state.items.since }}"}}
    records: body.data
    filter: "{{ record.kind != 'test' }}"
    fields: {Id: id, updatedAt: updated_at}
    add_fields: {meta.source: "'api'"}
    drop_fields: [meta.debug]
    rename_keys: snake
    emit: items
outputs:
  items:
    primary_key: [id]
    cursor: {field: updated_at, type: datetime, start: "2024-01-01T00:00:00Z", skip_seen: true}
"""
    )
    (tmp_path / "state.json").write_text(
        json.dumps(
            {
                "version": 1,
                "streams": {"items": {"cursor": "2024-02-01T00:00:00Z", "seen": [[1], [2]]}},
            }
        )
    )
    result = cli("run", "flow.yaml", "--dry-run", "--state", "state.json")
    assert result.code == 0, result.stderr
    assert result.stdout.strip().split("\n\n") == [
        "step items:\n"
        "  GET https://api.example.com/items?updated_since=2024-02-01T00:00:00Z\n"
        "  map: records body.data -> filter {{ record.kind != 'test' }} -> fields Id, updatedAt"
        " -> add_fields meta.source -> drop_fields meta.debug -> rename_keys snake -> skip_seen"
        " -> emit items",
        "state:\n"
        '  items: cursor "2024-02-01T00:00:00Z", since "2024-02-01T00:00:00Z" (stored,'
        " skip_seen: 2 keys seen at the cursor)",
    ]


def test_skip_seen_keeps_its_keys_in_a_sqlite_destination(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    import sqlite3

    rows = [
        {"id": 1, "updated_at": "2024-01-02T00:00:00Z", "v": 1},
        {"id": 2, "updated_at": "2024-01-02T00:00:00Z", "v": 1},
    ]
    server = serve(inclusive_server(rows))
    write_flow(HEAD + SKIP_SEEN_FLOW)
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"

    def sink_run() -> CliResult:
        return cli(
            "run", "flow.yaml", "--sink", url, "--summary", "s.json", env={"API": server.url}
        )

    assert sink_run().code == 0
    rows.append({"id": 3, "updated_at": "2024-01-02T00:00:00Z", "v": 2})
    rows[0]["v"] = 1  # sent again unchanged at the cursor: dropped
    second = sink_run()
    assert second.code == 0, second.stderr
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["records"] == {"items": 1}
    with sqlite3.connect(tmp_path / "db.sqlite") as db:
        ids = [r[0] for r in db.execute("SELECT id FROM items ORDER BY id")]
        (state,) = db.execute(
            "SELECT value FROM _runner_state WHERE kind = 'stream' AND name = 'items'"
        ).fetchone()
    assert ids == [1, 2, 3]
    assert json.loads(state) == {"cursor": "2024-01-02T00:00:00Z", "seen": [[1], [2], [3]]}
    assert server.requests[-1].query["updated_since"] == ["2024-01-02T00:00:00Z"]
