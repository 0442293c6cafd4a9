"""What SQLite and PostgreSQL share: batches of checked rows into a staging table of the run,
then one transaction that moves them into the stream tables and writes the new cursors
into `_runner_state`. A failed, killed or interrupted run commits nothing.
"""

from __future__ import annotations

import hashlib
import logging
from abc import abstractmethod
from collections.abc import Collection, Iterable, Mapping
from typing import Any, Final

from runner.errors import RunError

from .base import Outputs
from .records import STATE_VERSION, StreamSpec
from .tables import OTHER, Table, check_name

log = logging.getLogger("runner")

BATCH_ROWS: Final = 5_000  # rows per staging write: few round trips, bounded memory
STATE_TABLE: Final = "_runner_state"
STAGE_PREFIX: Final = "_runner_stage_"
UNSHARDED: Final = ""  # the shard key of an unsharded run in `_runner_state`

WRITE_DEFAULT: Final = {True: "merge", False: "append"}


def write_mode(spec: StreamSpec) -> str:
    """`outputs.<stream>.write`, or its default: merge with a primary key, else append."""
    return spec.write or WRITE_DEFAULT[bool(spec.primary_key)]


def flow_key(flow: str, shard: str) -> str:
    """A short, stable name of a flow and shard: staging tables and locks carry it."""
    return hashlib.sha256(f"{flow}\x00{shard}".encode()).hexdigest()[:12]


class DatabaseState:
    """The flow's state in the database's `_runner_state` table (a `StateBackend`). The
    destination takes the lock and commits the cursors; this answers the engine's reads
    and stores rotated refresh tokens at once."""

    def __init__(self, outputs: SqlOutputs) -> None:
        self._outputs = outputs
        self._loaded: dict[str, Any] | None = None

    def acquire(self) -> None:
        pass  # the destination's own acquire() connects and locks

    def release(self) -> None:
        pass

    def load(self) -> dict[str, Any]:
        """The state file's shape: the unsharded run's cursors in `streams`, each shard's
        under `shards`, whichever this run is (it starts from another's where it has none)."""
        by_shard, auth = self._outputs.read_state()
        shards = {key: streams for key, streams in by_shard.items() if key != UNSHARDED}
        self._loaded = {
            "version": STATE_VERSION,
            "streams": by_shard.get(UNSHARDED, {}),
            "shards": shards,
            "auth": auth,
        }
        return self._loaded

    def refresh_token(self, service: str) -> str | None:
        state = self._loaded if self._loaded is not None else self.load()
        token = state["auth"].get(service, {}).get("refresh_token")
        return token if isinstance(token, str) else None

    def save_refresh_token(self, service: str, token: str) -> None:
        self._outputs.save_refresh_token(service, token)
        if self._loaded is not None:
            self._loaded["auth"].setdefault(service, {})["refresh_token"] = token


class SqlOutputs(Outputs):
    """A database destination. Subclasses give the dialect: connecting and locking, the
    columns of a table, the staging writes and the commit's statements."""

    def __init__(
        self,
        streams: Mapping[str, StreamSpec],
        emitted: Iterable[str],
        *,
        flow: str,
        run_id: str,
        shard: str = UNSHARDED,
    ) -> None:
        super().__init__(streams)
        self.flow = flow
        self.shard = shard
        self.run_id = run_id
        self.key = flow_key(flow, shard)
        self.specs: dict[str, StreamSpec] = dict(streams)
        for name in sorted({*streams, *emitted}):
            self.specs.setdefault(name, StreamSpec(name))
            self.counts.setdefault(name, 0)
        for name in self.specs:
            check_name(name, name, "stream")
        self.tables: dict[str, Table] = {}
        self.staged: dict[str, str] = {}  # stream -> staging table of this run
        self._batches: dict[str, list[dict[str, Any]]] = {}
        self.state = DatabaseState(self)
        self._stagings = 0

    # -- the dialect ------------------------------------------------------------------------

    @abstractmethod
    def connect(self) -> None:
        """Connect, take the flow's lock, make `_runner_state`, drop dead runs' staging."""

    @abstractmethod
    def close(self) -> None:
        """Roll back what is open, drop this run's staging if it can, disconnect."""

    @abstractmethod
    def read_state(self) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
        """(shard -> stream -> entry, auth) of this flow from `_runner_state`: every shard's
        cursors (`''` for unsharded runs)."""

    @abstractmethod
    def save_refresh_token(self, service: str, token: str) -> None: ...

    @abstractmethod
    def found_columns(self, table: str) -> list[tuple[str, str]]:
        """(name, SQL type) of the table's columns; empty if there is no such table."""

    @abstractmethod
    def kind_of_sql(self, sql_type: str) -> str: ...

    @abstractmethod
    def sql_of_kind(self, kind: str) -> str: ...

    @abstractmethod
    def stage(self, table: Table, staging: str | None, rows: list[tuple[Any, ...]]) -> str:
        """Write rows to the stream's staging table (made on first use, with the columns
        that `table.take_new()` gives); returns its name."""

    @abstractmethod
    def publish(self, cursors: Mapping[str, Any]) -> None:
        """The one transaction: every stream table, then the cursors; commit."""

    @abstractmethod
    def translate(self, exc: Exception, action: str) -> RunError | None:
        """The project's error for a driver's exception, or None if it is not the driver's."""

    # -- the seam ---------------------------------------------------------------------------

    def staging_of_run(self) -> str:
        """The start of this run's staging table names: prefix, flow and shard, run id."""
        return f"{STAGE_PREFIX}{self.key}_{self.run_id.replace('-', '_').lower()}_"

    def staging_name(self, stream: str) -> str:
        self._stagings += 1
        return f"{self.staging_of_run()}{self._stagings}"

    def acquire(self) -> None:
        try:
            self._guard("open the destination", self.connect)
        except BaseException:
            self.release()  # what connect() got before failing: the lock, the connection
            raise

    def release(self) -> None:
        try:
            self.close()
        except Exception:  # leaving: a broken connection has nothing left to give back
            log.debug("closing the destination failed", exc_info=True)

    def open(self) -> None:
        def read_tables() -> None:
            for name, spec in self.specs.items():
                self.tables[name] = Table(
                    spec, self.found_columns(name), self.kind_of_sql, self.sql_of_kind
                )

        self._guard("read the destination's tables", read_tables)

    def _table(self, stream: str) -> Table:
        table = self.tables.get(stream)
        if table is None:  # a stream no emit names statically
            check_name(stream, stream, "stream")
            spec = self.specs[stream] = StreamSpec(stream)
            found = self._guard("read the destination's tables", self.found_columns, stream)
            table = self.tables[stream] = Table(spec, found, self.kind_of_sql, self.sql_of_kind)
            self.counts.setdefault(stream, 0)
        return table

    def _write_line(self, stream: str, record: dict[str, Any]) -> None:
        batch = self._batches.get(stream)
        if batch is None:
            self._table(stream)
            batch = self._batches[stream] = []
        batch.append(record)
        if len(batch) >= BATCH_ROWS:
            self._flush(stream)

    def write_many(self, stream: str, records: Iterable[dict[str, Any]]) -> None:
        check = self._checks.get(stream)
        if check is None or check.validator is not None:
            super().write_many(stream, records)
            return
        batch = self._batches.get(stream)
        if batch is None:
            self._table(stream)
            batch = self._batches[stream] = []
        offer = check.cursor.offer if check.cursor is not None else None
        before = len(batch)
        if offer is None:
            batch.extend(records)
        else:
            for record in records:
                offer(record)
                batch.append(record)
        self.counts[stream] = self.counts.get(stream, 0) + len(batch) - before
        if len(batch) >= BATCH_ROWS:
            self._flush(stream)

    def _flush(self, stream: str) -> None:
        batch = self._batches.get(stream)
        if not batch:
            return
        self._batches[stream] = []
        table = self.tables[stream]
        rows = table.rows(batch)
        self.staged[stream] = self._guard(
            f"stage the records of stream '{stream}'",
            self.stage,
            table,
            self.staged.get(stream),
            rows,
        )

    def commit(
        self, cursors: Mapping[str, Any] | None = None, cut_short: Collection[str] = ()
    ) -> dict[str, Any] | None:
        for stream in sorted(cut_short):
            spec = self.specs.get(stream)
            if spec is not None and write_mode(spec) == "replace":
                raise RunError(
                    f"stream '{stream}' is written with 'replace' but its step stopped on "
                    "max_pages or max_items with data left: replacing the table with part of "
                    "it would lose rows; nothing was committed",
                    kind="destination",
                )
        for stream in list(self._batches):
            self._flush(stream)
        self._guard("commit", self.publish, dict(cursors or {}))
        return None

    def abort(self) -> None:
        self._batches.clear()

    def _guard(self, action: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except RunError:
            raise
        except Exception as exc:
            error = self.translate(exc, action)
            if error is None:
                raise
            raise error from exc

    def table_changes(self, table: Table, found: list[tuple[str, str]]) -> list[str]:
        """The columns of `table` that the table as found now lacks; RunError if a column
        was found with another kind than this run staged."""
        now = {name: self.kind_of_sql(sql_type) for name, sql_type in found}
        missing = []
        for column in table.columns:
            kind = now.get(column.name)
            if kind is None:
                missing.append(column.name)
            elif kind != column.kind and OTHER not in (kind, column.kind):
                raise RunError(
                    f"stream '{table.stream}': column '{column.name}' changed its type to "
                    f"{dict(found)[column.name]} during the run (staged as {column.sql_type})",
                    kind="destination",
                )
        return missing
