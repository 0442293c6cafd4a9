"""Sharding proven by simulation: N shard processes of the real CLI started at once against
one local server. Together they write exactly the unsharded run's records, each item is
fetched by one shard, shard 0 alone writes the records outside the sharded step, into
JSONL folders and into one shared PostgreSQL destination that all shards merge into at
the same time; and a shard killed with SIGKILL and rerun alone completes the set without
a duplicate."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from runner.shard import Shard, bucket
from tests.conftest import Serve, ServerThread, WriteFlow, app_with, read_jsonl
from tests.destinations import PostgresDatabase

CUSTOMERS = 60
ORDERS_EACH = 3

FLOW = """\
version: 1
name: fanout
services:
  shop:
    base_url: "{{ env.API }}"
    retry: {max_attempts: 1}
outputs:
  customers: {primary_key: [id]}
  orders: ORDERS_OUTPUT
steps:
  - id: customers
    request: {service: shop, path: /customers}
    records: body.items
    emit: customers
  - id: orders
    for_each: steps.customers.records
    shard: true
    concurrency: 2
    request: {service: shop, path: "/customers/{{ item.id }}/orders"}
    records: body.items
    emit: orders
"""
MERGE = "{primary_key: [id], cursor: {field: updated}}"
# No key: a record written twice would be two rows.
APPEND = "{write: append, cursor: {field: updated}}"


class Shop:
    """Customers and their orders. Counts each customer's order requests; `delay` slows
    every order request, so that a shard can be killed while it runs."""

    def __init__(self, delay: float = 0.0) -> None:
        self.ids = list(range(1000, 1000 + CUSTOMERS))
        self.delay = delay
        self.hits: Counter[int] = Counter()

    def customer(self, cid: int) -> dict[str, Any]:
        return {"id": cid, "name": f"customer {cid}"}

    def app(self) -> web.Application:
        async def customers(request: web.Request) -> web.Response:
            return web.json_response({"items": [self.customer(i) for i in self.ids]})

        async def orders(request: web.Request) -> web.Response:
            cid = int(request.match_info["id"])
            self.hits[cid] += 1
            if self.delay:
                await asyncio.sleep(self.delay)
            items = [
                {"id": cid * 10 + k, "customer": cid, "updated": cid * 10 + k}
                for k in range(ORDERS_EACH)
            ]
            return web.json_response({"items": items})

        return app_with(("GET", "/customers", customers), ("GET", "/customers/{id}/orders", orders))

    def owner(self, cid: int, count: int) -> int:
        return bucket(self.customer(cid), count)

    def orders_of(self, shard: Shard | None = None) -> list[int]:
        """The order ids of the whole run, or of one shard's customers."""
        return sorted(
            cid * 10 + k
            for cid in self.ids
            if shard is None or self.owner(cid, shard.count) == shard.index
            for k in range(ORDERS_EACH)
        )


def start(tmp_path: Path, server: ServerThread, *args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNER_")}
    env["API"] = server.url
    return subprocess.Popen(
        [sys.executable, "-m", "runner.cli", "run", "flow.yaml", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    _, err = proc.communicate(timeout=180)
    return proc.returncode, err


def run_shards_at_once(
    tmp_path: Path, server: ServerThread, count: int, *args: str
) -> dict[int, tuple[int, str]]:
    """Starts shards 0..count-1 together and waits for all of them."""
    procs = {
        i: start(tmp_path, server, "--shard", f"{i}/{count}", "--summary", f"s{i}.json", *args)
        for i in range(count)
    }
    return {i: finish(proc) for i, proc in procs.items()}


def summary(tmp_path: Path, i: int) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((tmp_path / f"s{i}.json").read_text())
    return data


def jsonl_ids(path: Path) -> list[int]:
    return [r["id"] for r in read_jsonl(path)] if path.exists() else []


@pytest.fixture
def shop(serve: Serve) -> tuple[Shop, ServerThread]:
    served = Shop()
    return served, serve(served.app())


@pytest.mark.parametrize("count", [1, 3, 8])
def test_shards_at_once_into_jsonl_write_the_unsharded_runs_records(
    count: int, shop: tuple[Shop, ServerThread], write_flow: WriteFlow, tmp_path: Path
) -> None:
    api, server = shop
    write_flow(FLOW.replace("ORDERS_OUTPUT", MERGE))
    code, err = finish(start(tmp_path, server, "--output-dir", "whole"))
    assert code == 0, err
    whole = jsonl_ids(tmp_path / "whole" / "orders.jsonl")
    assert sorted(whole) == api.orders_of() and len(whole) == CUSTOMERS * ORDERS_EACH
    api.hits.clear()

    results = run_shards_at_once(tmp_path, server, count, "--state", "state-{shard}.json")

    for i, (code, err) in results.items():
        assert code == 0, f"shard {i}/{count}: {err}"
        assert "Traceback" not in err
    # Each customer's orders fetched once, by the shard its hash names.
    assert api.hits == Counter(dict.fromkeys(api.ids, 1))
    union: list[int] = []
    for i in range(count):
        mine = jsonl_ids(tmp_path / "out" / str(i) / "orders.jsonl")
        assert sorted(mine) == api.orders_of(Shard(i, count))
        union += mine
        report = summary(tmp_path, i)
        assert report["shard"] == f"{i}/{count}"
        manifest = json.loads((tmp_path / "out" / str(i) / "manifest.json").read_text())
        assert manifest["shard"] == f"{i}/{count}"
        assert manifest["streams"]["orders"]["count"] == len(mine)
        # The list step ran in every shard; its records are shard 0's alone.
        customers = jsonl_ids(tmp_path / "out" / str(i) / "customers.jsonl")
        assert sorted(customers) == (api.ids if i == 0 else [])
        state = json.loads((tmp_path / f"state-{i}.json").read_text())
        assert state["shards"] == {f"{i}/{count}": {"orders": {"cursor": max(mine)}}}
    assert sorted(union) == sorted(whole)  # the same records, none twice


def pg_rows(db: PostgresDatabase, sql: str) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(db.base_url) as conn:
        return list(conn.execute(sql).fetchall())  # type: ignore[arg-type]


@pytest.mark.parametrize("count", [1, 3, 8])
def test_shards_at_once_merge_into_one_postgres_destination(
    count: int,
    shop: tuple[Shop, ServerThread],
    write_flow: WriteFlow,
    tmp_path: Path,
    postgres_db: PostgresDatabase,
) -> None:
    api, server = shop
    write_flow(FLOW.replace("ORDERS_OUTPUT", MERGE))

    results = run_shards_at_once(tmp_path, server, count, "--sink", postgres_db.url)

    for i, (code, err) in results.items():
        assert code == 0, f"shard {i}/{count}: {err}"
    assert api.hits == Counter(dict.fromkeys(api.ids, 1))
    orders = [row[0] for row in pg_rows(postgres_db, "SELECT id FROM orders ORDER BY id")]
    assert orders == api.orders_of()
    # Each shard's rows carry its own run id: every order landed from its owner's commit.
    run_ids = {i: summary(tmp_path, i)["run_id"] for i in range(count)}
    assert len(set(run_ids.values())) == count
    for cid, run_id in pg_rows(postgres_db, "SELECT customer, _runner_run_id FROM orders"):
        assert run_id == run_ids[api.owner(cid, count)]
    customers = pg_rows(postgres_db, "SELECT id, _runner_run_id FROM customers ORDER BY id")
    assert customers == [(cid, run_ids[0]) for cid in api.ids]
    # Each shard committed its cursor under its own key: its own orders' greatest.
    cursors = pg_rows(
        postgres_db,
        "SELECT shard, value->'cursor' FROM _runner_state "
        "WHERE flow = 'fanout' AND kind = 'stream'",
    )
    assert dict(cursors) == {
        f"{i}/{count}": max(api.orders_of(Shard(i, count))) for i in range(count)
    }


@pytest.fixture
def slow_shop(serve: Serve) -> tuple[Shop, ServerThread]:
    served = Shop(delay=0.15)
    return served, serve(served.app())


def kill_one_shard_then_rerun_it(
    tmp_path: Path, api: Shop, server: ServerThread, after_kill: Callable[[], None], *args: str
) -> None:
    """Starts shards 0..2 of 3, kills shard 1 with SIGKILL once it has fetched a few of its
    customers' orders, lets the others finish, calls `after_kill`, then reruns shard 1
    alone."""
    count, victim = 3, 1
    procs = {i: start(tmp_path, server, "--shard", f"{i}/{count}", *args) for i in range(count)}
    victims_customers = {cid for cid in api.ids if api.owner(cid, count) == victim}
    deadline = time.monotonic() + 60
    while sum(api.hits[cid] for cid in victims_customers) < 3:
        assert time.monotonic() < deadline, "shard 1 never started fetching"
        assert procs[victim].poll() is None, "shard 1 ended before it could be killed"
        time.sleep(0.02)
    procs[victim].send_signal(signal.SIGKILL)
    code, _ = finish(procs[victim])
    assert code == -signal.SIGKILL  # killed mid-run, not finished
    assert sum(api.hits[cid] for cid in victims_customers) < len(victims_customers)
    for i in (0, 2):
        code, err = finish(procs[i])
        assert code == 0, f"shard {i}/{count}: {err}"
    after_kill()

    before_rerun = Counter(api.hits)
    code, err = finish(start(tmp_path, server, "--shard", f"{victim}/{count}", *args))
    assert code == 0, err
    refetched = set((Counter(api.hits) - before_rerun).keys())
    assert refetched == victims_customers  # the rerun took its own part, nothing else


def test_a_killed_shard_rerun_alone_completes_the_jsonl_set(
    slow_shop: tuple[Shop, ServerThread], write_flow: WriteFlow, tmp_path: Path
) -> None:
    api, server = slow_shop
    write_flow(FLOW.replace("ORDERS_OUTPUT", APPEND))

    def in_folder() -> list[str]:
        return sorted(p.name for p in (tmp_path / "out" / "1").iterdir())

    def nothing_published() -> None:
        # The killed shard left its partial file, and published neither records nor manifest.
        assert [name for name in in_folder() if name.endswith(".partial")]
        assert "orders.jsonl" not in in_folder() and "manifest.json" not in in_folder()

    kill_one_shard_then_rerun_it(
        tmp_path, api, server, nothing_published, "--state", "state-{shard}.json"
    )

    union = [oid for i in range(3) for oid in jsonl_ids(tmp_path / "out" / str(i) / "orders.jsonl")]
    assert sorted(union) == api.orders_of()
    assert len(union) == len(set(union))
    assert "manifest.json" in in_folder()
    assert not [name for name in in_folder() if name.endswith((".tmp", ".partial"))]


def test_a_killed_shard_commits_nothing_and_its_rerun_completes_the_table(
    slow_shop: tuple[Shop, ServerThread],
    write_flow: WriteFlow,
    tmp_path: Path,
    postgres_db: PostgresDatabase,
) -> None:
    api, server = slow_shop
    write_flow(FLOW.replace("ORDERS_OUTPUT", APPEND))

    def nothing_committed() -> None:
        committed = {row[0] for row in pg_rows(postgres_db, "SELECT customer FROM orders")}
        assert committed and not {cid for cid in committed if api.owner(cid, 3) == 1}
        shards = pg_rows(postgres_db, "SELECT shard FROM _runner_state WHERE kind = 'stream'")
        assert sorted(s for (s,) in shards) == ["0/3", "2/3"]

    kill_one_shard_then_rerun_it(
        tmp_path, api, server, nothing_committed, "--sink", postgres_db.url
    )

    orders = [row[0] for row in pg_rows(postgres_db, "SELECT id FROM orders ORDER BY id")]
    assert orders == api.orders_of()  # appended, yet each order once: the kill committed none
    cursors = pg_rows(
        postgres_db, "SELECT shard, value->'cursor' FROM _runner_state WHERE kind = 'stream'"
    )
    assert dict(cursors) == {f"{i}/3": max(api.orders_of(Shard(i, 3))) for i in range(3)}
