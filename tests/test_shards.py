"""Sharding (`--shard I/N`, `shard: true`): the hash, validation, what each shard fetches and
writes, its state, its names in the summary, manifest and logs, and the PostgreSQL layout
lock. Through the real CLI against local servers; the hash is checked against its written
definition (SHA-256 of canonical JSON), computed here independently."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from runner.errors import LockedError, RunError, UsageError
from runner.outputs.records import StreamSpec
from runner.shard import Shard, bucket, canonical_json, cursors_for, parse_shard
from tests.conftest import Cli, CliResult, Serve, ServerThread, WriteFlow, app_with, read_jsonl

CUSTOMERS = 24


def owner(value: Any, count: int) -> int:
    """The contract, written out: first 8 bytes big-endian of SHA-256 of canonical JSON."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") % count


# -- the hash and the I/N form ---------------------------------------------------------------


def test_the_hash_is_sha256_of_canonical_json() -> None:
    # Pinned: the same bucket on every machine and Python version, not hash()'s.
    assert canonical_json({"b": [1, "é"], "a": None}) == '{"a":null,"b":[1,"é"]}'.encode()
    # `printf '{"id":1}' | sha256sum` begins 037c9214eef74cc3: that, as a number, mod N.
    assert bucket({"id": 1}, 2**64) == 0x037C9214EEF74CC3
    assert bucket({"id": 1}, 7) == 0x037C9214EEF74CC3 % 7
    for value in ({"id": 3, "name": "x"}, {"name": "x", "id": 3}, "abc", 17, [1, 2]):
        assert bucket(value, 5) == owner(value, 5)
    assert bucket({"name": "x", "id": 3}, 5) == bucket({"id": 3, "name": "x"}, 5)


def test_an_item_that_is_not_json_cannot_be_sharded() -> None:
    with pytest.raises(RunError, match="shard_key"):
        bucket({"x": float("nan")}, 3)


@pytest.mark.parametrize(
    ("text", "expected"), [("0/1", Shard(0, 1)), ("2/3", Shard(2, 3)), (" 7 / 8 ", Shard(7, 8))]
)
def test_shard_forms(text: str, expected: Shard) -> None:
    assert parse_shard(text) == expected
    assert expected.key == f"{expected.index}/{expected.count}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("3/3", "index must be below the number of shards"),
        ("5/2", "index must be below"),
        ("0/0", "at least 1"),
        ("1", "expected I/N"),
        ("-1/3", "expected I/N"),
        ("a/b", "expected I/N"),
        ("1/3/4", "expected I/N"),
    ],
)
def test_bad_shard_forms(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_shard(text)


def test_shard_fills_paths() -> None:
    assert Shard(2, 4).fill("out/{shard}/x-{shard}") == "out/2/x-2"


# -- the state each shard starts from --------------------------------------------------------

SPECS = {"orders": StreamSpec("orders", primary_key=("id",), cursor_field="updated")}


def test_a_shard_reads_its_own_entry_first() -> None:
    state = {
        "streams": {"orders": {"cursor": 5}},
        "shards": {"1/3": {"orders": {"cursor": 9}}, "0/3": {"orders": {"cursor": 7}}},
    }
    assert cursors_for(state, Shard(1, 3), SPECS) == {"orders": {"cursor": 9}}
    assert cursors_for(state, None, SPECS) == {"orders": {"cursor": 5}}


def test_without_an_entry_the_smallest_cursor_of_any_layout_with_its_seen_keys() -> None:
    state = {
        "streams": {"orders": {"cursor": 8, "seen": [[1]]}},
        "shards": {
            "0/3": {"orders": {"cursor": 4, "seen": [[2]]}},
            "1/3": {"orders": {"cursor": 4, "seen": [[3], [2]]}},
            "2/3": {"orders": {"cursor": 6}},
        },
    }
    # N changed from 3 to 2: shard 0/2 has no entry of its own.
    assert cursors_for(state, Shard(0, 2), SPECS) == {"orders": {"cursor": 4, "seen": [[2], [3]]}}
    # And an unsharded run after shard runs only.
    only_shards = {"streams": {}, "shards": state["shards"]}
    assert cursors_for(only_shards, None, SPECS)["orders"]["cursor"] == 4
    assert state["shards"]["2/3"] == {"orders": {"cursor": 6}}  # nothing is deleted


def test_a_shards_siblings_are_no_guide_to_its_cursor() -> None:
    # Shard 1/3 starts after 0/3 and 2/3 committed: their items are not its own, so it
    # starts from the other layouts' entries, or from the beginning when there are none.
    siblings = {"0/3": {"orders": {"cursor": 9}}, "2/3": {"orders": {"cursor": 7}}}
    assert cursors_for({"shards": siblings}, Shard(1, 3), SPECS) == {}
    with_old = {"streams": {"orders": {"cursor": 5}}, "shards": {**siblings, "0/2": {}}}
    assert cursors_for(with_old, Shard(1, 3), SPECS) == {"orders": {"cursor": 5}}
    with_old["shards"]["1/13"] = {"orders": {"cursor": 3}}
    assert cursors_for(with_old, Shard(1, 3), SPECS) == {"orders": {"cursor": 3}}


def test_datetime_cursors_compare_as_times() -> None:
    specs = {
        "orders": StreamSpec(
            "orders", primary_key=("id",), cursor_field="updated", cursor_type="datetime"
        )
    }
    state = {
        "shards": {
            "0/2": {"orders": {"cursor": "2024-03-01T00:00:00+01:00"}},
            "1/2": {"orders": {"cursor": "2024-02-29T23:30:00Z"}},
        }
    }
    # 23:00Z is earlier than 23:30Z, though the string sorts later.
    assert cursors_for(state, None, specs)["orders"]["cursor"] == "2024-03-01T00:00:00+01:00"


# -- validation ------------------------------------------------------------------------------

HEAD = """\
version: 1
name: shop
services:
  api:
    base_url: "{{ env.API }}"
    retry: {max_attempts: 1}
"""

SHARDED = (
    HEAD
    + """\
outputs:
  orders: {primary_key: [id], cursor: {field: updated}}
steps:
  - id: customers
    request: {service: api, path: /customers}
    records: body.items
    emit: customers
  - id: orders
    for_each: steps.customers.records
    shard: true
    concurrency: 3
    request:
      service: api
      path: "/customers/{{ item.id }}/orders"
      query: {i: "{{ item_index }}", since: "{{ state.orders.cursor }}"}
    records: body.items
    emit: orders
"""
)


def test_validate_reports_each_misuse_at_its_key(cli: Cli, write_flow: WriteFlow) -> None:
    write_flow(
        HEAD
        + """\
steps:
  - id: customers
    request: {service: api, path: /customers}
    records: body.items
  - id: nested
    for_each: steps.customers.records
    steps:
      - id: inner
        for_each: "item.tags"
        shard: true
        request: {service: api, path: /x}
  - id: windows
    for_each: "{{ windows('2024-01-01', now(), 'P1M') }}"
    shard: true
    request: {service: api, path: /w}
  - id: from_state
    for_each: state.orders.cursor
    shard: true
    request: {service: api, path: /s}
  - id: no_items
    shard: true
    request: {service: api, path: /n}
  - id: notify
    request: {service: api, path: /done, method: POST}
"""
    )
    result = cli("validate", "flow.yaml")
    assert result.code == 2, result.stderr
    out = result.stdout + result.stderr
    assert (
        "flow.yaml:16:9: steps[1].steps[0].shard: shard: true inside the for_each of step " in out
    )
    assert "flow.yaml:20:5: steps[2].shard: the for_each reads the time" in out
    assert "shard_key: start" in out
    assert "flow.yaml:23:15: steps[3].for_each: a sharded for_each cannot read state" in out
    assert "flow.yaml:26:5: steps[4]: missing required key 'for_each' (needed by 'shard')" in out
    assert (
        "flow.yaml:30:5: steps[5].request: warning: step 'notify' sends POST outside every "
        "shard: true" in out
    )


def test_a_sharded_for_each_cannot_read_a_step_that_reads_state(
    cli: Cli, write_flow: WriteFlow
) -> None:
    # Shard 0 alone keeps the list step's cursor: the others would list other customers.
    since = "query: {since: '{{ state.customers.cursor }}'}"
    write_flow(SHARDED.replace("path: /customers}", f"path: /customers, {since}}}"))
    result = cli("validate", "flow.yaml")
    assert result.code == 2, result.stdout + result.stderr
    assert (
        "flow.yaml:15:15: steps[1].for_each: a sharded for_each cannot read state, nor a step "
        "that does: its items come from step 'customers', which reads state"
    ) in result.stdout + result.stderr


def test_validate_warns_of_a_step_that_reads_a_sharded_step(
    cli: Cli, write_flow: WriteFlow
) -> None:
    write_flow(
        SHARDED
        + """\
  - id: totals
    request: {service: api, path: /totals, method: POST, json: "{{ steps.orders.records }}"}
"""
    )
    result = cli("validate", "flow.yaml")
    assert result.code == 0, result.stdout + result.stderr
    assert (
        "steps[2]: warning: step 'totals' reads steps.orders, which differs from shard to "
        "shard: under --shard it sees this shard's part, and every shard writes its records"
    ) in result.stdout + result.stderr
    # It reads the shard's own part, so its POST is not among the repeated ones.
    assert "sends POST" not in result.stdout + result.stderr


def test_windows_split_by_their_start(cli: Cli, write_flow: WriteFlow) -> None:
    write_flow(
        HEAD
        + """\
steps:
  - id: months
    for_each: "{{ windows('2024-01-01T00:00:00Z', now(), 'P1M') }}"
    shard: true
    shard_key: start
    request: {service: api, path: /w}
"""
    )
    result = cli("validate", "--strict", "flow.yaml")
    assert result.code == 0, result.stdout + result.stderr


def test_the_schema_carries_shard_and_shard_key(cli: Cli) -> None:
    result = cli("schema")
    step = json.loads(result.stdout)["$defs"]["step"]["properties"]
    assert step["shard"]["type"] == "boolean"
    assert step["shard_key"]["type"] == "string"


# -- the runs --------------------------------------------------------------------------------


class Shop:
    """A server with customers and their orders; it counts each customer's order requests
    and keeps the query each arrived with."""

    def __init__(self, customers: int = CUSTOMERS) -> None:
        self.ids = list(range(100, 100 + customers))
        self.hits: dict[int, int] = {}
        self.queries: dict[int, dict[str, str]] = {}
        self.posts = 0
        self.server: ServerThread

    def app(self) -> web.Application:
        async def customers(request: web.Request) -> web.Response:
            return web.json_response({"items": [{"id": i, "tier": i % 3} for i in self.ids]})

        async def orders(request: web.Request) -> web.Response:
            cid = int(request.match_info["id"])
            self.hits[cid] = self.hits.get(cid, 0) + 1
            self.queries[cid] = dict(request.query)
            items = [{"id": cid * 10 + k, "customer": cid, "updated": cid + k} for k in range(2)]
            return web.json_response({"items": items})

        async def done(request: web.Request) -> web.Response:
            self.posts += 1
            return web.json_response({"ok": True})

        return app_with(
            ("GET", "/customers", customers),
            ("GET", "/customers/{id}/orders", orders),
            ("POST", "/done", done),
        )


@pytest.fixture
def shop(serve: Serve) -> Shop:
    """The shop, served; `shop.server` is its server."""
    started = Shop()
    started.server = serve(started.app())
    return started


def run(cli: Cli, server: ServerThread, *args: str, env: dict[str, str] | None = None) -> CliResult:
    result = cli("run", "flow.yaml", *args, env={"API": server.url, **(env or {})})
    return result


def ids(path: Path) -> list[int]:
    return sorted(r["id"] for r in read_jsonl(path)) if path.exists() else []


def test_three_shards_fetch_each_item_once_and_together_write_the_whole_run(
    shop: Shop, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    server = shop.server
    write_flow(SHARDED)
    whole = run(cli, server, "--output-dir", "whole")
    assert whole.code == 0, whole.stderr
    shop.hits.clear()
    for i in range(3):
        result = run(cli, server, "--shard", f"{i}/3", "--summary", f"s{i}.json")
        assert result.code == 0, result.stderr
        assert f"runner {i}/3: INFO:" in result.stderr
        summary = json.loads((tmp_path / f"s{i}.json").read_text())
        assert summary["shard"] == f"{i}/3"
        manifest = json.loads((tmp_path / "out" / str(i) / "manifest.json").read_text())
        assert manifest["shard"] == f"{i}/3"
        # Each shard fetched exactly the customers the hash gives it.
        mine = {c for c in shop.ids if owner({"id": c, "tier": c % 3}, 3) == i}
        fetched = {c for c, q in shop.queries.items() if c in mine}
        assert fetched == mine
    assert shop.hits == dict.fromkeys(shop.ids, 1)
    # item_index is the index in the whole list.
    assert {c: int(q["i"]) for c, q in shop.queries.items()} == {
        c: n for n, c in enumerate(shop.ids)
    }
    orders = sorted(o for i in range(3) for o in ids(tmp_path / "out" / str(i) / "orders.jsonl"))
    assert orders == ids(tmp_path / "whole" / "orders.jsonl")
    assert len(orders) == 2 * CUSTOMERS
    # Records outside the sharded step: shard 0's alone.
    assert ids(tmp_path / "out" / "0" / "customers.jsonl") == shop.ids
    assert ids(tmp_path / "out" / "1" / "customers.jsonl") == []
    assert ids(tmp_path / "out" / "2" / "customers.jsonl") == []
    assert run(cli, server, "--output-dir", "w2", "--summary", "w.json").code == 0
    assert json.loads((tmp_path / "w.json").read_text())["shard"] is None


def test_max_items_cuts_the_whole_list_before_the_split(
    shop: Shop, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    server = shop.server
    write_flow(SHARDED.replace("    shard: true\n", "    shard: true\n    max_items: 10\n"))
    for i in range(2):
        assert run(cli, server, "--shard", f"{i}/2").code == 0
    assert set(shop.hits) == set(shop.ids[:10])
    assert all(n == 1 for n in shop.hits.values())


def test_shard_key_picks_what_is_hashed(
    shop: Shop, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    server = shop.server
    write_flow(SHARDED.replace("    shard: true\n", "    shard: true\n    shard_key: tier\n"))
    for i in range(4):
        shop.hits.clear()
        assert run(cli, server, "--shard", f"{i}/4").code == 0
        assert set(shop.hits) == {c for c in shop.ids if owner(c % 3, 4) == i}


def test_usage_errors_before_any_request(
    shop: Shop, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    server = shop.server
    write_flow(SHARDED)
    for args, env, message in [
        (["--shard", "3/3"], {}, "--shard '3/3': the index must be below the number of shards"),
        (["--shard", "x"], {}, "--shard 'x': expected I/N"),
        ([], {"RUNNER_SHARD": "4/2"}, "RUNNER_SHARD '4/2': the index must be below"),
        (["--output-dir", "out-{shard}"], {}, "--output-dir out-{shard}: {shard} needs --shard"),
        (["--state", "st-{shard}.json"], {}, "--state st-{shard}.json: {shard} needs --shard"),
    ]:
        result = run(cli, server, *args, "--summary", "s.json", env=env)
        assert result.code == 2, (args, result.stderr)
        assert message in result.stderr
        assert "Traceback" not in result.stderr
    assert server.requests == []
    write_flow(HEAD + "steps:\n  - id: one\n    request: {service: api, path: /customers}\n")
    result = run(cli, server, "--shard", "0/2")
    assert result.code == 2
    assert "--shard 0/2: flow 'shop' has no for_each step with shard: true" in result.stderr
    assert server.requests == []


def test_runner_shard_and_a_shard_per_output_dir(
    shop: Shop, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    server = shop.server
    write_flow(SHARDED)
    result = run(cli, server, "--output-dir", "d-{shard}", env={"RUNNER_SHARD": "1/2"})
    assert result.code == 0, result.stderr
    assert ids(tmp_path / "d-1" / "orders.jsonl")
    assert set(shop.hits) == {c for c in shop.ids if owner({"id": c, "tier": c % 3}, 2) == 1}


def test_json_logs_carry_the_shard(
    shop: Shop, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    server = shop.server
    write_flow(SHARDED)
    result = run(cli, server, "--shard", "1/2", "--log-format", "json")
    assert result.code == 0, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert lines and all(line["shard"] == "1/2" for line in lines)
    assert any("of 24 items (shard 1/2)" in line["message"] for line in lines)


def test_rule_emits_outside_the_sharded_step_are_shard_zeros(
    shop: Shop, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    server = shop.server
    write_flow(
        SHARDED
        + """\
  - id: done
    request: {service: api, path: /done, method: POST}
    on_status:
      - status: 200
        action: ok
        emit: done
"""
    )
    for i in range(2):
        result = run(cli, server, "--shard", f"{i}/2")
        assert result.code == 0, result.stderr
        assert "step 'done' sends POST outside every shard: true step" in result.stderr
    assert len(read_jsonl(tmp_path / "out" / "0" / "done.jsonl")) == 1
    assert read_jsonl(tmp_path / "out" / "1" / "done.jsonl") == []


# -- state across layouts --------------------------------------------------------------------


def state_file(tmp_path: Path, name: str = "state.json") -> dict[str, Any]:
    data: dict[str, Any] = json.loads((tmp_path / name).read_text())
    return data


def test_one_state_file_keeps_each_layouts_cursors_apart(
    shop: Shop, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    server = shop.server
    write_flow(SHARDED)
    # An unsharded run first: its cursor is the greatest `updated`.
    assert run(cli, server, "--state", "state.json", "--output-dir", "a").code == 0
    top = max(shop.ids) + 1
    assert state_file(tmp_path)["streams"]["orders"]["cursor"] == top
    # Shards with no entry of their own start from it (the `since` they send)...
    shop.ids.append(500)  # a new customer, with later orders
    for i in range(2):
        assert run(cli, server, "--shard", f"{i}/2", "--state", "state.json").code == 0
    assert {q["since"] for q in shop.queries.values()} == {str(top)}
    state = state_file(tmp_path)
    # ... and keep their own; the unsharded entry stays as it was.
    assert state["streams"]["orders"]["cursor"] == top
    assert set(state["shards"]) == {"0/2", "1/2"}
    owner_of_500 = owner({"id": 500, "tier": 500 % 3}, 2)
    assert state["shards"][f"{owner_of_500}/2"]["orders"]["cursor"] == 501
    # Another N: no entry of its own, so the smallest of all: nothing is skipped.
    shop.queries.clear()
    assert run(cli, server, "--shard", "0/3", "--state", "state.json").code == 0
    assert {q["since"] for q in shop.queries.values()} == {str(top)}
    # The unsharded run reads its own entry again.
    shop.queries.clear()
    assert run(cli, server, "--state", "state.json", "--output-dir", "b").code == 0
    assert {q["since"] for q in shop.queries.values()} == {str(top)}
    assert state_file(tmp_path)["streams"]["orders"]["cursor"] == 501
    assert set(state_file(tmp_path)["shards"]) == {"0/2", "1/2", "0/3"}


def test_a_shards_first_run_after_its_siblings_committed_fetches_from_the_start(
    shop: Shop, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    server = shop.server
    write_flow(SHARDED)
    assert run(cli, server, "--shard", "0/2", "--state", "state.json").code == 0
    assert state_file(tmp_path)["shards"]["0/2"]["orders"]["cursor"] == max(shop.ids) + 1
    shop.queries.clear()
    assert run(cli, server, "--shard", "1/2", "--state", "state.json").code == 0
    # Shard 0's cursor is not shard 1's: shard 1 asks for everything of its own.
    assert shop.queries and {q.get("since") for q in shop.queries.values()} == {None}
    ones = [c for c in shop.ids if owner({"id": c, "tier": c % 3}, 2) == 1]
    assert ids(tmp_path / "out" / "1" / "orders.jsonl") == sorted(
        c * 10 + k for c in ones for k in range(2)
    )


def test_shard_one_keeps_no_cursor_of_shard_zeros_streams(
    shop: Shop, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    server = shop.server
    flow = SHARDED.replace(
        "outputs:\n", "outputs:\n  customers: {primary_key: [id], cursor: {field: id}}\n"
    )
    write_flow(flow)
    for i in range(2):
        assert run(cli, server, "--shard", f"{i}/2", "--state", "st-{shard}.json").code == 0
    assert set(state_file(tmp_path, "st-0.json")["shards"]["0/2"]) == {"customers", "orders"}
    assert set(state_file(tmp_path, "st-1.json")["shards"]["1/2"]) == {"orders"}


# -- PostgreSQL: shards of one layout together, other layouts apart --------------------------


def test_postgres_layouts_exclude_each_other(postgres_url: str) -> None:
    from runner.outputs.postgres import PostgresOutputs

    def outputs(shard: str) -> PostgresOutputs:
        return PostgresOutputs(
            postgres_url, "public", SPECS, ["orders"], {}, flow="shop", run_id="r" + shard[:1],
            shard=shard,
        )  # fmt: skip

    held = [outputs("0/3"), outputs("1/3")]
    for o in held:
        o.acquire()  # the same N: side by side
    try:
        for other in ("", "0/2"):
            blocked = outputs(other)
            with pytest.raises(LockedError, match="is being run as 3 shards"):
                blocked.acquire()
            blocked.release()
        again = outputs("1/3")
        with pytest.raises(LockedError, match="for shard 1/3"):
            again.acquire()
        again.release()
    finally:
        for o in held:
            o.release()
    free = outputs("")
    free.acquire()  # the shards are done: an unsharded run may go on
    try:
        blocked = outputs("2/3")
        with pytest.raises(LockedError, match="is being run as an unsharded run"):
            blocked.acquire()
        blocked.release()
    finally:
        free.release()


def test_a_sqlite_destination_keeps_each_layouts_rows(
    shop: Shop, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    import sqlite3

    server = shop.server
    write_flow(SHARDED)
    sink = ["--sink", "sqlite:///shop.db"]
    assert run(cli, server, *sink).code == 0
    top = str(max(shop.ids) + 1)
    shop.queries.clear()
    for i in range(2):
        result = run(cli, server, *sink, "--shard", f"{i}/2")
        assert result.code == 0, result.stderr
    assert {q["since"] for q in shop.queries.values()} == {top}  # from the unsharded row
    with sqlite3.connect(tmp_path / "shop.db") as db:
        rows = db.execute(
            "SELECT shard, name FROM _runner_state WHERE kind = 'stream' ORDER BY shard"
        ).fetchall()
        count = db.execute("SELECT count(*) FROM orders").fetchone()[0]
    assert rows == [("", "orders"), ("0/2", "orders"), ("1/2", "orders")]
    assert count == 2 * CUSTOMERS  # merged by key: the shards' rows are the unsharded run's


def test_singer_state_names_the_shard(
    shop: Shop, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    server = shop.server
    write_flow(SHARDED)
    result = run(cli, server, "--sink", "singer", "--shard", "1/2", "--state", "st.json")
    assert result.code == 0, result.stderr
    messages = [json.loads(line) for line in result.stdout.splitlines()]
    state = [m["value"] for m in messages if m["type"] == "STATE"]
    assert list(state[-1]["shards"]) == ["1/2"]
    assert "streams" not in state[-1]
    assert state[-1]["shards"]["1/2"] == state_file(tmp_path, "st.json")["shards"]["1/2"]
    records = [m for m in messages if m["type"] == "RECORD"]
    assert records and {m["stream"] for m in records} == {"orders"}


def test_month_windows_up_to_now_split_by_their_start(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    starts: list[str] = []

    async def window(request: web.Request) -> web.Response:
        starts.append(request.query["start"])
        return web.json_response({"start": request.query["start"]})

    server = serve(app_with(("GET", "/w", window)))
    write_flow(
        HEAD
        + """\
steps:
  - id: months
    for_each: "{{ windows('2023-01-01T00:00:00Z', now(), 'P1M') }}"
    shard: true
    shard_key: start
    request: {service: api, path: /w, query: {start: "{{ item.start }}"}}
"""
    )
    assert run(cli, server, "--output-dir", "whole").code == 0
    whole = sorted(starts)
    assert len(whole) >= 36 and len(set(whole)) == len(whole)
    starts.clear()
    parts = []
    for i in range(3):
        assert run(cli, server, "--shard", f"{i}/3").code == 0
        parts.append({s for s in starts if s not in set().union(*parts)})
    assert sorted(starts) == whole  # each window once, in one shard
    for i, part in enumerate(parts):
        assert part == {s for s in whole if owner(s, 3) == i}


def test_eight_shards_prepare_one_fresh_schema_at_once(postgres_url: str) -> None:
    import threading

    from runner.outputs.postgres import PostgresOutputs

    failures: list[str] = []
    barrier = threading.Barrier(8)

    def start(i: int) -> None:
        outputs = PostgresOutputs(
            postgres_url, "fresh", SPECS, ["orders"], {}, flow="shop", run_id=f"r{i}",
            shard=f"{i}/8",
        )  # fmt: skip
        barrier.wait()
        try:
            outputs.acquire()
        except Exception as exc:  # each failure is the test's finding
            failures.append(repr(exc))
        finally:
            outputs.release()

    threads = [threading.Thread(target=start, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert failures == []


def test_a_dry_run_shows_the_shards_own_cursor(
    cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    write_flow(SHARDED)
    state = {"version": 1, "streams": {"orders": {"cursor": 5}}, "shards": {}}
    state["shards"] = {"1/2": {"orders": {"cursor": 42}}}
    (tmp_path / "st-1.json").write_text(json.dumps(state))
    (tmp_path / "st-0.json").write_text(json.dumps(state))
    env = {"API": "http://127.0.0.1:9"}
    own = cli(
        "run", "flow.yaml", "--dry-run", "--shard", "1/2", "--state", "st-{shard}.json", env=env
    )
    assert own.code == 0, own.stderr
    assert "orders: cursor 42" in own.stdout
    other = cli(
        "run", "flow.yaml", "--dry-run", "--shard", "0/2", "--state", "st-{shard}.json", env=env
    )
    assert other.code == 0, other.stderr
    assert "orders: cursor 5" in other.stdout  # no entry of its own: the smallest
