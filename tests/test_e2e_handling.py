"""End to end: status rules, their actions in every context, for_each, poll, expect, exit codes
and signals, through the real CLI against real aiohttp servers."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import ROOT, CliResult, Serve, ServerThread, read_jsonl

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SERVICE = """\
services:
  api:
    base_url: "{{ env.API_URL }}"
    retry: {max_attempts: 3, initial_delay: 0.01, max_delay: 0.02}
"""


def flow(steps: str, *, head: str = "", services: str = SERVICE) -> str:
    """A flow with the `api` service; `steps` and `head` (inputs, outputs) are dedented."""
    return (
        "version: 1\nname: e2e\n"
        + textwrap.dedent(head)
        + services
        + "steps:\n"
        + textwrap.indent(textwrap.dedent(steps), "  ")
    )


def app_of(routes: dict[str, Handler]) -> web.Application:
    """`{"GET /a/{id}": handler}` as an aiohttp app."""
    app = web.Application()
    for key, handler in routes.items():
        method, path = key.split(" ", 1)
        app.router.add_route(method, path, handler)
    return app


def reply(status: int = 200, body: Any = None, headers: dict[str, str] | None = None) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response(body, status=status, headers=headers)

    return handler


def sequence(*answers: tuple[int, Any] | tuple[int, Any, dict[str, str]]) -> Handler:
    """Answers in turn; the last one repeats."""
    calls = [0]

    async def handler(request: web.Request) -> web.StreamResponse:
        answer = answers[min(calls[0], len(answers) - 1)]
        calls[0] += 1
        headers = answer[2] if len(answer) == 3 else None
        return web.json_response(answer[1], status=answer[0], headers=headers)

    return handler


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str
    summary: dict[str, Any]
    out: Path

    def stream(self, name: str) -> list[Any] | None:
        path = self.out / f"{name}.jsonl"
        return read_jsonl(path) if path.exists() else None

    @property
    def error(self) -> dict[str, Any]:
        error: dict[str, Any] = self.summary["error"]
        return error


RunFlow = Callable[..., Run]


@pytest.fixture
def run(cli: Callable[..., CliResult], write_flow: Callable[..., Path], tmp_path: Path) -> RunFlow:
    """`run(flow_text, server_url, *cli_args, env=...)`: writes the flow, runs it with a
    summary, and reads the summary back."""

    def call(text: str, url: str = "", *args: str, env: dict[str, str] | None = None) -> Run:
        write_flow(text)
        summary = tmp_path / "s.json"
        summary.unlink(missing_ok=True)
        result = cli(
            "run", "flow.yaml", "--summary", "s.json", *args, env={"API_URL": url, **(env or {})}
        )
        data = json.loads(summary.read_text()) if summary.exists() else {}
        return Run(result.code, result.stdout, result.stderr, data, tmp_path / "out")

    return call


def queries(server: ServerThread, path: str, key: str) -> list[str]:
    return [r.query.get(key, [""])[0] for r in server.requests if r.path == path]


# -- on_status matching ----------------------------------------------------------------------


def test_status_patterns_when_and_first_match(serve: Serve, run: RunFlow) -> None:
    server = serve(
        app_of(
            {
                "GET /exact": reply(404, {"e": 1}),
                "GET /class": reply(418, {}),
                "GET /list": reply(403, {}),
                "GET /range": reply(501, {}),
                "GET /body": reply(410, {"code": "gone"}),
                "GET /header": reply(200, {"items": [{"id": "h1"}]}, {"X-Flag": "on"}),
                "GET /noheader": reply(200, {"items": [{"id": "h2"}]}),
                "GET /first": reply(409, {}),
                "GET /plain": reply(201, {"items": [{"id": "p1"}]}),
            }
        )
    )

    def rule(status: str, name: str, extra: str = "") -> str:
        return (
            f"{{status: {status}, action: skip, emit: matched, "
            f"fields: {{rule: \"'{name}'\", status: status}}{extra}}}"
        )

    when_gone = ", when: \"body.code == 'gone'\""
    when_other = ", when: \"body.code == 'other'\""
    when_flag = ', when: "headers.\\"x-flag\\" == \'on\'"'
    steps = f"""\
    - id: exact
      request: {{service: api, path: /exact}}
      on_status:
        - {rule("405", "wrong")}
        - {rule("[401, 403]", "wrong")}
        - {rule("404", "exact")}
    - id: klass
      request: {{service: api, path: /class}}
      on_status: [{rule('"5xx"', "wrong")}, {rule('"4xx"', "class")}]
    - id: list
      request: {{service: api, path: /list}}
      on_status: [{rule('"400-402"', "wrong")}, {rule("[401, 403]", "list")}]
    - id: range
      request: {{service: api, path: /range}}
      on_status: [{rule('"502-599"', "wrong")}, {rule('"500-599"', "range")}]
    - id: body
      request: {{service: api, path: /body}}
      on_status:
        - {rule("410", "wrong", when_other)}
        - {rule("410", "body-when", when_gone)}
    - id: header
      request: {{service: api, path: /header}}
      records: body.items
      emit: mapped
      on_status:
        - {rule("200", "header-when", when_flag)}
    - id: noheader
      request: {{service: api, path: /noheader}}
      records: body.items
      emit: mapped
      on_status:
        - {rule("200", "wrong", when_flag)}
    - id: first
      request: {{service: api, path: /first}}
      on_status:
        - {rule("409", "first")}
        - {{status: 4xx, action: fail}}
    - id: plain
      request: {{service: api, path: /plain}}
      records: body.items
      emit: mapped
      on_status: [{rule("404", "wrong")}]
    - id: down
      request: {{service: closed, path: /x}}
      on_status:
        - {rule('"5xx"', "wrong")}
        - {rule("error", "error")}
    """
    services = SERVICE + '  closed:\n    base_url: "{{ env.CLOSED_URL }}"\n'
    services += "    retry: {max_attempts: 2, initial_delay: 0.01}\n"
    result = run(flow(steps, services=services), server.url, env={"CLOSED_URL": closed_port_url()})

    assert result.code == 0, result.stderr
    assert result.stream("matched") == [
        {"rule": "exact", "status": 404},
        {"rule": "class", "status": 418},
        {"rule": "list", "status": 403},
        {"rule": "range", "status": 501},
        {"rule": "body-when", "status": 410},
        {"rule": "header-when", "status": 200},
        {"rule": "first", "status": 409},
        {"rule": "error", "status": None},
    ]
    # A rule whose `when` is false does not match: the default maps the 2xx response.
    assert result.stream("mapped") == [{"id": "h2"}, {"id": "p1"}]
    assert result.summary["status"] == "success"
    assert result.summary["skipped"] == {
        s: 1 for s in ["exact", "klass", "list", "range", "body", "header", "first", "down"]
    }


def test_unmatched_error_status_fails_naming_step_item_request_and_body(
    serve: Serve, run: RunFlow
) -> None:
    body = "a" * 499 + "Z" + "TAIL-NOT-SHOWN"

    async def order(request: web.Request) -> web.StreamResponse:
        if request.match_info["id"] == "2":
            return web.Response(status=404, text=body)
        return web.json_response({"id": int(request.match_info["id"])})

    server = serve(app_of({"GET /orders/{id}": order}))
    steps = """\
    - id: orders
      for_each: "[`1`, `2`, `3`]"
      request: {service: api, path: "/orders/{{ item }}", query: {api_key: "{{ secrets.API_KEY }}"}}
      records: body
      emit: orders
    """
    result = run(flow(steps), server.url, env={"API_KEY": "s3cr3t-key"})

    assert result.code == 1
    stderr = result.stderr
    assert "step 'orders'" in stderr and "(item 1)" in stderr
    assert f"GET {server.url}/orders/2?api_key=***" in stderr
    assert "404" in stderr
    assert "a" * 499 + "Z" in stderr and "TAIL" not in stderr
    assert "s3cr3t-key" not in stderr
    error = result.error
    assert error["step"] == "orders" and error["item_index"] == 1
    assert error["method"] == "GET" and error["status"] == 404
    assert error["url"] == f"{server.url}/orders/2?api_key=***"
    assert error["kind"] == "http"
    assert result.summary["status"] == "failed" and result.summary["exit_code"] == 1
    # The server got the real key; item 3 was never requested; nothing was committed.
    assert [r.query["api_key"] for r in server.requests] == [["s3cr3t-key"]] * 2
    assert result.stream("orders") is None
    assert not (result.out / "manifest.json").exists()


def test_transport_failure_without_error_rule_is_unavailable(run: RunFlow) -> None:
    steps = """\
    - id: down
      request: {service: api, path: /x}
    """
    result = run(flow(steps), closed_port_url())
    assert result.code == 69
    assert "step 'down'" in result.stderr
    assert result.error["step"] == "down" and result.error["status"] is None
    assert result.error["kind"] == "unavailable"
    assert result.summary["requests"] == 3  # every attempt counts


# -- actions in each context: a plain step, a paginated step, a for_each step, a block -------


def paged(pages: dict[int, tuple[int, Any]]) -> Handler:
    """`?page=N` answers pages[N]; a page not listed is an empty list."""

    async def handler(request: web.Request) -> web.StreamResponse:
        status, body = pages.get(int(request.query.get("page", "1")), (200, {"data": []}))
        return web.json_response(body, status=status)

    return handler


def by_item(answers: dict[str, tuple[int, Any]], default: tuple[int, Any] | None = None) -> Handler:
    """`/x/{item}` answers answers[item], else `default`, else 200 `{"id": item}`."""

    async def handler(request: web.Request) -> web.StreamResponse:
        item = request.match_info["item"]
        status, body = answers.get(item, default or (200, {"id": item}))
        return web.json_response(body, status=status)

    return handler


PAGINATE = "paginate: {type: page_number}"


def test_skip_in_each_context(serve: Serve, run: RunFlow) -> None:
    server = serve(
        app_of(
            {
                "GET /single": reply(404, {}),
                "GET /pages": paged(
                    {
                        1: (200, {"data": [{"id": 1}, {"id": 2}]}),
                        2: (404, {}),
                        3: (200, {"data": [{"id": 3}]}),
                    }
                ),
                "GET /each/{item}": by_item({"b": (404, {})}),
                "GET /a/{item}": by_item({"x": (404, {})}),
                "GET /b/{item}": by_item({}),
            }
        )
    )
    steps = f"""\
    - id: single
      request: {{service: api, path: /single}}
      on_status: [{{status: 404, action: skip}}]
      records: body
      emit: out
    - id: paged
      request: {{service: api, path: /pages}}
      {PAGINATE}
      on_status: [{{status: 404, action: skip}}]
      records: body.data
      emit: out
    - id: each
      for_each: "['a', 'b', 'c']"
      request: {{service: api, path: "/each/{{{{ item }}}}"}}
      on_status: [{{status: 404, action: skip}}]
      records: body
      emit: out
    - id: block
      for_each: "['x', 'y']"
      steps:
        - id: a
          request: {{service: api, path: "/a/{{{{ item }}}}"}}
          on_status: [{{status: 404, action: skip}}]
          records: body
          fields: {{a: id}}
          emit: out
        - id: b
          request: {{service: api, path: "/b/{{{{ item }}}}"}}
          records: body
          fields: {{b: id}}
          emit: out
    """
    result = run(flow(steps), server.url)

    assert result.code == 0, result.stderr
    # A skipped page ends the pagination (page 3 is never asked for); a skipped item or inner
    # step goes on as after an ok with no records.
    assert result.stream("out") == [
        {"id": 1}, {"id": 2}, {"id": "a"}, {"id": "c"}, {"b": "x"}, {"a": "y"}, {"b": "y"},
    ]  # fmt: skip
    assert queries(server, "/pages", "page") == ["1", "2"]
    assert result.summary["skipped"] == {"single": 1, "paged": 1, "each": 1, "a": 1}
    assert result.summary["records"] == {"out": 7}


def test_stop_in_each_context_keeps_mapped_records(serve: Serve, run: RunFlow) -> None:
    server = serve(
        app_of(
            {
                "GET /plain": reply(200, {"state": "halt", "data": [{"id": "never"}]}),
                "GET /after/{item}": by_item({}),
                "GET /pages": paged(
                    {
                        1: (200, {"data": [{"id": 1}, {"id": 2}]}),
                        2: (200, {"data": [{"id": 3}], "halt": True}),
                        3: (200, {"data": [{"id": 4}]}),
                    }
                ),
                "GET /each/{item}": by_item({"b": (409, {})}),
                "GET /x/{item}": by_item({}),
                "GET /a/{item}": by_item({"p": (409, {})}),
                "GET /b/{item}": by_item({}),
            }
        )
    )
    steps = f"""\
    - id: plain
      request: {{service: api, path: /plain}}
      on_status:
        - {{status: 200, when: "body.state == 'halt'", action: stop, set: {{why: body.state}}}}
      records: body.data
      emit: out
    - id: after
      request: {{service: api, path: "/after/{{{{ steps.plain.vars.why }}}}"}}
      records: body
      emit: out
    - id: paged
      request: {{service: api, path: /pages}}
      {PAGINATE}
      on_status: [{{status: 200, when: body.halt, action: stop}}]
      records: body.data
      emit: out
    - id: each
      for_each: "['a', 'b', 'c']"
      request: {{service: api, path: "/each/{{{{ item }}}}"}}
      on_status: [{{status: 409, action: stop}}]
      records: body
      emit: out
    - id: block
      for_each: "['p', 'q']"
      steps:
        - id: x
          request: {{service: api, path: "/x/{{{{ item }}}}"}}
          records: body
          fields: {{x: id}}
          emit: out
        - id: a
          request: {{service: api, path: "/a/{{{{ item }}}}"}}
          on_status: [{{status: 409, action: stop}}]
          records: body
          fields: {{a: id}}
          emit: out
        - id: b
          request: {{service: api, path: "/b/{{{{ item }}}}"}}
          records: body
          fields: {{b: id}}
          emit: out
    """
    result = run(flow(steps), server.url)

    assert result.code == 0, result.stderr
    assert result.stream("out") == [
        {"id": "halt"},  # the plain step mapped nothing, its rule's `set` still ran
        {"id": 1}, {"id": 2},  # page 2 stopped the pagination, unmapped
        {"id": "a"}, {"id": "c"},  # item b stopped, c still ran
        {"x": "p"}, {"x": "q"}, {"a": "q"}, {"b": "q"},  # item p ended after x; q went on
    ]  # fmt: skip
    assert queries(server, "/pages", "page") == ["1", "2"]
    assert "/b/p" not in server.paths() and "/b/q" in server.paths()
    assert result.summary["skipped"] == {}


def test_retry_delays_and_resends_in_each_context(serve: Serve, run: RunFlow) -> None:
    pending = (200, {"state": "pending"})
    app = app_of(
        {
            "GET /fixed": sequence(pending, (200, {"state": "ok", "n": "fixed"})),
            "GET /computed": sequence(
                (200, {"state": "pending", "wait": 0.25}), (200, {"state": "ok", "n": "computed"})
            ),
            "GET /header": sequence(
                (200, {"state": "pending"}, {"Retry-After": "1"}),
                (200, {"state": "ok", "n": "header"}),
            ),
            "GET /pages": paged({1: (200, {"state": "ok", "data": [{"n": "p1"}]}), 2: pending}),
            "GET /each/{item}": by_item({}),
            "GET /inner/{item}": by_item({}),
        }
    )
    # Page 2 answers "pending" once, then its records.
    page2 = [0]
    each_b = [0]

    @web.middleware
    async def once_pending(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/pages" and request.query.get("page") == "2":
            page2[0] += 1
            if page2[0] > 1:
                return web.json_response({"state": "ok", "data": [{"n": "p2"}]})
        if request.path in ("/each/b", "/inner/y"):
            each_b[0] += 1
            if each_b[0] in (1, 3):
                return web.json_response({"state": "pending"})
        return await handler(request)

    app.middlewares.append(once_pending)
    server = serve(app)
    retry_rule = "{status: 200, when: \"body.state == 'pending'\", action: retry, delay: 0.05}"
    steps = f"""\
    - id: fixed
      request: {{service: api, path: /fixed}}
      on_status:
        - {{status: 200, when: "body.state == 'pending'", action: retry, delay: 0.3}}
      records: body
      fields: {{n: n}}
      emit: out
    - id: computed
      request: {{service: api, path: /computed}}
      on_status: [{{status: 200, when: "body.state == 'pending'", action: retry, delay: body.wait}}]
      records: body
      fields: {{n: n}}
      emit: out
    - id: header
      request: {{service: api, path: /header}}
      on_status: [{{status: 200, when: "body.state == 'pending'", action: retry}}]
      records: body
      fields: {{n: n}}
      emit: out
    - id: paged
      request: {{service: api, path: /pages}}
      {PAGINATE}
      on_status: [{retry_rule}]
      records: body.data
      emit: out
    - id: each
      for_each: "['a', 'b']"
      request: {{service: api, path: "/each/{{{{ item }}}}"}}
      on_status: [{retry_rule}]
      records: body
      fields: {{n: id}}
      emit: out
    - id: block
      for_each: "['x', 'y']"
      steps:
        - id: inner
          request: {{service: api, path: "/inner/{{{{ item }}}}"}}
          on_status: [{retry_rule}]
          records: body
          fields: {{n: id}}
          emit: out
    """
    result = run(flow(steps), server.url)

    assert result.code == 0, result.stderr
    assert result.stream("out") == [
        {"n": n} for n in ["fixed", "computed", "header", "p1", "p2", "a", "b", "x", "y"]
    ]

    def gap(path: str) -> float:
        at = [r.at for r in server.requests if r.path == path]
        assert len(at) == 2
        return at[1] - at[0]

    assert 0.3 <= gap("/fixed") < 1.5
    assert 0.25 <= gap("/computed") < 1.5
    assert 1.0 <= gap("/header") < 2.5
    # The retry resends the same page.
    assert queries(server, "/pages", "page") == ["1", "2", "2", "3"]
    assert server.paths().count("/each/b") == 2 and server.paths().count("/inner/y") == 2
    assert result.summary["retries"] == 6


def test_retry_shares_max_attempts_with_transport_retries(serve: Serve, run: RunFlow) -> None:
    pending = (200, {"state": "pending"})
    server = serve(app_of({"GET /job": sequence((503, {}), (503, {}), pending)}))
    steps = """\
    - id: job
      request: {service: api, path: /job}
      retry: {max_attempts: 4}
      on_status: [{status: 200, when: "body.state == 'pending'", action: retry, delay: 0.01}]
    """
    result = run(flow(steps), server.url)
    # Two transport retries (503) and one rule retry: four attempts in all, the last a 200.
    assert server.paths() == ["/job"] * 4
    assert result.code == 1
    assert result.error["status"] == 200 and result.error["step"] == "job"
    assert result.summary["requests"] == 4 and result.summary["retries"] == 3


@pytest.mark.parametrize(
    ("status", "code", "kind"),
    [(503, 69, "unavailable"), (429, 69, "unavailable"), (409, 1, "http")],
)
def test_retry_exhausted_exit_code_follows_last_status(
    serve: Serve, run: RunFlow, status: int, code: int, kind: str
) -> None:
    # A POST is never retried by the transport, but a `retry` rule resends any method.
    server = serve(app_of({"POST /things": reply(status, {"busy": True})}))
    steps = f"""\
    - id: create
      request: {{service: api, method: POST, path: /things, json: {{a: 1}}}}
      on_status: [{{status: {status}, action: retry, delay: 0.01}}]
    """
    result = run(flow(steps), server.url)
    assert result.code == code
    assert [(r.method, r.body) for r in server.requests] == [("POST", b'{"a":1}')] * 3
    assert result.error["status"] == status and result.error["kind"] == kind
    assert "step 'create'" in result.stderr and f"POST {server.url}/things" in result.stderr


FAIL_CONTEXTS = {
    # context: (steps, failing step, item index, failing path)
    "plain": (
        """\
        - id: target
          request: {service: api, path: /bad/1}
          on_status: [RULE]
        """,
        "target",
        None,
        "/bad/1",
    ),
    "paginated": (
        f"""\
        - id: target
          request: {{service: api, path: /pages}}
          {PAGINATE}
          on_status: [RULE]
          records: body.data
          emit: out
        """,
        "target",
        None,
        "/pages?page=2",
    ),
    "for_each": (
        """\
        - id: target
          for_each: "['ok', '1']"
          request: {service: api, path: "/bad/{{ item }}"}
          on_status: [RULE]
          records: body
          emit: out
        """,
        "target",
        1,
        "/bad/1",
    ),
    "block": (
        """\
        - id: outer
          for_each: "['ok', '1']"
          steps:
            - id: first
              request: {service: api, path: "/bad/ok"}
            - id: target
              request: {service: api, path: "/bad/{{ item }}"}
              on_status: [RULE]
        """,
        "target",
        1,
        "/bad/1",
    ),
}


@pytest.mark.parametrize("context", list(FAIL_CONTEXTS))
@pytest.mark.parametrize(
    ("kind", "message", "code", "shown"),
    [
        ("quota", "refused: {{ body.reason }} ({{ status }})", 1, "refused: over quota (400)"),
        ("unavailable", "billing is down: {{ body.reason }}", 69, "billing is down: over quota"),
        ("quota", "{{ body.missing.deeper }}", 1, "status 400 matched a fail rule"),
        ("unavailable", "{{ body.reason.nope.deeper }}", 69, "status 400 matched a fail rule"),
    ],
    ids=["message", "unavailable", "bad-message", "bad-message-unavailable"],
)
def test_fail_rule_message_kind_and_exit_code(
    serve: Serve, run: RunFlow, context: str, kind: str, message: str, code: int, shown: str
) -> None:
    server = serve(
        app_of(
            {
                "GET /bad/{item}": by_item({"1": (400, {"reason": "over quota"})}),
                "GET /pages": paged(
                    {1: (200, {"data": [{"id": 1}]}), 2: (400, {"reason": "over quota"})}
                ),
            }
        )
    )
    steps, step, index, path = FAIL_CONTEXTS[context]
    rule = f'{{status: 400, action: fail, kind: {kind}, message: "{message}"}}'
    result = run(flow(steps.replace("RULE", rule)), server.url)

    assert result.code == code, result.stderr
    assert shown in result.stderr
    assert result.error == {
        "kind": kind,
        "step": step,
        "item_index": index,
        "method": "GET",
        "url": server.url + path,
        "status": 400,
        "message": shown,
    }
    assert result.summary["status"] == "failed" and result.summary["exit_code"] == code
    assert result.stream("out") is None


def test_goto_jumps_to_its_target(serve: Serve, run: RunFlow) -> None:
    server = serve(
        app_of(
            {
                "GET /a": reply(404, {"missing": "a"}),
                "GET /b": reply(200, {"id": "b"}),
                "GET /c": reply(200, {"id": "c"}),
                "GET /pages": paged(
                    {1: (200, {"data": [{"id": 1}]}), 2: (409, {"data": [{"id": 2}]})}
                ),
                "GET /d": reply(200, {"id": "d"}),
                "GET /e": reply(200, {"id": "e"}),
            }
        )
    )
    steps = f"""\
    - id: a
      request: {{service: api, path: /a}}
      on_status: [{{status: 404, action: goto, goto: c, set: {{missing: body.missing}}}}]
      records: body
      emit: out
    - id: b
      request: {{service: api, path: /b}}
      records: body
      emit: out
    - id: c
      request: {{service: api, path: /c, query: {{from: "{{{{ steps.a.vars.missing }}}}"}}}}
      records: body
      emit: out
    - id: paged
      request: {{service: api, path: /pages}}
      {PAGINATE}
      on_status: [{{status: 409, action: goto, goto: e}}]
      records: body.data
      emit: out
    - id: d
      request: {{service: api, path: /d}}
      records: body
      emit: out
    - id: e
      request: {{service: api, path: /e}}
      records: body
      emit: out
    """
    result = run(flow(steps), server.url)
    assert result.code == 0, result.stderr
    # goto maps nothing; what the paginated step mapped before it stays.
    assert result.stream("out") == [{"id": "c"}, {"id": 1}, {"id": "e"}]
    assert server.paths() == ["/a", "/c", "/pages", "/pages", "/e"]
    assert queries(server, "/c", "from") == ["a"]


def test_goto_loop_beyond_max_visits_fails(serve: Serve, run: RunFlow) -> None:
    server = serve(app_of({"GET /loop": reply(409, {}), "GET /next": reply(200, {})}))
    steps = """\
    - id: loop
      max_visits: 3
      request: {service: api, path: /loop}
      on_status: [{status: 409, action: goto, goto: loop}]
    - id: next
      request: {service: api, path: /next}
    """
    result = run(flow(steps), server.url)
    assert result.code == 1
    assert server.paths() == ["/loop"] * 3
    assert "max_visits" in result.stderr and "step 'loop'" in result.stderr
    assert result.error["step"] == "loop"


def test_goto_in_block_stays_in_the_item_and_counts_visits_per_item(
    serve: Serve, run: RunFlow
) -> None:
    seen: dict[str, int] = {}

    async def attempt(request: web.Request) -> web.StreamResponse:
        item = request.match_info["item"]
        seen[item] = seen.get(item, 0) + 1
        if seen[item] == 1:
            return web.json_response({"later": True}, status=409)
        return web.json_response({"id": item, "visit": seen[item]})

    server = serve(app_of({"GET /try/{item}": attempt, "GET /wait/{item}": by_item({})}))
    steps = """\
    - id: each
      for_each: "['x', 'y']"
      steps:
        - id: try
          max_visits: 2
          request: {service: api, path: "/try/{{ item }}"}
          on_status: [{status: 409, action: goto, goto: wait}, {status: 2xx, action: end}]
          records: body
          emit: out
        - id: wait
          request: {service: api, path: "/wait/{{ item }}"}
          on_status: [{status: 200, action: goto, goto: try}]
    - id: after
      request: {service: api, path: /wait/after}
      records: body
      emit: out
    """
    result = run(flow(steps), server.url)
    # Four visits of `try` in all, two per item: under max_visits, which counts per item.
    assert result.code == 0, result.stderr
    assert result.stream("out") == [
        {"id": "x", "visit": 2}, {"id": "y", "visit": 2}, {"id": "after"},
    ]  # fmt: skip
    assert server.paths() == [
        "/try/x", "/wait/x", "/try/x", "/try/y", "/wait/y", "/try/y", "/wait/after",
    ]  # fmt: skip


def test_goto_in_plain_for_each_step_is_invalid(run: RunFlow) -> None:
    steps = """\
    - id: each
      for_each: "['x']"
      request: {service: api, path: "/x/{{ item }}"}
      on_status: [{status: 409, action: goto, goto: other}]
    - id: other
      request: {service: api, path: /y}
    """
    result = run(flow(steps), "http://127.0.0.1:9")
    assert result.code == 2
    assert "goto" in result.stderr


def test_end_in_each_context(serve: Serve, run: RunFlow) -> None:
    pages: dict[str, dict[int, tuple[int, Any]]] = {
        "1": {1: (200, {"data": [{"id": "1a"}], "last": True}), 2: (200, {"data": [{"id": "1b"}]})},
        "2": {1: (200, {"data": [{"id": "2a"}]}), 2: (200, {"data": [{"id": "2b"}]})},
    }

    async def item_pages(request: web.Request) -> web.StreamResponse:
        table = pages[request.match_info["item"]]
        status, body = table.get(int(request.query["page"]), (200, {"data": []}))
        return web.json_response(body, status=status)

    server = serve(
        app_of(
            {
                "GET /e/{item}": item_pages,
                "GET /a/{item}": by_item({"p": (201, {"id": "p"})}),
                "GET /b/{item}": by_item({}),
                "GET /after/{item}": by_item({}),
            }
        )
    )
    steps = f"""\
    - id: each
      for_each: "['1', '2']"
      request: {{service: api, path: "/e/{{{{ item }}}}"}}
      {PAGINATE}
      on_status: [{{status: 200, when: body.last, action: end}}]
      records: body.data
      emit: out
    - id: block
      for_each: "['p', 'q']"
      steps:
        - id: a
          request: {{service: api, path: "/a/{{{{ item }}}}"}}
          on_status: [{{status: 201, action: end}}]
          records: body
          fields: {{a: id}}
          emit: out
        - id: b
          request: {{service: api, path: "/b/{{{{ item }}}}"}}
          records: body
          fields: {{b: id}}
          emit: out
    - id: plain
      request: {{service: api, path: /after/plain}}
      on_status: [{{status: 200, action: end}}]
      records: body
      emit: out
    - id: never
      request: {{service: api, path: /after/never}}
      records: body
      emit: out
    """
    result = run(flow(steps), server.url)
    assert result.code == 0, result.stderr
    assert result.summary["status"] == "success"
    # end maps the response, then finishes the item (for_each, block) or the flow (plain).
    assert result.stream("out") == [
        {"id": "1a"}, {"id": "2a"}, {"id": "2b"},
        {"a": "p"}, {"a": "q"}, {"b": "q"},
        {"id": "plain"},
    ]  # fmt: skip
    assert "/b/p" not in server.paths() and "/after/never" not in server.paths()
    assert (result.out / "manifest.json").exists()


def test_rule_emit_and_set_run_whatever_the_action(serve: Serve, run: RunFlow) -> None:
    async def rows(request: web.Request) -> web.StreamResponse:
        row = await request.json()
        if "@" not in row.get("email", ""):
            return web.json_response({"errors": ["bad email", "other"]}, status=422)
        if row["ref"] == "r4":
            return web.json_response({"dup": row["email"], "code": 7}, status=400)
        return web.json_response({"id": "id-" + row["ref"]}, status=201)

    server = serve(app_of({"POST /rows": rows}))
    head = """\
    inputs:
      type: object
      properties:
        rows:
          type: array
          default:
            - {ref: r1, email: a@x.org}
            - {ref: r2, email: nope}
            - {ref: r3, email: c@x.org}
            - {ref: r4, email: d@x.org}
            - {ref: r5}
    """
    steps = """\
    - id: load
      for_each: inputs.rows
      request: {service: api, method: POST, path: /rows, json: "{{ item }}"}
      on_status:
        - status: 422
          action: skip
          emit: rejected
          fields: {ref: "{{ item.ref }}", error: "body.errors[0]", at: "{{ item_index }}"}
        - {status: 400, action: skip, emit: raw, set: {last_dup: body.dup}}
      records: body
      emit: accepted
    - id: report
      request:
        service: api
        method: POST
        path: /rows
        json: {ref: r6, email: "{{ steps.load.vars.last_dup }}"}
      records: body
      emit: accepted
    """
    result = run(flow(steps, head=head), server.url)
    assert result.code == 0, result.stderr
    assert result.stream("accepted") == [{"id": "id-r1"}, {"id": "id-r3"}, {"id": "id-r6"}]
    assert result.stream("rejected") == [
        {"ref": "r2", "error": "bad email", "at": 1},
        {"ref": "r5", "error": "bad email", "at": 4},
    ]
    assert result.stream("raw") == [{"dup": "d@x.org", "code": 7}]
    assert result.summary["skipped"] == {"load": 3}
    assert result.summary["records"] == {"accepted": 3, "rejected": 2, "raw": 1}


# -- the upsert block from DESIGN ------------------------------------------------------------


def customers_app() -> tuple[web.Application, dict[str, dict[str, Any]]]:
    """Customers stored by id: POST creates (409 with the existing id when the email is taken,
    422 without an email), PUT replaces."""
    store: dict[str, dict[str, Any]] = {
        "cus_1": {"id": "cus_1", "ref": "old", "email": "ada@example.com", "name": "Ada"}
    }

    async def create(request: web.Request) -> web.StreamResponse:
        data = await request.json()
        if not data.get("email"):
            return web.json_response({"errors": ["email is required"]}, status=422)
        for customer in store.values():
            if customer["email"] == data["email"]:
                return web.json_response({"existing_id": customer["id"]}, status=409)
        cid = f"cus_{len(store) + 1}"
        store[cid] = {"id": cid, **data}
        return web.json_response(store[cid], status=201)

    async def update(request: web.Request) -> web.StreamResponse:
        cid = request.match_info["id"]
        if cid not in store:
            return web.json_response({"error": "no such customer"}, status=404)
        store[cid] = {"id": cid, **await request.json()}
        return web.json_response(store[cid])

    app = app_of({"POST /customers": create, "PUT /customers/{id}": update})
    return app, store


def test_upsert_block_creates_updates_and_rejects_in_input_order(
    serve: Serve, run: RunFlow
) -> None:
    app, store = customers_app()
    server = serve(app)
    head = """\
    inputs:
      type: object
      properties:
        customers:
          type: array
          default:
            - {ref: c1, email: grace@example.com, name: Grace}
            - {ref: c2, email: ada@example.com, name: Ada King}
            - {ref: c3, name: Nameless}
            - {ref: c4, email: grace@example.com, name: Grace Hopper}
            - {ref: c5, email: linus@example.com, name: Linus}
    """
    steps = """\
    - id: sync
      for_each: inputs.customers
      steps:
        - id: create
          request: {service: api, method: POST, path: /customers, json: "{{ item }}"}
          retry_unsafe: true
          on_status:
            - {status: 409, action: goto, goto: update, set: {id: body.existing_id}}
            - status: 422
              action: stop
              emit: rejected
              fields: {ref: "{{ item.ref }}", error: "body.errors[0]"}
            - {status: 2xx, action: end}
          records: body
          fields: {id: id, ref: ref, op: "'created'"}
          emit: upserted
        - id: update
          request:
            service: api
            method: PUT
            path: "/customers/{{ steps.create.vars.id }}"
            json: "{{ item }}"
          records: body
          fields: {id: id, ref: ref, op: "'updated'"}
          emit: upserted
    """
    result = run(flow(steps, head=head), server.url)

    assert result.code == 0, result.stderr
    assert result.stream("upserted") == [
        {"id": "cus_2", "ref": "c1", "op": "created"},
        {"id": "cus_1", "ref": "c2", "op": "updated"},
        {"id": "cus_2", "ref": "c4", "op": "updated"},
        {"id": "cus_3", "ref": "c5", "op": "created"},
    ]
    assert result.stream("rejected") == [{"ref": "c3", "error": "email is required"}]
    assert [(r.method, r.path) for r in server.requests] == [
        ("POST", "/customers"),
        ("POST", "/customers"), ("PUT", "/customers/cus_1"),
        ("POST", "/customers"),
        ("POST", "/customers"), ("PUT", "/customers/cus_2"),
        ("POST", "/customers"),
    ]  # fmt: skip
    assert store["cus_1"]["name"] == "Ada King" and store["cus_2"]["name"] == "Grace Hopper"
    manifest = json.loads((result.out / "manifest.json").read_text())
    assert {k: v["count"] for k, v in manifest["streams"].items()} == {"upserted": 4, "rejected": 1}


# -- for_each --------------------------------------------------------------------------------


def test_for_each_concurrency_bounds_in_flight_and_keeps_input_order(
    serve: Serve, run: RunFlow
) -> None:
    in_flight = [0]
    peak = [0]
    finished: list[int] = []
    rng = random.Random(7)

    async def listing(request: web.Request) -> web.StreamResponse:
        return web.json_response({"data": [{"id": i} for i in range(12)]})

    async def detail(request: web.Request) -> web.StreamResponse:
        in_flight[0] += 1
        peak[0] = max(peak[0], in_flight[0])
        try:
            await asyncio.sleep(rng.uniform(0.02, 0.12))
        finally:
            in_flight[0] -= 1
        finished.append(int(request.match_info["id"]))
        return web.json_response({"id": int(request.match_info["id"])})

    server = serve(app_of({"GET /things": listing, "GET /things/{id}": detail}))
    steps = """\
    - id: list
      request: {service: api, path: /things}
      records: body.data
    - id: detail
      for_each: "steps.list.records[].id"
      concurrency: 4
      request: {service: api, path: "/things/{{ item }}"}
      records: body
      fields: {id: id, position: "{{ item_index }}", item: "{{ item }}"}
      emit: details
    """
    result = run(flow(steps), server.url)

    assert result.code == 0, result.stderr
    assert result.stream("details") == [{"id": i, "position": i, "item": i} for i in range(12)]
    assert 2 <= peak[0] <= 4
    # The server answered out of order, yet records kept input order.
    assert sorted(finished) == list(range(12)) and finished != sorted(finished)


def test_for_each_over_inputs_with_max_items(serve: Serve, run: RunFlow) -> None:
    server = serve(app_of({"GET /x/{item}": by_item({})}))
    head = """\
    inputs:
      type: object
      properties:
        ids: {type: array, default: [a, b, c, d]}
    """
    steps = """\
    - id: each
      for_each: inputs.ids
      max_items: 2
      request: {service: api, path: "/x/{{ item }}"}
      records: body
      fields: {id: id, at: "{{ item_index }}"}
      emit: out
    """
    result = run(flow(steps, head=head), server.url)
    assert result.code == 0, result.stderr
    assert result.stream("out") == [{"id": "a", "at": 0}, {"id": "b", "at": 1}]
    assert server.paths() == ["/x/a", "/x/b"]


@pytest.mark.parametrize(
    ("source", "shown"), [("inputs.obj", "an object"), ("inputs.text", "a string")]
)
def test_for_each_over_a_non_list_fails(
    serve: Serve, run: RunFlow, source: str, shown: str
) -> None:
    server = serve(app_of({"GET /x/{item}": by_item({})}))
    head = """\
    inputs:
      type: object
      properties:
        obj: {type: object, default: {a: 1}}
        text: {type: string, default: abc}
    """
    steps = f"""\
    - id: each
      for_each: {source}
      request: {{service: api, path: "/x/{{{{ item }}}}"}}
    """
    result = run(flow(steps, head=head), server.url)
    assert result.code == 1
    assert f"gave {shown}, not a list" in result.stderr and "step 'each'" in result.stderr
    assert result.error["step"] == "each"
    assert server.requests == []


def test_block_when_per_item_and_inner_steps_seen_after_the_block(
    serve: Serve, run: RunFlow
) -> None:
    rng = random.Random(3)

    async def fetch(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(rng.uniform(0.0, 0.08))
        item = request.match_info["item"]
        return web.json_response({"id": item, "rows": [{"id": item + "1"}, {"id": item + "2"}]})

    async def echo(request: web.Request) -> web.StreamResponse:
        return web.json_response(await request.json())

    server = serve(app_of({"GET /fetch/{item}": fetch, "POST /report": echo}))
    head = """\
    inputs:
      type: object
      properties:
        items:
          type: array
          default:
            - {id: a, active: true}
            - {id: b, active: false}
            - {id: c, active: true}
            - {id: d, active: true}
            - {id: e, active: false}
    """
    steps = """\
    - id: block
      for_each: inputs.items
      concurrency: 3
      steps:
        - id: fetch
          when: item.active
          request: {service: api, path: "/fetch/{{ item.id }}"}
          records: body.rows
          set: {last: body.id, index: item_index}
    - id: report
      request:
        service: api
        method: POST
        path: /report
        json:
          records: "{{ steps.fetch.records }}"
          vars: "{{ steps.fetch.vars }}"
          last_body: "{{ steps.fetch.response.body.id }}"
      records: body
      emit: report
    """
    result = run(flow(steps, head=head), server.url)

    assert result.code == 0, result.stderr
    assert sorted(server.paths()[:-1]) == ["/fetch/a", "/fetch/c", "/fetch/d"]
    assert result.stream("report") == [
        {
            "records": [{"id": i + n} for i in "acd" for n in "12"],
            "vars": {"last": "d", "index": 3},
            "last_body": "d",
        }
    ]


# -- poll and expect -------------------------------------------------------------------------

POLL = "{until: \"body.state == 'done'\", fail_when: \"body.state == 'failed'\", interval: 0.05"


def test_poll_until_true_maps_the_last_response(serve: Serve, run: RunFlow) -> None:
    running = (200, {"id": 7, "state": "running", "rows": [{"n": 0}]})
    done = (200, {"id": 7, "state": "done", "rows": [{"n": 1}, {"n": 2}]})
    server = serve(app_of({"GET /job": sequence(running, running, done)}))
    steps = f"""\
    - id: job
      request: {{service: api, path: /job}}
      poll: {POLL}, timeout: 5}}
      records: body.rows
      emit: rows
    """
    result = run(flow(steps), server.url)
    assert result.code == 0, result.stderr
    assert result.stream("rows") == [{"n": 1}, {"n": 2}]
    assert server.paths() == ["/job"] * 3
    at = [r.at for r in server.requests]
    assert all(b - a >= 0.05 for a, b in itertools.pairwise(at))


def test_poll_fail_when_fails_with_its_message(serve: Serve, run: RunFlow) -> None:
    running = (200, {"id": 7, "state": "running"})
    failed = (200, {"id": 7, "state": "failed", "error": "disk full"})
    server = serve(app_of({"GET /job": sequence(running, failed, (200, {"state": "done"}))}))
    steps = f"""\
    - id: job
      request: {{service: api, path: /job}}
      poll: {POLL}, timeout: 5, message: "job {{{{ body.id }}}} failed: {{{{ body.error }}}}"}}
    """
    result = run(flow(steps), server.url)
    assert result.code == 1
    assert "job 7 failed: disk full" in result.stderr
    assert result.error["message"] == "job 7 failed: disk full"
    assert result.error["step"] == "job"
    assert server.paths() == ["/job"] * 2


def test_poll_timeout_is_unavailable_with_its_message(serve: Serve, run: RunFlow) -> None:
    server = serve(app_of({"GET /job": reply(200, {"id": 7, "state": "running"})}))
    steps = f"""\
    - id: job
      request: {{service: api, path: /job}}
      poll: {POLL}, timeout: 0.3, message: "job {{{{ body.id }}}} still {{{{ body.state }}}}"}}
    """
    started = time.monotonic()
    result = run(flow(steps), server.url)
    assert result.code == 69
    assert "job 7 still running" in result.stderr
    assert result.error["message"] == "job 7 still running"
    assert 2 <= len(server.requests) <= 8
    assert time.monotonic() - started < 5


def test_expect_reports_every_failing_expectation(serve: Serve, run: RunFlow) -> None:
    server = serve(
        app_of(
            {
                "GET /good": reply(200, {"version": 2, "items": [1]}),
                "GET /bad": reply(200, {"version": 3, "items": []}),
            }
        )
    )
    expect = """\
      expect:
        - {that: "body.version == `2`", message: "version is {{ body.version }}, not 2"}
        - {that: body.items, message: "no items at {{ url }}"}
        - {that: "status == `200`", message: "status {{ status }}"}
      records: body.items
      emit: out
"""
    steps = (
        "- id: good\n  request: {service: api, path: /good}\n"
        + textwrap.indent(textwrap.dedent(expect), "  ")
        + "- id: bad\n  request: {service: api, path: /bad}\n"
        + textwrap.indent(textwrap.dedent(expect), "  ")
    )
    result = run(flow(steps), server.url)
    assert result.code == 1
    assert "version is 3, not 2" in result.stderr
    assert f"no items at {server.url}/bad" in result.stderr
    assert "status 200" not in result.stderr and "version is 2" not in result.stderr
    assert result.error["kind"] == "expect" and result.error["step"] == "bad"
    assert server.paths() == ["/good", "/bad"]
    assert result.stream("out") is None

    # Expectations that hold change nothing.
    good = steps[: steps.index("- id: bad")]
    result = run(flow(good), server.url)
    assert result.code == 0, result.stderr
    assert result.stream("out") == [{"value": 1}]
    assert result.summary["error"] is None


# -- signals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_the_run_and_commits_nothing(
    serve: Serve, write_flow: Callable[..., Path], tmp_path: Path, sig: int, code: int
) -> None:
    release = threading.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        for _ in range(400):  # at most 20 s, released when the test ends
            if release.is_set():
                break
            await asyncio.sleep(0.05)
        return web.json_response([{"id": 2}])

    server = serve(app_of({"GET /fast": reply(200, [{"id": 1}]), "GET /slow": slow}))
    write_flow(
        flow(
            """\
            - id: fast
              request: {service: api, path: /fast}
              records: body
              emit: out
            - id: slow
              request: {service: api, path: /slow}
              records: body
              emit: out
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNER_")}
    env["API_URL"] = server.url
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen(
        [sys.executable, "-m", "runner.cli", "run", "flow.yaml", "--summary", "s.json"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while "/slow" not in server.paths() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "/slow" in server.paths()
        sent = time.monotonic()
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=10)
        elapsed = time.monotonic() - sent
    finally:
        release.set()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code, stderr
    assert elapsed < 5
    out = tmp_path / "out"
    assert not (out / "out.jsonl").exists() and not (out / "manifest.json").exists()
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["status"] == "interrupted" and summary["exit_code"] == code
    assert server.paths() == ["/fast", "/slow"]
