"""Choosing the destination of a run: `--sink URL` (or `RUNNER_SINK`), `--output -`, or the
JSONL files of `--output-dir`. A bad URL, an unknown scheme or a missing driver is a usage
error (exit 2) before anything is sent.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TextIO
from urllib.parse import unquote, urlsplit

from runner.errors import UsageError
from runner.redact import Redactor

from .base import Outputs
from .files import FileOutputs, StdoutOutputs
from .records import StreamSpec
from .sql import UNSHARDED
from .state import StateStore

SCHEMES = ("sqlite", "postgresql", "postgres", "singer")


@dataclass(frozen=True, slots=True)
class Sink:
    """A parsed `--sink` URL: which destination, and where."""

    kind: str  # sqlite | postgresql | singer
    url: str  # as given; for PostgreSQL the connection string, without `schema`
    path: str = ""  # sqlite: the database file
    schema: str = "public"  # postgresql: where tables and _runner_state live

    @property
    def is_database(self) -> bool:
        return self.kind in ("sqlite", "postgresql")


def parse_sink(url: str, environ: Mapping[str, str], redactor: Redactor) -> Sink:
    """Check a sink URL without connecting; the password joins the redactor."""
    if url == "singer":
        return Sink("singer", url)
    scheme, sep, _ = url.partition("://")
    if not sep:
        raise UsageError(
            f"--sink {url!r}: expected sqlite:///path.db, postgresql://user@host/db or singer"
        )
    scheme = scheme.lower()
    if scheme == "sqlite":
        parts = urlsplit(url)
        if parts.netloc:
            raise UsageError(
                f"--sink {url!r}: a SQLite URL has no host: sqlite:///rel/path.db or "
                "sqlite:////abs/path.db"
            )
        if parts.query or parts.fragment:
            raise UsageError(f"--sink {url!r}: a SQLite URL takes no query or fragment")
        path = unquote(parts.path[1:]) if parts.path.startswith("/") else ""
        if not path or path.endswith("/"):
            raise UsageError(f"--sink {url!r}: no database file in the URL")
        return Sink("sqlite", url, path=path)
    if scheme in ("postgresql", "postgres"):
        from .postgres import parse_postgres_url

        conninfo, schema = parse_postgres_url(url, environ, redactor)
        return Sink("postgresql", conninfo, schema=schema)
    raise UsageError(
        f"--sink {url!r}: unknown scheme {scheme!r}; expected one of sqlite, postgresql, singer"
    )


def check_sink(
    sink: str,
    output: str | None,
    state_path: str | None,
    environ: Mapping[str, str],
    redactor: Redactor,
) -> Sink:
    """The parsed sink, or UsageError for a bad URL or a flag that conflicts with it."""
    if output is not None:
        raise UsageError("--sink and --output - both choose where records go: give one")
    parsed = parse_sink(sink, environ, redactor)
    if parsed.is_database and state_path:
        raise UsageError(
            f"--state with a database sink: the state lives in the database ({parsed.kind})"
        )
    return parsed


def make_outputs(
    *,
    sink: str | None,
    output: str | None,
    output_dir: str,
    state_path: str | None,
    flow: str,
    streams: Mapping[str, StreamSpec],
    emitted: Iterable[str],
    run_id: str,
    started_at: datetime,
    out: TextIO,
    environ: Mapping[str, str],
    redactor: Redactor,
    shard: str | None = None,
) -> Outputs:
    """The run's destination, not yet acquired or opened. `shard` (`I/N`) is the key its
    cursors are kept under, and what the manifest names."""
    store = StateStore(state_path, shard=shard) if state_path else None
    if sink is None:
        if output == "-":
            return StdoutOutputs(streams, out, state=store)
        return FileOutputs(
            output_dir, run_id, streams, emitted, started_at, state=store, shard=shard
        )
    parsed = check_sink(sink, output, state_path, environ, redactor)
    if parsed.kind == "singer":
        from .singer import SingerOutputs

        return SingerOutputs(streams, emitted, out, state=store, shard=shard)
    key = shard if shard is not None else UNSHARDED
    if parsed.kind == "sqlite":
        from .sqlite import SqliteOutputs

        return SqliteOutputs(parsed.path, streams, emitted, flow=flow, run_id=run_id, shard=key)
    from .postgres import PostgresOutputs

    return PostgresOutputs(
        parsed.url, parsed.schema, streams, emitted, environ, flow=flow, run_id=run_id, shard=key
    )
