"""Helpers for the destination tests: a paged API whose records the tests change between
runs, flows that load it, and a uniform way to read back a SQLite or PostgreSQL table."""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

FLOW = """\
version: 1
name: {name}
inputs:
  type: object
  properties:
    fail: {{type: boolean, default: false}}
    max_pages: {{type: integer, default: 1000}}
services:
  api: {{base_url: "{{{{ env.API }}}}"}}
steps:
  - id: items
    request:
      service: api
      path: /items
      query: {{since: "{{{{ state.items.cursor or 0 }}}}"}}
    paginate: {{type: page_number, size_param: per_page, size: {page_size}, \
total_pages: body.total_pages, max_pages: {max_pages}}}
    records: body.data
    emit: items
  - id: boom
    when: inputs.fail
    request: {{service: api, path: /boom}}
outputs:
  items:
{outputs}
"""


def flow_text(
    *,
    name: str = "items-flow",
    write: str | None = None,
    primary_key: bool = True,
    schema: dict[str, Any] | None = None,
    page_size: int = 3,
    max_pages: str = "1000",
) -> str:
    lines = ["    cursor: updated"]
    if primary_key:
        lines.append("    primary_key: [id]")
    if write:
        lines.append(f"    write: {write}")
    if schema is not None:
        lines.append(f"    schema: {json.dumps(schema)}")
    return FLOW.format(
        name=name, outputs="\n".join(lines), page_size=page_size, max_pages=max_pages
    )


@dataclass
class ItemsApi:
    """`GET /items?page=&per_page=&since=`: the records whose `updated` is > since, in
    pages; `/boom` answers 400. `delay` slows each page (seconds)."""

    records: list[dict[str, Any]] = field(default_factory=list)
    delay: float = 0.0
    # While set, a page waits (the test holds a run in the middle of its requests).
    hold: threading.Event = field(default_factory=threading.Event)

    def app(self) -> web.Application:
        import asyncio

        async def items(request: web.Request) -> web.Response:
            page = int(request.query.get("page", "1"))
            size = int(request.query.get("per_page", "3"))
            since = float(request.query.get("since", "0") or 0)
            chosen = [r for r in self.records if (r.get("updated") or 0) > since]
            pages = max(1, -(-len(chosen) // size))
            if self.delay:
                await asyncio.sleep(self.delay)
            while self.hold.is_set():
                await asyncio.sleep(0.02)
            data = chosen[(page - 1) * size : page * size]
            return web.json_response({"data": data, "total_pages": pages})

        async def boom(request: web.Request) -> web.Response:
            return web.Response(status=400, text="no")

        app = web.Application()
        app.router.add_get("/items", items)
        app.router.add_get("/boom", boom)
        return app


def item(i: int, updated: int | None = None, **extra: Any) -> dict[str, Any]:
    return {"id": i, "name": f"item {i}", "updated": updated if updated is not None else i, **extra}


class Database:
    """A destination under test: its `--sink` URL and its tables read back as dicts."""

    url: str

    def rows(self, table: str, order: str = "id") -> list[dict[str, Any]]:
        raise NotImplementedError

    def columns(self, table: str) -> dict[str, str]:
        raise NotImplementedError

    def state(self, flow: str = "items-flow") -> dict[str, Any]:
        """{stream: cursor} of the flow's `_runner_state` rows."""
        raise NotImplementedError

    def tables(self) -> set[str]:
        raise NotImplementedError

    def data(self, table: str = "items") -> list[dict[str, Any]]:
        """The rows without the runner's own columns."""
        return [
            {k: v for k, v in row.items() if not k.startswith("_runner_")}
            for row in self.rows(table)
        ]


class SqliteDatabase(Database):
    def __init__(self, path: Path, url: str | None = None) -> None:
        self.path = path
        self.url = url or f"sqlite:///{path}"

    def _query(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        db = sqlite3.connect(self.path)
        try:
            db.row_factory = sqlite3.Row
            return [dict(row) for row in db.execute(sql, args)]
        finally:
            db.close()

    def rows(self, table: str, order: str = "id") -> list[dict[str, Any]]:
        return self._query(f'SELECT * FROM "{table}" ORDER BY {order}')

    def columns(self, table: str) -> dict[str, str]:
        return {r["name"]: r["type"] for r in self._query(f'PRAGMA table_info("{table}")')}

    def state(self, flow: str = "items-flow") -> dict[str, Any]:
        if "_runner_state" not in self.tables():
            return {}
        rows = self._query(
            "SELECT name, value FROM _runner_state WHERE flow = ? AND kind = 'stream'", flow
        )
        return {r["name"]: json.loads(r["value"])["cursor"] for r in rows}

    def tables(self) -> set[str]:
        if not self.path.exists():
            return set()
        return {r["name"] for r in self._query("SELECT name FROM sqlite_master WHERE type='table'")}


class PostgresDatabase(Database):
    def __init__(self, url: str, schema: str = "public") -> None:
        self.base_url = url
        self.schema = schema
        joiner = "&" if "?" in url else "?"
        self.url = url if schema == "public" else f"{url}{joiner}schema={schema}"

    def _query(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        import psycopg
        from psycopg.rows import dict_row

        with psycopg.connect(self.base_url, row_factory=dict_row) as conn:
            return list(conn.execute(sql, args).fetchall())  # type: ignore[arg-type]

    def rows(self, table: str, order: str = "id") -> list[dict[str, Any]]:
        return self._query(f'SELECT * FROM "{self.schema}"."{table}" ORDER BY {order}')

    def columns(self, table: str) -> dict[str, str]:
        rows = self._query(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = %s AND table_name = %s ORDER BY ordinal_position",
            self.schema,
            table,
        )
        return {r["column_name"]: r["data_type"] for r in rows}

    def state(self, flow: str = "items-flow") -> dict[str, Any]:
        if "_runner_state" not in self.tables():
            return {}
        rows = self._query(
            f'SELECT name, value FROM "{self.schema}"._runner_state '
            "WHERE flow = %s AND kind = 'stream'",
            flow,
        )
        return {r["name"]: r["value"]["cursor"] for r in rows}

    def tables(self) -> set[str]:
        rows = self._query(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
            self.schema,
        )
        return {r["table_name"] for r in rows}
