"""SQLite (`sqlite:///rel/path.db`, `sqlite:////abs/path.db`): the embedded database, one
file, no server, the standard library's `sqlite3`.

The database runs in WAL mode, so readers keep reading while a run commits. A run stages
its records in TEMP tables (a file of the connection's own, gone with it), then one write
transaction moves them into the stream tables and writes `_runner_state`. A lock file
beside the database (`path.db.lock`) keeps two runs of the flow apart.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Final

from runner.errors import RunError, UnavailableError, UsageError

from .lockfile import lock_file, unlock_file
from .records import StreamSpec, state_entry
from .sql import STATE_TABLE, UNSHARDED, SqlOutputs, write_mode
from .tables import (
    BOOLEAN,
    DATETIME,
    INTEGER,
    JSON,
    LOADED_AT_COLUMN,
    NUMBER,
    OTHER,
    RUN_ID_COLUMN,
    TEXT,
    Table,
    quote,
)

# Declared types keep the kind readable from the table; each has the affinity its values
# need ("JSON TEXT": TEXT affinity, so that the JSON text `5` is not turned into a number).
_SQL_OF_KIND: Final = {
    INTEGER: "INTEGER",
    NUMBER: "REAL",
    BOOLEAN: "BOOLEAN",
    DATETIME: "TIMESTAMP",
    TEXT: "TEXT",
    JSON: "JSON TEXT",
}
_KIND_OF_SQL: Final = {sql: kind for kind, sql in _SQL_OF_KIND.items()} | {
    "BIGINT": INTEGER,
    "INT": INTEGER,
    "DOUBLE PRECISION": NUMBER,
    "DOUBLE": NUMBER,
    "FLOAT": NUMBER,
    "JSON": JSON,
    "TIMESTAMPTZ": DATETIME,
    "DATETIME": DATETIME,
    "BOOL": BOOLEAN,
}
BUSY_TIMEOUT_S: Final = 30.0


class SqliteOutputs(SqlOutputs):
    """Records and cursors of a run committed into one SQLite file in one transaction."""

    def __init__(
        self,
        path: str,
        streams: Mapping[str, StreamSpec],
        emitted: Iterable[str],
        *,
        flow: str,
        run_id: str,
        shard: str = UNSHARDED,
    ) -> None:
        super().__init__(streams, emitted, flow=flow, run_id=run_id, shard=shard)
        self.path = path
        self.lock_path = path + ".lock"
        self._lock_fd: int | None = None
        self._db: sqlite3.Connection | None = None

    def describe(self) -> str:
        return f"sqlite:///{self.path}"

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the SQLite destination is not connected")
        return self._db

    # -- connecting and locking -------------------------------------------------------------

    def connect(self) -> None:
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            raise UsageError(f"sqlite:///{self.path}: the folder {folder} does not exist")
        self._lock_fd = lock_file(
            self.lock_path, f"of flow '{self.flow}' holds the database {self.path}"
        )
        try:
            # autocommit (isolation_level=None): every transaction is begun explicitly.
            db = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise UsageError(f"sqlite:///{self.path}: cannot open the database: {exc}") from exc
        self._db = db
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise UsageError(f"sqlite:///{self.path}: not a SQLite database: {exc}") from exc
        if str(mode).lower() != "wal":
            raise UsageError(f"sqlite:///{self.path}: cannot switch to WAL mode ({mode})")
        db.execute("PRAGMA synchronous=FULL")  # a commit survives a power cut too
        db.execute("PRAGMA temp_store=FILE")  # staging on disk: memory stays flat
        # Staging is thrown away by any failure: it needs no rollback journal.
        db.execute("PRAGMA temp.journal_mode=OFF")
        db.execute(
            f"CREATE TABLE IF NOT EXISTS {STATE_TABLE} ("
            "flow TEXT NOT NULL, shard TEXT NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL, "
            "value TEXT NOT NULL, run_id TEXT, updated_at TEXT NOT NULL, "
            "PRIMARY KEY (flow, shard, kind, name))"
        )

    def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                if db.in_transaction:
                    db.execute("ROLLBACK")
            db.close()  # TEMP staging tables go with the connection
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            unlock_file(fd)

    # -- state ------------------------------------------------------------------------------

    def read_state(self) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
        streams: dict[str, dict[str, Any]] = {}
        auth: dict[str, Any] = {}
        rows = self.db.execute(
            f"SELECT shard, kind, name, value FROM {STATE_TABLE} WHERE flow = ? "
            "AND kind IN ('stream', 'auth')",
            (self.flow,),
        )
        for shard, kind, name, value in rows:
            if kind == "stream":
                streams.setdefault(shard, {})[name] = json.loads(value)
            else:
                auth[name] = json.loads(value)
        return streams, auth

    def save_refresh_token(self, service: str, token: str) -> None:
        try:
            with self._transaction():
                self._put_state("auth", service, {"refresh_token": token}, UNSHARDED)
        except sqlite3.Error as exc:
            error = self.translate(exc, "store a refresh token")
            assert error is not None
            raise error from exc

    def _put_state(self, kind: str, name: str, value: Any, shard: str) -> None:
        self.db.execute(
            f"INSERT INTO {STATE_TABLE} (flow, shard, kind, name, value, run_id, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (flow, shard, kind, name) DO UPDATE SET "
            "value = excluded.value, run_id = excluded.run_id, updated_at = excluded.updated_at",
            (self.flow, shard, kind, name, json.dumps(value), self.run_id, _now()),
        )

    @contextlib.contextmanager
    def _transaction(self, mode: str = "IMMEDIATE") -> Any:
        db = self.db
        db.execute(f"BEGIN {mode}")
        try:
            yield db
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # -- tables -----------------------------------------------------------------------------

    def found_columns(self, table: str) -> list[tuple[str, str]]:
        rows = self.db.execute(f"PRAGMA main.table_info({quote(table)})").fetchall()
        return [(row[1], str(row[2])) for row in rows]

    def kind_of_sql(self, sql_type: str) -> str:
        return _KIND_OF_SQL.get(sql_type.upper(), OTHER)

    def sql_of_kind(self, kind: str) -> str:
        return _SQL_OF_KIND[kind]

    def stage(self, table: Table, staging: str | None, rows: list[tuple[Any, ...]]) -> str:
        db = self.db
        new = table.take_new()
        with self._transaction("DEFERRED"):
            if staging is None:
                staging = self.staging_name(table.stream)
                columns = ", ".join(f"{quote(c.name)} {c.sql_type}" for c in table.columns)
                db.execute(f"CREATE TEMP TABLE {quote(staging)} ({columns})")
            else:
                for column in new:
                    db.execute(
                        f"ALTER TABLE temp.{quote(staging)} "
                        f"ADD COLUMN {quote(column.name)} {column.sql_type}"
                    )
            names = ", ".join(quote(c.name) for c in table.columns)
            marks = ", ".join("?" * len(table.columns))
            db.executemany(f"INSERT INTO temp.{quote(staging)} ({names}) VALUES ({marks})", rows)
        return staging

    # -- the commit -------------------------------------------------------------------------

    def publish(self, cursors: Mapping[str, Any]) -> None:
        db = self.db
        loaded_at = _now()
        with self._transaction("IMMEDIATE"):
            for stream in sorted(self.tables):
                table = self.tables[stream]
                self._publish_table(db, table, loaded_at)
            for stream, cursor in sorted(cursors.items()):
                if cursor is not None:
                    self._put_state("stream", stream, state_entry(cursor), self.shard)
        for staging in self.staged.values():
            with contextlib.suppress(sqlite3.Error):
                db.execute(f"DROP TABLE IF EXISTS temp.{quote(staging)}")
        self.staged.clear()

    def _publish_table(self, db: sqlite3.Connection, table: Table, loaded_at: str) -> None:
        staging = self.staged.get(table.stream)
        mode = write_mode(table.spec)
        if staging is None and not table.columns:
            return  # no records and no schema: nothing to make a table of
        name = quote(table.stream)
        found = self.found_columns(table.stream)
        if not found:
            defs = [f"{quote(c.name)} {c.sql_type}" for c in table.columns]
            defs += [f"{RUN_ID_COLUMN} TEXT", f"{LOADED_AT_COLUMN} TEXT"]
            if table.primary_key:
                defs.append(f"PRIMARY KEY ({', '.join(quote(k) for k in table.primary_key)})")
            db.execute(f"CREATE TABLE {name} ({', '.join(defs)})")
        else:
            for column_name in self.table_changes(table, found):
                column = table.by_name[column_name]
                db.execute(f"ALTER TABLE {name} ADD COLUMN {quote(column.name)} {column.sql_type}")
            for extra in (RUN_ID_COLUMN, LOADED_AT_COLUMN):
                if extra not in {n for n, _ in found}:
                    db.execute(f"ALTER TABLE {name} ADD COLUMN {extra} TEXT")
        if mode == "replace":
            db.execute(f"DELETE FROM {name}")
        if staging is None:
            return
        cols = ", ".join(quote(c.name) for c in table.columns)
        insert = (
            f"INSERT INTO {name} ({cols}, {RUN_ID_COLUMN}, {LOADED_AT_COLUMN}) "
            f"SELECT {cols}, ?, ? FROM temp.{quote(staging)} WHERE true ORDER BY rowid"
        )
        if mode == "merge":
            # The new record replaces the row: `excluded` holds NULL for a column it lacks.
            keys = ", ".join(quote(k) for k in table.primary_key)
            sets = ", ".join(
                f"{quote(c)} = excluded.{quote(c)}"
                for c, _ in self.found_columns(table.stream)
                if c not in table.primary_key
            )
            insert += f" ON CONFLICT ({keys}) DO UPDATE SET {sets}"
        db.execute(insert, (self.run_id, loaded_at))

    def translate(self, exc: Exception, action: str) -> RunError | None:
        if not isinstance(exc, sqlite3.Error):
            return None
        message = f"SQLite {self.path}: cannot {action}: {exc}"
        if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
            return UnavailableError(message, kind="destination")
        return RunError(message, kind="destination")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
