"""Exactly once, proven by killing: SIGKILL a run at random moments while it loads, rerun
it, and the table holds every record once and the stored cursor matches the table."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import Serve, WriteFlow
from tests.destinations import Database, ItemsApi, SqliteDatabase, flow_text, item

KILLS = 22
NEW_PER_ROUND = 1500


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    if request.param == "sqlite":
        return SqliteDatabase(tmp_path / "dest.db")
    database: Database = request.getfixturevalue("postgres_db")
    return database


def _run(tmp_path: Path, db: Database, url: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNER_")}
    env["API"] = url
    return subprocess.Popen(
        [sys.executable, "-m", "runner.cli", "run", "flow.yaml", "--sink", db.url],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def test_kill_9_at_random_points_then_rerun(
    serve: Serve, write_flow: WriteFlow, db: Database, tmp_path: Path
) -> None:
    items = ItemsApi([])
    server = serve(items.app())
    # append: a record delivered twice would show as two rows, one lost as none.
    write_flow(flow_text(write="append", primary_key=False, page_size=250))
    rng = random.Random(1803)

    def complete() -> float:
        started = time.monotonic()
        proc = _run(tmp_path, db, server.url)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
        return time.monotonic() - started

    next_id = 1  # the API serves records whose `updated` (= id) is above the cursor

    def add_records() -> None:
        nonlocal next_id
        items.records += [item(i) for i in range(next_id, next_id + NEW_PER_ROUND)]
        next_id += NEW_PER_ROUND

    add_records()
    duration = complete()  # how long one round's run takes here: kills land within it
    outcomes: Counter[str] = Counter()
    for _ in range(KILLS):
        add_records()
        before = len(db.rows("items"))
        proc = _run(tmp_path, db, server.url)
        time.sleep(rng.uniform(0.0, duration * 1.1))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        after = len(db.rows("items"))
        # A killed run committed all of its records or none of them.
        assert after in (before, next_id - 1), (before, after)
        outcomes["committed" if after == next_id - 1 else "nothing"] += 1
        complete()
        rows = db.rows("items")
        ids = Counter(r["id"] for r in rows)
        assert sorted(ids) == list(range(1, next_id)), "a record is missing"
        assert max(ids.values()) == 1, "a record was loaded twice"
        assert db.state() == {"items": next_id - 1}
        assert max(r["updated"] for r in rows) == db.state()["items"]
        assert not {t for t in db.tables() if t.startswith("_runner_stage")}
    assert outcomes["nothing"] >= 1, outcomes
