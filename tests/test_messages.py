"""Failure messages an operator reads: a decode error names the method, a page of HTML where
XML was forced says so."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from tests.conftest import Cli, Serve, WriteFlow, app_with, summary_of


def test_a_decode_error_names_the_method(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    async def search(request: web.Request) -> web.Response:
        return web.Response(body=b'{"rows": [1, 2', content_type="application/json")

    server = serve(app_with(("POST", "/search", search)))
    write_flow(
        """\
version: 1
name: decode
services:
  api: {base_url: "{{ env.API }}"}
steps:
  - {id: search, request: {service: api, method: POST, path: /search, json: {q: x}}, records: body}
"""
    )
    result = cli("run", "flow.yaml", "--summary", "s.json", env={"API": server.url})
    assert result.code == 1
    assert (
        f"runner: ERROR: run failed in step 'search': POST {server.url}/search -> 200 OK\n"
        "  response is not valid JSON (Content-Type application/json): "
    ) in result.stderr
    error = summary_of(tmp_path)["error"]
    assert (error["kind"], error["method"], error["status"]) == ("decode", "POST", 200)


def test_html_where_xml_was_forced_says_it_is_html(
    serve: Serve, cli: Cli, write_flow: WriteFlow
) -> None:
    async def page(request: web.Request) -> web.Response:
        return web.Response(
            text="<!DOCTYPE html>\n<html><body><p>Please sign in<br></body></html>",
            content_type="text/html",
        )

    server = serve(app_with(("GET", "/feed", page)))
    write_flow(
        """\
version: 1
name: xml
services:
  api: {base_url: "{{ env.API }}"}
steps:
  - id: feed
    request: {service: api, path: /feed}
    response: {format: xml}
    records: body.feed.entry
"""
    )
    result = cli("run", "flow.yaml", env={"API": server.url})
    assert result.code == 1
    assert "response is HTML, not XML (Content-Type text/html; charset=utf-8)" in result.stderr
    assert "DTD" not in result.stderr
    assert "body: <!DOCTYPE html>" in result.stderr
