"""End-to-end against httpbin (PyPI) under gunicorn: echo, XML, gzip, redirects, statuses, auth."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Cli, WriteFlow, free_port, read_jsonl, server_process


@pytest.fixture(scope="module")
def httpbin() -> Iterator[str]:
    """httpbin under gunicorn on a free loopback port; its base URL once /get answers."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "gunicorn", "-b", f"127.0.0.1:{port}", "-w", "1",
               "--threads", "4", "httpbin:app"]  # fmt: skip
    with server_process(command, f"{url}/get", name="httpbin"):
        yield url


def _env(url: str, password: str = "p") -> dict[str, str]:
    # Every secret the flow names is resolved before the first request, used or not.
    return {"BIN": url, "BIN_PASS": password, "BIN_TOKEN": "tok-123"}


def _summary(tmp_path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((tmp_path / "s.json").read_text(encoding="utf-8"))
    return data


SERVICES = """\
version: 1
name: httpbin
services:
  bin: {base_url: "{{ env.BIN }}"}
  basic:
    base_url: "{{ env.BIN }}"
    auth: {type: basic, username: u, password: "{{ secrets.BIN_PASS }}"}
  bearer:
    base_url: "{{ env.BIN }}"
    auth: {type: bearer, token: "{{ secrets.BIN_TOKEN }}"}
"""


def test_echo_xml_gzip_skip_and_auth(
    httpbin: str, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    write_flow(
        SERVICES
        + """\
steps:
  - id: get
    request:
      service: bin
      path: /anything/one
      query: {a: 1, b: [x, y], c: true, d: null}
      headers: {X-Test: hi}
    records: body
    fields: {method: method, args: args, test: 'headers."X-Test"'}
    emit: echo
  - id: post
    request: {service: bin, method: POST, path: /anything, json: {k: [1, 2], s: "é"}}
    records: body
    fields: {method: method, json: json, ctype: 'headers."Content-Type"'}
    emit: echo
  - id: xml
    request: {service: bin, path: /xml}
    response: {xml: {force_list: [item]}}
    records: body.slideshow
    fields: {title: '"@title"', slides: length(slide), first: "slide[0].title"}
    emit: xml
  - id: gzip
    request: {service: bin, path: /gzip}
    records: body
    fields: {gzipped: gzipped}
    emit: gzip
  - id: missing
    request: {service: bin, path: /status/404}
    on_status:
      - {status: 404, action: skip}
    records: body
    emit: missing
  - id: basic
    request: {service: basic, path: /basic-auth/u/p}
    records: body
    emit: auth
  - id: bearer
    request: {service: bearer, path: /bearer}
    records: body
    fields: {authenticated: authenticated}
    emit: auth
"""
    )
    result = cli(
        "run", "flow.yaml", "--summary", "s.json",
        env=_env(httpbin),
    )  # fmt: skip
    assert result.code == 0, result.stderr
    out = tmp_path / "out"
    assert read_jsonl(out / "echo.jsonl") == [
        {"method": "GET", "args": {"a": "1", "b": ["x", "y"], "c": "true"}, "test": "hi"},
        {"method": "POST", "json": {"k": [1, 2], "s": "é"}, "ctype": "application/json"},
    ]
    assert read_jsonl(out / "xml.jsonl") == [
        {"title": "Sample Slide Show", "slides": 2, "first": "Wake up to WonderWidgets!"}
    ]
    assert read_jsonl(out / "gzip.jsonl") == [{"gzipped": True}]
    assert (out / "missing.jsonl").read_bytes() == b""
    assert read_jsonl(out / "auth.jsonl") == [
        {"authenticated": True, "user": "u"},
        {"authenticated": True},
    ]
    summary = _summary(tmp_path)
    assert summary["skipped"] == {"missing": 1}
    assert summary["status_counts"] == {"200": 6, "404": 1}
    assert summary["requests"] == 7
    assert "tok-123" not in result.stderr + (tmp_path / "s.json").read_text()


def test_wrong_basic_password_fails(
    httpbin: str, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    write_flow(
        SERVICES + "steps:\n  - {id: basic, request: {service: basic, path: /basic-auth/u/p}}\n"
    )
    result = cli("run", "flow.yaml", "--summary", "s.json", env=_env(httpbin, "x"))
    assert result.code == 1
    error = _summary(tmp_path)["error"]
    assert (error["step"], error["status"], error["kind"]) == ("basic", 401, "http")


def test_redirects_are_followed_and_counted(
    httpbin: str, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    write_flow(
        SERVICES
        + """\
steps:
  - id: hop
    request: {service: bin, path: /redirect/3}
    records: body
    fields: {url: url}
    emit: landed
"""
    )
    result = cli("run", "flow.yaml", "--summary", "s.json", env=_env(httpbin))
    assert result.code == 0, result.stderr
    assert read_jsonl(tmp_path / "out" / "landed.jsonl") == [{"url": f"{httpbin}/get"}]
    summary = _summary(tmp_path)
    assert summary["requests"] == 4
    assert summary["retries"] == 0


def test_server_error_exit_69_after_retries(
    httpbin: str, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    write_flow(
        SERVICES
        + """\
steps:
  - id: down
    request: {service: bin, path: /status/500}
    retry: {max_attempts: 3, initial_delay: 0.01, max_delay: 0.05}
"""
    )
    result = cli("run", "flow.yaml", "--summary", "s.json", env=_env(httpbin))
    assert result.code == 69
    assert f"{httpbin}/status/500" in result.stderr
    summary = _summary(tmp_path)
    assert summary["requests"] == 3
    assert summary["retries"] == 2
    assert summary["status_counts"] == {"500": 3}
    error = summary["error"]
    assert (error["step"], error["status"], error["kind"]) == ("down", 500, "unavailable")
