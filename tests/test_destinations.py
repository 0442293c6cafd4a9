"""Database destinations end to end: the real CLI loads a real API's records into SQLite and
PostgreSQL (started by the tests), and the tests read the tables back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Cli, Serve, WriteFlow, summary_of
from tests.destinations import (
    Database,
    ItemsApi,
    PostgresDatabase,
    SqliteDatabase,
    flow_text,
    item,
)


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        yield SqliteDatabase(tmp_path / "dest.db")
    else:
        yield request.getfixturevalue("postgres_db")


@pytest.fixture
def api(serve: Serve) -> tuple[ItemsApi, str]:
    items = ItemsApi()
    server = serve(items.app())
    return items, server.url


def run(cli: Cli, db: Database, url: str, *args: str) -> tuple[int, str]:
    result = cli(
        "run", "flow.yaml", "--sink", db.url, "--summary", "s.json", *args, env={"API": url}
    )
    return result.code, result.stderr


def test_merge_loads_updates_and_never_duplicates(
    cli: Cli, write_flow: WriteFlow, db: Database, api: tuple[ItemsApi, str], tmp_path: Path
) -> None:
    items, url = api
    items.records = [item(i) for i in range(1, 8)]
    write_flow(flow_text())
    code, err = run(cli, db, url)
    assert code == 0, err
    assert db.data() == [{"id": i, "name": f"item {i}", "updated": i} for i in range(1, 8)]
    assert db.state() == {"items": 7}
    first_run = summary_of(tmp_path)["run_id"]
    rows = db.rows("items")
    assert {r["_runner_run_id"] for r in rows} == {first_run}
    assert all(r["_runner_loaded_at"] for r in rows)

    # Changed and new records: merged by key; the cursor advances; nothing is duplicated.
    items.records[2] = item(3, updated=9, name="three")
    items.records.append(item(8, updated=10))
    code, err = run(cli, db, url)
    assert code == 0, err
    data = db.data()
    assert [r["id"] for r in data] == list(range(1, 9))
    assert data[2] == {"id": 3, "name": "three", "updated": 9}
    assert db.state() == {"items": 10}
    second_run = summary_of(tmp_path)["run_id"]
    by_id = {r["id"]: r["_runner_run_id"] for r in db.rows("items")}
    assert by_id[3] == by_id[8] == second_run and by_id[1] == first_run

    # The same records again (a reset cursor would fetch everything): still one row each.
    code, err = run(cli, db, url)
    assert code == 0, err
    assert len(db.data()) == 8


def test_merge_last_record_of_a_key_wins_and_missing_fields_become_null(
    cli: Cli, write_flow: WriteFlow, db: Database, api: tuple[ItemsApi, str]
) -> None:
    items, url = api
    items.records = [item(1, extra="x"), item(2), {"id": 1, "updated": 3}]
    write_flow(flow_text())
    code, err = run(cli, db, url)
    assert code == 0, err
    assert db.data() == [
        {"id": 1, "name": None, "updated": 3, "extra": None},
        {"id": 2, "name": "item 2", "updated": 2, "extra": None},
    ]


@pytest.mark.parametrize("write", ["append", "replace"])
def test_append_and_replace(
    cli: Cli, write_flow: WriteFlow, db: Database, api: tuple[ItemsApi, str], write: str
) -> None:
    items, url = api
    items.records = [item(i) for i in range(1, 5)]
    write_flow(flow_text(write=write, primary_key=False))
    assert run(cli, db, url)[0] == 0
    items.records = [item(i, updated=10 + i) for i in range(3, 6)]
    code, err = run(cli, db, url)
    assert code == 0, err
    ids = [r["id"] for r in db.rows("items", order="id, updated")]
    if write == "append":
        assert ids == [1, 2, 3, 3, 4, 4, 5]
    else:
        assert ids == [3, 4, 5]


def test_a_failed_run_commits_nothing(
    cli: Cli, write_flow: WriteFlow, db: Database, api: tuple[ItemsApi, str], tmp_path: Path
) -> None:
    items, url = api
    items.records = [item(i) for i in range(1, 4)]
    write_flow(flow_text())
    assert run(cli, db, url)[0] == 0
    before, state = db.rows("items"), db.state()

    items.records = [item(i, updated=10 + i) for i in range(1, 10)]
    code, err = run(cli, db, url, "--input", "fail=true")
    assert code == 1, err
    assert summary_of(tmp_path)["error"]["step"] == "boom"
    assert db.rows("items") == before and db.state() == state
    assert not {t for t in db.tables() if t.startswith("_runner_stage")}


def test_columns_from_the_schema_and_the_records(
    cli: Cli, write_flow: WriteFlow, db: Database, api: tuple[ItemsApi, str]
) -> None:
    items, url = api
    schema = {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "price": {"type": ["number", "null"]},
            "when": {"type": "string", "format": "date-time"},
            "tags": {"type": "array"},
            "ok": {"type": "boolean"},
        },
    }
    items.records = [
        {"id": 1, "updated": 1, "price": 2, "when": "2024-01-01T00:00:00Z", "tags": ["a"]},
        {"id": 2, "updated": 2, "price": None, "ok": True, "meta": {"k": 1}},
    ]
    write_flow(flow_text(schema=schema))
    code, err = run(cli, db, url)
    assert code == 0, err
    columns = db.columns("items")
    assert list(columns)[:5] == ["id", "price", "when", "tags", "ok"]
    assert {"updated", "meta", "_runner_run_id", "_runner_loaded_at"} <= set(columns)
    rows = db.data()
    assert rows[0]["price"] == 2 and rows[1]["price"] is None
    assert rows[1]["ok"] in (True, 1)
    meta = rows[1]["meta"]
    assert (json.loads(meta) if isinstance(meta, str) else meta) == {"k": 1}

    # A field that appears later adds a column; none is dropped.
    items.records = [{"id": 3, "updated": 5, "color": "red"}]
    code, err = run(cli, db, url)
    assert code == 0, err
    assert set(columns) | {"color"} == set(db.columns("items"))
    assert db.data()[2]["color"] == "red"


def test_a_value_that_does_not_fit_fails_naming_stream_field_type_and_key(
    cli: Cli, write_flow: WriteFlow, db: Database, api: tuple[ItemsApi, str], tmp_path: Path
) -> None:
    items, url = api
    items.records = [item(1), item(2)]
    write_flow(flow_text(schema={"type": "object", "properties": {"id": {"type": "integer"}}}))
    assert run(cli, db, url)[0] == 0
    before, state = db.rows("items"), db.state()

    items.records = [item(3), {"id": 4, "name": {"not": "text"}, "updated": 4}]
    code, err = run(cli, db, url)
    assert code == 1, err
    message = summary_of(tmp_path)["error"]["message"]
    assert "stream 'items'" in message and "field 'name'" in message
    assert "id=4" in message and "TEXT" in message.upper()
    assert db.rows("items") == before and db.state() == state


@pytest.mark.parametrize(
    ("record", "words"),
    [
        ({"id": 1, "_runner_x": 1}, "_runner_"),
        ({"id": 1, "Name": "a", "name": "b"}, "differ only in case"),
        ({"id": 1, "n" * 64: 1}, "longer than 63 bytes"),
    ],
)
def test_names_that_cannot_be_columns_fail(
    cli: Cli,
    write_flow: WriteFlow,
    db: Database,
    api: tuple[ItemsApi, str],
    tmp_path: Path,
    record: dict[str, object],
    words: str,
) -> None:
    items, url = api
    items.records = [{**record, "updated": 1}]
    write_flow(flow_text())
    code, err = run(cli, db, url)
    assert code == 1, err
    error = summary_of(tmp_path)["error"]
    assert words in error["message"] and "stream 'items'" in error["message"]
    assert "items" not in db.tables()


def test_replace_cut_short_by_max_pages_fails(
    cli: Cli, write_flow: WriteFlow, db: Database, api: tuple[ItemsApi, str], tmp_path: Path
) -> None:
    items, url = api
    items.records = [item(i) for i in range(1, 10)]
    write_flow(flow_text(write="replace", max_pages="1"))
    code, err = run(cli, db, url)
    assert code == 1, err
    assert "replace" in summary_of(tmp_path)["error"]["message"]
    assert "items" not in db.tables()


def test_sink_from_the_environment_and_conflicting_flags(
    cli: Cli, write_flow: WriteFlow, api: tuple[ItemsApi, str], tmp_path: Path
) -> None:
    items, url = api
    items.records = [item(1)]
    write_flow(flow_text())
    db = SqliteDatabase(tmp_path / "env.db")
    result = cli("run", "flow.yaml", env={"API": url, "RUNNER_SINK": db.url})
    assert result.code == 0, result.stderr
    assert db.data() == [{"id": 1, "name": "item 1", "updated": 1}]
    assert not (tmp_path / "out").exists()

    # A flag beats the variable.
    result = cli(
        "run", "flow.yaml", "--output-dir", "files", env={"API": url, "RUNNER_SINK": db.url}
    )
    assert result.code == 0, result.stderr
    assert (tmp_path / "files" / "items.jsonl").exists()

    for args in (
        ["--sink", db.url, "--output-dir", "x"],
        ["--sink", db.url, "--output", "-"],
        ["--sink", db.url, "--state", "s.json"],
        ["--sink", "sqlite://host/x.db"],
        ["--sink", "sqlite:///"],
        ["--sink", "mysql://u@h/db"],
        ["--sink", "nonsense"],
        ["--sink", "sqlite:///no/such/folder/x.db"],
    ):
        result = cli("run", "flow.yaml", *args, env={"API": url})
        assert result.code == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert items.records and not (tmp_path / "x").exists()


def test_a_second_run_of_the_flow_exits_75(
    cli: Cli, write_flow: WriteFlow, api: tuple[ItemsApi, str], tmp_path: Path
) -> None:
    import fcntl
    import os

    items, url = api
    items.records = [item(1)]
    write_flow(flow_text())
    db = SqliteDatabase(tmp_path / "dest.db")
    fd = os.open(tmp_path / "dest.db.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        code, err = run(cli, db, url)
        assert code == 75, err
        assert "another run of flow 'items-flow'" in err
    finally:
        os.close(fd)
    assert run(cli, db, url)[0] == 0


def _start(tmp_path: Path, db: Database, url: str, *args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNER_")}
    env["API"] = url
    return subprocess.Popen(
        [sys.executable, "-m", "runner.cli", "run", "flow.yaml", "--sink", db.url, *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(predicate: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_two_concurrent_runs_of_a_flow_one_exits_75(
    cli: Cli, write_flow: WriteFlow, db: Database, serve: Serve, tmp_path: Path
) -> None:
    items = ItemsApi([item(i) for i in range(1, 10)])
    server = serve(items.app())
    write_flow(flow_text())
    items.hold.set()
    first = _start(tmp_path, db, server.url)
    try:
        _wait_for(lambda: len(server.requests) >= 1)
        code, err = run(cli, db, server.url)
    finally:
        items.hold.clear()
    assert code == 75, err
    assert "another run of flow 'items-flow'" in err
    assert len(server.requests) == 1  # the second run sent nothing
    _, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert [r["id"] for r in db.data()] == list(range(1, 10))


def test_replace_is_atomic_for_a_concurrent_reader(
    cli: Cli, write_flow: WriteFlow, db: Database, api: tuple[ItemsApi, str]
) -> None:
    items, url = api
    n = 3000
    write_flow(flow_text(write="replace", primary_key=False, page_size=500))
    items.records = [item(i, updated=1) for i in range(n)]
    assert run(cli, db, url)[0] == 0
    seen: list[tuple[int, int]] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            rows = db.rows("items", order="id")
            seen.append((len(rows), len({r["_runner_run_id"] for r in rows})))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for round_ in range(2, 5):
            items.records = [item(i, updated=round_) for i in range(n)]
            code, err = run(cli, db, url)
            assert code == 0, err
    finally:
        stop.set()
        reader.join()
    assert len(seen) > 3
    assert all(snapshot == (n, 1) for snapshot in seen), set(seen)


# -- PostgreSQL: opening, errors after open, the schema and the password --------------------


def test_postgres_opening_errors(
    cli: Cli, write_flow: WriteFlow, postgres_url: str, api: tuple[ItemsApi, str]
) -> None:
    from tests.conftest import free_port, postgres_url_for

    items, url = api
    items.records = [item(1)]
    write_flow(flow_text())
    cases = [
        (f"postgresql://u:hunter2secret@127.0.0.1:{free_port()}/db", 69),
        (postgres_url_for(postgres_url, "no_such_database"), 2),
        (postgres_url.replace("postgres:", "nobody_here:", 1), 2),
        ("postgresql://u@h/db?nonsense_option=1", 2),
        ("postgresql://u:hunter2secret@h:port/db", 2),
    ]
    for sink, expected in cases:
        result = cli("run", "flow.yaml", "--sink", sink, "--summary", "s.json", env={"API": url})
        assert result.code == expected, (sink, result.stderr)
        assert "Traceback" not in result.stderr
        assert "hunter2secret" not in result.stderr


def test_postgres_schema_and_password_from_secrets_dir(
    cli: Cli, write_flow: WriteFlow, postgres_url: str, api: tuple[ItemsApi, str], tmp_path: Path
) -> None:
    from tests.destinations import PostgresDatabase

    items, url = api
    items.records = [item(1), item(2)]
    write_flow(flow_text())
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "PGPASSWORD").write_text("not-needed-but-secret\n")
    db = PostgresDatabase(postgres_url, schema="raw")
    result = cli(
        "run",
        "flow.yaml",
        "--sink",
        db.url,
        env={"API": url, "RUNNER_SECRETS_DIR": str(secrets)},
    )
    assert result.code == 0, result.stderr
    assert [r["id"] for r in db.data()] == [1, 2]
    assert db.state() == {"items": 2}
    assert "_runner_state" in db.tables()
    assert "_runner_state" not in PostgresDatabase(postgres_url).tables()


def test_postgres_connection_lost_during_the_run_exits_69(
    cli: Cli, write_flow: WriteFlow, postgres_db: Database, serve: Serve, tmp_path: Path
) -> None:
    import psycopg

    db = postgres_db
    items = ItemsApi([item(i) for i in range(1, 10)])
    server = serve(items.app())
    write_flow(flow_text())
    assert run(cli, db, server.url)[0] == 0
    before, state = db.rows("items"), db.state()
    items.records = [item(i, updated=20 + i) for i in range(1, 10)]
    items.hold.set()
    sent = len(server.requests)
    proc = _start(tmp_path, db, server.url, "--summary", "s.json")
    try:
        _wait_for(lambda: len(server.requests) > sent)
        assert isinstance(db, PostgresDatabase)
        with psycopg.connect(db.base_url, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
    finally:
        items.hold.clear()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 69, err
    error = summary_of(tmp_path)["error"]
    assert error["kind"] == "destination"
    assert db.rows("items") == before and db.state() == state


def test_a_dry_run_checks_the_sink_but_never_opens_it(
    cli: Cli, write_flow: WriteFlow, api: tuple[ItemsApi, str], tmp_path: Path
) -> None:
    _, url = api
    write_flow(flow_text())
    result = cli("run", "flow.yaml", "--dry-run", "--sink", "sqlite:///dry.db", env={"API": url})
    assert result.code == 0, result.stderr
    assert not (tmp_path / "dry.db").exists() and not (tmp_path / "dry.db.lock").exists()
    result = cli("run", "flow.yaml", "--dry-run", "--sink", "mysql://x/y", env={"API": url})
    assert result.code == 2 and "unknown scheme" in result.stderr
