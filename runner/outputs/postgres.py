"""PostgreSQL (`postgresql://user@host:5432/db?schema=raw`) through psycopg 3.

A run holds `pg_try_advisory_lock` for its flow (and shard) on the connection that will
commit: a second run exits 75, and a run whose connection dropped cannot commit. Records
go with `COPY` into an UNLOGGED staging table of the run; the commit is one transaction of
`INSERT ... SELECT` (with `ON CONFLICT DO UPDATE` for merge, after a `DELETE` for replace),
the staging tables dropped, and the cursors written to `_runner_state`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from runner.errors import LockedError, RunError, UnavailableError, UsageError
from runner.redact import Redactor
from runner.secrets import read_secret

from .records import StreamSpec, state_entry
from .sql import STAGE_PREFIX, STATE_TABLE, UNSHARDED, SqlOutputs, write_mode
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

if TYPE_CHECKING:
    import psycopg

_SQL_OF_KIND: Final = {
    INTEGER: "BIGINT",
    NUMBER: "DOUBLE PRECISION",
    BOOLEAN: "BOOLEAN",
    DATETIME: "TIMESTAMPTZ",
    TEXT: "TEXT",
    JSON: "JSONB",
}
_KIND_OF_SQL: Final = {
    "bigint": INTEGER,
    "integer": INTEGER,
    "smallint": INTEGER,
    "double precision": NUMBER,
    "real": NUMBER,
    "boolean": BOOLEAN,
    "timestamp with time zone": DATETIME,
    "text": TEXT,
    "jsonb": JSON,
    "json": JSON,
}
CONNECT_TIMEOUT_S: Final = 10
# A server that answered but refused: a usage problem (exit 2), unless it is only busy.
_TRANSIENT: Final = ("starting up", "shutting down", "too many", "recovery mode")


def _import_psycopg() -> Any:
    try:
        import psycopg
    except ImportError as exc:
        raise UsageError(
            "a postgresql:// sink needs psycopg: pip install 'runner[postgres]'"
        ) from exc
    return psycopg


def parse_postgres_url(url: str, environ: Mapping[str, str], redactor: Redactor) -> tuple[str, str]:
    """(connection string, schema) of a sink URL, checked by psycopg without connecting;
    its password is a secret."""
    psycopg = _import_psycopg()
    parts = urlsplit(url)
    try:
        password = parts.password
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        raise UsageError(f"--sink: not a PostgreSQL URL: {exc}") from exc
    if password:
        redactor.add(password)
        redactor.add(unquote(password))
    query = parse_qsl(parts.query, keep_blank_values=True)
    schemas = [v for k, v in query if k == "schema"]
    rest = [(k, v) for k, v in query if k != "schema"]
    schema = schemas[-1] if schemas else "public"
    if not schema or "\x00" in schema or len(schema.encode()) > 63:
        raise UsageError(f"--sink {redactor.redact(url)}: schema {schema!r} is not a valid name")
    conninfo = urlunsplit(parts._replace(query=urlencode(rest)))
    try:
        psycopg.conninfo.conninfo_to_dict(conninfo)
    except psycopg.Error as exc:
        raise UsageError(
            f"--sink {redactor.redact(url)}: not a PostgreSQL URL: {redactor.redact(str(exc))}"
        ) from exc
    if not parts.hostname and not parts.path.strip("/"):
        raise UsageError(f"--sink {redactor.redact(url)}: no host or database in the URL")
    secret = read_secret("PGPASSWORD", environ)
    if secret:
        redactor.add(secret)
    return conninfo, schema


def _lock_key(*parts: str) -> int:
    digest = hashlib.sha256("\x00".join(("runner", *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class PostgresOutputs(SqlOutputs):
    """Records and cursors of a run committed into PostgreSQL in one transaction."""

    def __init__(
        self,
        conninfo: str,
        schema: str,
        streams: Mapping[str, StreamSpec],
        emitted: Iterable[str],
        environ: Mapping[str, str],
        *,
        flow: str,
        run_id: str,
        shard: str = UNSHARDED,
    ) -> None:
        super().__init__(streams, emitted, flow=flow, run_id=run_id, shard=shard)
        self.conninfo = conninfo
        self.schema = schema
        self._password = None if urlsplit(conninfo).password else read_secret(
            "PGPASSWORD", environ
        )  # fmt: skip
        self._conn: psycopg.Connection[Any] | None = None
        self._committed = False

    def describe(self) -> str:
        parts = urlsplit(self.conninfo)
        return f"postgresql://{parts.hostname or 'localhost'}{parts.path} (schema {self.schema})"

    @property
    def conn(self) -> psycopg.Connection[Any]:
        if self._conn is None:
            raise RuntimeError("the PostgreSQL destination is not connected")
        return self._conn

    def _name(self, table: str) -> str:
        return f"{quote(self.schema)}.{quote(table)}"

    # -- connecting and locking -------------------------------------------------------------

    def connect(self) -> None:
        psycopg = _import_psycopg()
        extra: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT_S}
        if self._password:
            extra["password"] = self._password
        try:
            conn = psycopg.connect(self.conninfo, autocommit=True, **extra)
        except psycopg.OperationalError as exc:
            text = str(exc)
            if "FATAL" in text and not any(word in text for word in _TRANSIENT):
                raise UsageError(f"PostgreSQL refused the connection: {text.strip()}") from exc
            raise UnavailableError(
                f"PostgreSQL cannot be reached: {text.strip()}", kind="destination"
            ) from exc
        except psycopg.Error as exc:
            raise UsageError(f"PostgreSQL: cannot connect: {exc}") from exc
        self._conn = conn
        try:
            conn.execute("SET TIME ZONE 'UTC'")
            key = _lock_key(self.schema, self.flow, self.shard)
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
            if not row or not row[0]:
                raise LockedError(
                    f"another run of flow '{self.flow}' holds its lock in PostgreSQL "
                    f"(schema {self.schema})"
                    + (f" for shard {self.shard}" if self.shard != UNSHARDED else "")
                )
            self._lock_layout(conn)
            # Shards start at once: two `CREATE ... IF NOT EXISTS` of one name at the same
            # moment can both try, and one fails on the catalog's unique index.
            with conn.transaction():
                conn.execute(
                    "SELECT pg_advisory_xact_lock(%s)", (_lock_key("schema", self.schema),)
                )
                conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote(self.schema)}")
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {self._name(STATE_TABLE)} ("
                    "flow TEXT NOT NULL, shard TEXT NOT NULL, kind TEXT NOT NULL, "
                    "name TEXT NOT NULL, value JSONB NOT NULL, run_id TEXT, "
                    "updated_at TIMESTAMPTZ NOT NULL DEFAULT now(), "
                    "PRIMARY KEY (flow, shard, kind, name))"
                )
            self._drop_dead_staging()
        except psycopg.OperationalError as exc:
            raise UnavailableError(f"PostgreSQL: {exc}", kind="destination") from exc
        except psycopg.Error as exc:
            raise UsageError(f"PostgreSQL: cannot prepare schema {self.schema}: {exc}") from exc

    def _lock_layout(self, conn: psycopg.Connection[Any]) -> None:
        """Shards of one layout (the same N) run side by side; an unsharded run and shards of
        another N would keep cursors the others do not see, so they exclude each other. Each
        run holds a shared lock on (flow, N), 0 when unsharded, then looks for another N's:
        of two that start at once, each sees the other and both exit 75, none goes on."""
        layout = _lock_key("layout", self.schema, self.flow) & 0x7FFFFFFF
        count = int(self.shard.rpartition("/")[2]) if self.shard != UNSHARDED else 0
        conn.execute("SELECT pg_try_advisory_lock_shared(%s::int4, %s::int4)", (layout, count))
        row = conn.execute(
            "SELECT objid::bigint FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND objsubid = 2 AND classid::bigint = %s AND objid::bigint <> %s "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "LIMIT 1",
            (layout, count),
        ).fetchone()
        if row is not None:
            other = f"{row[0]} shards" if row[0] else "an unsharded run"
            mine = f"{count} shards" if count else "an unsharded run"
            raise LockedError(
                f"flow '{self.flow}' is being run as {other} in PostgreSQL (schema "
                f"{self.schema}), and this run is {mine}: one layout at a time; run this one "
                "when those have finished"
            )

    def _drop_dead_staging(self) -> None:
        """Staging tables of this flow and shard from runs that died: the lock is ours, so
        no live run owns them."""
        prefix = f"{STAGE_PREFIX}{self.key}_"
        mine = self.staging_of_run()
        rows = self.conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = %s AND left(tablename, %s) = %s",
            (self.schema, len(prefix), prefix),
        ).fetchall()
        for (name,) in rows:
            if not name.startswith(mine):
                self.conn.execute(f"DROP TABLE IF EXISTS {self._name(name)}")

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            if not conn.closed and not conn.broken and self.staged and not self._committed:
                for staging in self.staged.values():
                    conn.execute(f"DROP TABLE IF EXISTS {self._name(staging)}")
        finally:
            conn.close()  # the session's advisory lock goes with it

    # -- state ------------------------------------------------------------------------------

    def read_state(self) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
        streams: dict[str, dict[str, Any]] = {}
        auth: dict[str, Any] = {}
        rows = self.conn.execute(
            f"SELECT shard, kind, name, value FROM {self._name(STATE_TABLE)} WHERE flow = %s "
            "AND kind IN ('stream', 'auth')",
            (self.flow,),
        ).fetchall()
        for shard, kind, name, value in rows:
            if kind == "stream":
                streams.setdefault(shard, {})[name] = value
            else:
                auth[name] = value
        return streams, auth

    def save_refresh_token(self, service: str, token: str) -> None:
        def save() -> None:
            with self.conn.transaction():
                self._put_state("auth", service, {"refresh_token": token}, UNSHARDED)

        self._guard("store a refresh token", save)

    def _put_state(self, kind: str, name: str, value: Any, shard: str) -> None:
        from psycopg.types.json import Jsonb

        self.conn.execute(
            f"INSERT INTO {self._name(STATE_TABLE)} (flow, shard, kind, name, value, run_id) "
            "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (flow, shard, kind, name) DO UPDATE "
            "SET value = EXCLUDED.value, run_id = EXCLUDED.run_id, updated_at = now()",
            (self.flow, shard, kind, name, Jsonb(value), self.run_id),
        )

    # -- tables -----------------------------------------------------------------------------

    def found_columns(self, table: str) -> list[tuple[str, str]]:
        rows = self.conn.execute(
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
            "JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped "
            "ORDER BY a.attnum",
            (self.schema, table),
        ).fetchall()
        return [(str(name), str(sql_type)) for name, sql_type in rows]

    def kind_of_sql(self, sql_type: str) -> str:
        return _KIND_OF_SQL.get(sql_type.lower(), OTHER)

    def sql_of_kind(self, kind: str) -> str:
        return _SQL_OF_KIND[kind]

    def stage(self, table: Table, staging: str | None, rows: list[tuple[Any, ...]]) -> str:
        conn = self.conn
        new = table.take_new()
        if staging is None:
            staging = self.staging_name(table.stream)
            # Rows are only ever appended to it, so their physical order (ctid) is the
            # order they came in: the merge's "last record of a key" needs no counter.
            columns = ", ".join(f"{quote(c.name)} {c.sql_type}" for c in table.columns)
            conn.execute(f"CREATE UNLOGGED TABLE {self._name(staging)} ({columns})")
        else:
            for column in new:
                conn.execute(
                    f"ALTER TABLE {self._name(staging)} "
                    f"ADD COLUMN {quote(column.name)} {column.sql_type}"
                )
        names = ", ".join(quote(c.name) for c in table.columns)
        copy_sql = f"COPY {self._name(staging)} ({names}) FROM STDIN"
        with conn.transaction(), conn.cursor() as cursor, cursor.copy(copy_sql) as copy:
            write_row = copy.write_row
            for row in rows:
                write_row(row)
        return staging

    # -- the commit -------------------------------------------------------------------------

    def publish(self, cursors: Mapping[str, Any]) -> None:
        conn = self.conn
        with conn.transaction():
            # The merge sorts the staged rows by key: in memory rather than on disk.
            conn.execute("SET LOCAL work_mem = '256MB'")
            for stream in sorted(self.tables):
                self._publish_table(self.tables[stream])
            for stream, cursor in sorted(cursors.items()):
                if cursor is not None:
                    self._put_state("stream", stream, state_entry(cursor), self.shard)
        self._committed = True
        self.staged.clear()

    def _publish_table(self, table: Table) -> None:
        conn = self.conn
        staging = self.staged.get(table.stream)
        if staging is None and not table.columns:
            return  # no records and no schema: nothing to make a table of
        name = self._name(table.stream)
        # DDL of one table by one run at a time, whatever the flow: re-read, then change.
        conn.execute(
            "SELECT pg_advisory_xact_lock(%s)", (_lock_key("table", self.schema, table.stream),)
        )
        found = self.found_columns(table.stream)
        if not found and staging is not None:
            self._create_from_staging(table, name, self._name(staging))
            return
        if not found:
            defs = [f"{quote(c.name)} {c.sql_type}" for c in table.columns]
            defs += [f"{RUN_ID_COLUMN} TEXT", f"{LOADED_AT_COLUMN} TIMESTAMPTZ"]
            if table.primary_key:
                defs.append(f"PRIMARY KEY ({', '.join(quote(k) for k in table.primary_key)})")
            conn.execute(f"CREATE TABLE {name} ({', '.join(defs)})")
        else:
            for column_name in self.table_changes(table, found):
                column = table.by_name[column_name]
                conn.execute(
                    f"ALTER TABLE {name} ADD COLUMN {quote(column.name)} {column.sql_type}"
                )
            names = {n for n, _ in found}
            if RUN_ID_COLUMN not in names:
                conn.execute(f"ALTER TABLE {name} ADD COLUMN {RUN_ID_COLUMN} TEXT")
            if LOADED_AT_COLUMN not in names:
                conn.execute(f"ALTER TABLE {name} ADD COLUMN {LOADED_AT_COLUMN} TIMESTAMPTZ")
        mode = write_mode(table.spec)
        if mode == "replace":
            conn.execute(f"DELETE FROM {name}")
        if staging is None:
            return
        cols = ", ".join(quote(c.name) for c in table.columns)
        source = self._name(staging)
        if mode == "merge":
            # PostgreSQL refuses to update one row twice in a statement: the last row of
            # each key only, then the record replaces the row (NULL for what it lacks).
            keys = ", ".join(quote(k) for k in table.primary_key)
            sets = ", ".join(
                f"{quote(c)} = EXCLUDED.{quote(c)}"
                for c, _ in self.found_columns(table.stream)
                if c not in table.primary_key
            )
            conn.execute(
                f"INSERT INTO {name} ({cols}, {RUN_ID_COLUMN}, {LOADED_AT_COLUMN}) "
                f"SELECT DISTINCT ON ({keys}) {cols}, %s, now() FROM {source} "
                f"ORDER BY {keys}, ctid DESC ON CONFLICT ({keys}) DO UPDATE SET {sets}",
                (self.run_id,),
            )
        else:
            conn.execute(
                f"INSERT INTO {name} ({cols}, {RUN_ID_COLUMN}, {LOADED_AT_COLUMN}) "
                f"SELECT {cols}, %s, now() FROM {source} ORDER BY ctid",
                (self.run_id,),
            )
        conn.execute(f"DROP TABLE {source}")

    def _create_from_staging(self, table: Table, name: str, source: str) -> None:
        """A new table, made from the staging rows in one statement, its primary key built
        afterwards by one sort: a bulk load, cheaper than inserting row by row into an
        index. Nobody sees the table before the commit."""
        from psycopg import sql

        cols = ", ".join(quote(c.name) for c in table.columns)
        order = "ctid"
        distinct = ""
        if table.primary_key and write_mode(table.spec) == "merge":
            keys = ", ".join(quote(k) for k in table.primary_key)
            distinct = f"DISTINCT ON ({keys}) "
            order = f"{keys}, ctid DESC"
        run_id = sql.Literal(self.run_id).as_string(self.conn)
        self.conn.execute(
            f"CREATE TABLE {name} AS SELECT {distinct}{cols}, {run_id}::TEXT AS {RUN_ID_COLUMN}, "
            f"now() AS {LOADED_AT_COLUMN} FROM {source} ORDER BY {order}"
        )
        if table.primary_key:
            keys = ", ".join(quote(k) for k in table.primary_key)
            self.conn.execute(f"ALTER TABLE {name} ADD PRIMARY KEY ({keys})")
        self.conn.execute(f"DROP TABLE {source}")

    def translate(self, exc: Exception, action: str) -> RunError | None:
        psycopg = _import_psycopg()
        if not isinstance(exc, psycopg.Error):
            return None
        text = str(exc).strip()
        message = f"PostgreSQL: cannot {action}: {text}"
        conn = self._conn
        if isinstance(exc, psycopg.OperationalError) or (conn is not None and conn.broken):
            return UnavailableError(message, kind="destination")
        return RunError(message, kind="destination")


__all__ = ["PostgresOutputs", "parse_postgres_url"]
