"""End-to-end: real flows through the real CLI (and the Python API) against local aiohttp apps."""

from __future__ import annotations

import asyncio
import email
import email.policy
import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import Cli, Serve, WriteFlow, read_jsonl, summary_of

Canned = tuple[int, str, bytes]  # status, content type, body


def make_app(
    routes: dict[str, Canned | Callable[[web.Request], Any]] | None = None,
) -> tuple[web.Application, list[str]]:
    """An app answering canned responses by path (any method), else `{"ok": true}`.

    The second value collects each request's raw (still percent-encoded) path, which the
    shared recorder decodes.
    """
    routes = routes or {}
    raw_paths: list[str] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        raw_paths.append(request.raw_path.split("?", 1)[0])
        answer = routes.get(request.path)
        if answer is None:
            return web.json_response({"ok": True})
        if callable(answer):
            result: web.StreamResponse = await answer(request)
            return result
        status, ctype, body = answer
        return web.Response(status=status, body=body, headers={"Content-Type": ctype})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app, raw_paths


HEADER = """\
version: 1
name: e2e
services:
  api:
    base_url: "{{ env.API }}/api/"
"""


# -- build -------------------------------------------------------------------------------------


def test_urls_methods_query_and_headers(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    app, _ = make_app()
    server = serve(app)
    write_flow(
        """\
version: 1
name: build
services:
  api:
    base_url: "{{ env.API }}/api/"
    headers: {X-Service: svc, X-Both: from-service}
steps:
  - id: get
    request:
      service: api
      path: /v2/x
      query: {a: null, t: true, f: false, l: [1, "two"], s: "x y&z"}
      headers: {X-Both: from-step, X-Step: st}
  - {id: post, request: {service: api, method: POST, path: /m}}
  - {id: put, request: {service: api, method: PUT, path: /m}}
  - {id: patch, request: {service: api, method: PATCH, path: /m}}
  - {id: delete, request: {service: api, method: DELETE, path: /m}}
  - {id: head, request: {service: api, method: HEAD, path: /m}}
  - {id: absolute, request: {url: "{{ env.API }}/elsewhere/abs"}}
"""
    )
    result = cli("run", "flow.yaml", "--summary", "s.json", env={"API": server.url})
    assert result.code == 0, result.stderr
    assert [(r.method, r.path) for r in server.requests] == [
        ("GET", "/api/v2/x"),
        ("POST", "/api/m"),
        ("PUT", "/api/m"),
        ("PATCH", "/api/m"),
        ("DELETE", "/api/m"),
        ("HEAD", "/api/m"),
        ("GET", "/elsewhere/abs"),
    ]
    first = server.requests[0]
    assert first.query == {"t": ["true"], "f": ["false"], "l": ["1", "two"], "s": ["x y&z"]}
    assert first.headers["X-Service"] == "svc"
    assert first.headers["X-Both"] == "from-step"
    assert first.headers["X-Step"] == "st"
    # The service's headers are not sent to an absolute URL of no service.
    assert "X-Service" not in server.requests[-1].headers
    summary = summary_of(tmp_path)
    assert summary["status"] == "success"
    assert summary["requests"] == 7
    assert summary["status_counts"] == {"200": 7}


def test_a_base_url_reading_the_item_is_rendered_for_each_request(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    # A base_url of text and lookups of env, inputs, secrets or run is rendered once per run;
    # one that reads anything else (the item), or calls a function, is rendered per request.
    first, second = serve(make_app()[0]), serve(make_app()[0])
    write_flow(
        """\
version: 1
name: hosts
inputs: {type: object, properties: {hosts: {type: array}}}
services:
  fixed: {base_url: "{{ env.API }}/fixed"}
  per_item: {base_url: "{{ item }}/by-item"}
  fresh: {base_url: "{{ env.API }}/{{ uuid4() }}"}
steps:
  - id: each
    for_each: inputs.hosts
    concurrency: 2
    steps:
      - {id: fixed, request: {service: fixed, path: "/{{ item_index }}"}}
      - {id: moving, request: {service: per_item, path: /x}}
      - {id: fresh, request: {service: fresh, path: /y}}
"""
    )
    hosts = json.dumps([first.url, second.url, first.url])
    result = cli("run", "flow.yaml", "--input", f"hosts={hosts}", env={"API": second.url})
    assert result.code == 0, result.stderr
    assert sorted(r.path for r in first.requests) == ["/by-item/x", "/by-item/x"]
    fresh = [r.path for r in second.requests if r.path.endswith("/y")]
    assert len(set(fresh)) == 3
    assert sorted(r.path for r in second.requests if r.path not in fresh) == [
        "/by-item/x",
        "/fixed/0",
        "/fixed/1",
        "/fixed/2",
    ]


def test_bodies(serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path) -> None:
    app, _ = make_app()
    server = serve(app)
    (tmp_path / "data.txt").write_bytes(b"file content\n")
    write_flow("<name>{{ inputs.who }}</name>\n", name="body.xml")
    write_flow(
        HEADER
        + """\
inputs:
  type: object
  properties:
    objs: {type: array, default: [{name: "a<b", n: 1}]}
    who: {type: string, default: "A & B <c>"}
steps:
  - id: typed
    for_each: inputs.objs
    request: {service: api, method: POST, path: /typed, json: "{{ item }}"}
  - id: string
    for_each: inputs.objs
    request: {service: api, method: POST, path: /string, json: "{{ item | tojson }}"}
  - id: form
    request: {service: api, method: POST, path: /form, form: {a: "1 2", b: "x&y"}}
  - id: multi
    request:
      service: api
      method: POST
      path: /multi
      multipart: {note: hello, upload: {file: data.txt, content_type: text/plain}}
  - id: csv
    request: {service: api, method: POST, path: /csv, body: "a,b\\n1,2", content_type: text/csv}
  - id: plain
    request: {service: api, method: POST, path: /plain, body: "hi {{ inputs.who }}"}
  - id: file
    request: {service: api, method: POST, path: /file, body_file: body.xml}
"""
    )
    result = cli("run", "flow.yaml", env={"API": server.url})
    assert result.code == 0, result.stderr
    got = {r.path: r for r in server.requests}
    typed = got["/api/typed"]
    assert typed.headers["Content-Type"].startswith("application/json")
    assert json.loads(typed.body) == {"name": "a<b", "n": 1}
    assert json.loads(got["/api/string"].body) == '{"name":"a<b","n":1}'
    form = got["/api/form"]
    assert form.headers["Content-Type"].startswith("application/x-www-form-urlencoded")
    assert form.body == b"a=1+2&b=x%26y"
    multi = got["/api/multi"]
    message = email.message_from_bytes(
        b"Content-Type: " + multi.headers["Content-Type"].encode() + b"\r\n\r\n" + multi.body,
        policy=email.policy.HTTP,
    )
    assert message.is_multipart()
    parts = {p.get_param("name", header="content-disposition"): p for p in message.iter_parts()}
    assert parts["note"].get_payload(decode=True) == b"hello"
    upload = parts["upload"]
    assert upload.get_filename() == "data.txt"
    assert upload.get_content_type() == "text/plain"
    assert upload.get_payload(decode=True) == b"file content\n"
    assert got["/api/csv"].headers["Content-Type"].startswith("text/csv")
    assert got["/api/csv"].body == b"a,b\n1,2"
    assert got["/api/plain"].headers["Content-Type"].startswith("text/plain")
    assert got["/api/plain"].body == b"hi A & B <c>"
    assert "xml" in got["/api/file"].headers["Content-Type"]
    assert got["/api/file"].body.decode().strip() == "<name>A &amp; B &lt;c&gt;</name>"


def test_a_flow_content_type_in_any_case_wins(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    seen: list[list[str]] = []

    async def capture(request: web.Request) -> web.Response:
        seen.append(request.headers.getall("Content-Type"))
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/api/x", capture)
    server = serve(app)
    write_flow(
        HEADER
        + """\
steps:
  - id: x
    request:
      service: api
      method: POST
      path: /x
      headers: {content-type: application/vnd.api+json}
      json: {a: 1}
"""
    )
    result = cli("run", "flow.yaml", env={"API": server.url})
    assert result.code == 0, result.stderr
    assert seen == [["application/vnd.api+json"]]


def test_path_encoding_raw_and_mixed_templates(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    app, raw = make_app()
    server = serve(app)
    write_flow(
        HEADER
        + """\
inputs:
  type: object
  properties:
    seg: {type: string, default: "a/b c"}
    pre: {type: string, default: "x/y"}
    flag: {type: boolean, default: true}
    obj: {type: object, default: {k: 1}}
    nothing: {type: "null", default: null}
steps:
  - id: enc
    request:
      service: api
      path: "/items/{{ inputs.seg }}/{{ inputs.pre | raw }}"
      query: {q: "n={{ inputs.flag }}", o: "o={{ inputs.obj }}"}
      headers: {X-Mixed: "v{{ inputs.obj }}"}
  - id: nul
    request: {service: api, path: "/items/{{ inputs.nothing }}"}
"""
    )
    result = cli("run", "flow.yaml", "--summary", "s.json", env={"API": server.url})
    assert raw[0] == "/api/items/a%2Fb%20c/x/y"
    first = server.requests[0]
    assert first.query == {"q": ["n=true"], "o": ['o={"k":1}']}
    assert first.headers["X-Mixed"] == 'v{"k":1}'
    # A null in `path` is a run error: nothing more is sent.
    assert result.code == 1, result.stderr
    assert len(server.requests) == 1
    assert "nul" in result.stderr
    assert summary_of(tmp_path)["error"]["step"] == "nul"


# -- receive -----------------------------------------------------------------------------------


def test_decoding_by_content_type_and_format(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    xml = (
        b'<?xml version="1.0"?><root xmlns="urn:a" xmlns:p="urn:p">'
        b'<p:item id="1">one</p:item><count>2</count></root>'
    )
    app, _ = make_app(
        {
            "/json": (200, "application/json", b'{"items": [{"id": 1}, {"id": 2}]}'),
            "/ndjson": (200, "application/x-ndjson", b'{"id": 1}\n{"id": 2}\n'),
            "/csv": (200, "text/csv", b"id,name\r\n1,a\r\n2,b\r\n"),
            "/xml": (200, "application/xml", xml),
            "/vnd": (200, "application/vnd.x+json", b'{"id": "v"}'),
            "/text": (200, "text/plain", b"hello"),
            "/forced": (200, "text/plain", b'{"items": [{"id": 9}]}'),
        }
    )
    server = serve(app)
    write_flow(
        """\
version: 1
name: decode
services:
  api: {base_url: "{{ env.API }}"}
steps:
  - {id: j, request: {service: api, path: /json}, records: body.items, emit: json}
  - {id: n, request: {service: api, path: /ndjson}, records: body, emit: ndjson}
  - {id: c, request: {service: api, path: /csv}, records: body, emit: csv}
  - id: x
    request: {service: api, path: /xml}
    response: {xml: {force_list: [item]}}
    records: body.root
    fields: {items: item, count: count}
    emit: xml
  - {id: v, request: {service: api, path: /vnd}, records: body, emit: vnd}
  - id: t
    request: {service: api, path: /text}
    records: '{text: body}'
    emit: text
  - id: f
    request: {service: api, path: /forced}
    response: {format: json}
    records: body.items
    emit: forced
"""
    )
    result = cli("run", "flow.yaml", env={"API": server.url})
    assert result.code == 0, result.stderr
    out = tmp_path / "out"
    assert read_jsonl(out / "json.jsonl") == [{"id": 1}, {"id": 2}]
    assert read_jsonl(out / "ndjson.jsonl") == [{"id": 1}, {"id": 2}]
    assert read_jsonl(out / "csv.jsonl") == [{"id": "1", "name": "a"}, {"id": "2", "name": "b"}]
    assert read_jsonl(out / "xml.jsonl") == [
        {"items": [{"@id": "1", "#text": "one"}], "count": "2"}
    ]
    assert read_jsonl(out / "vnd.jsonl") == [{"id": "v"}]
    assert read_jsonl(out / "text.jsonl") == [{"text": "hello"}]
    assert read_jsonl(out / "forced.jsonl") == [{"id": 9}]


def test_undecodable_body_fails_naming_step_and_url(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    app, _ = make_app({"/api/bad": (200, "application/json", b'{"oops": broken')})
    server = serve(app)
    write_flow(
        HEADER + "steps:\n  - {id: bad, request: {service: api, path: /bad}, records: body}\n"
    )
    result = cli("run", "flow.yaml", "--summary", "s.json", env={"API": server.url})
    assert result.code == 1
    assert "'bad'" in result.stderr
    assert f"{server.url}/api/bad" in result.stderr
    assert '{"oops": broken' in result.stderr
    error = summary_of(tmp_path)["error"]
    assert error["kind"] == "decode"
    assert error["step"] == "bad"
    assert error["status"] == 200


def test_max_body_bytes_and_empty_body(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    app, _ = make_app(
        {
            "/api/big": (200, "application/json", b'["' + b"x" * 5000 + b'"]'),
            "/api/empty": (200, "application/json", b""),
        }
    )
    server = serve(app)
    write_flow(
        HEADER
        + """\
steps:
  - id: empty
    request: {service: api, path: /empty}
    records: '{body: body}'
    emit: empty
  - id: big
    request: {service: api, path: /big}
    response: {max_body_bytes: 100}
    records: body
"""
    )
    result = cli("run", "flow.yaml", "--summary", "s.json", env={"API": server.url})
    assert result.code == 1
    assert "big" in result.stderr
    assert "100" in result.stderr
    summary = summary_of(tmp_path)
    assert summary["error"]["step"] == "big"
    # The failed run committed nothing; the empty body was mapped as null before that.
    assert not (tmp_path / "out" / "empty.jsonl").exists()
    partials = list((tmp_path / "out").glob(".empty.jsonl.*.partial"))
    assert len(partials) == 1
    assert read_jsonl(partials[0]) == [{"body": None}]


# -- map ---------------------------------------------------------------------------------------


def test_mapping_filter_fields_emit_set_and_when(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    listing = {
        "data": [
            {"id": 1, "score": 0, "name": "zero"},
            {"id": 2, "score": None, "name": "null"},
            {"id": 3, "score": 5, "name": "five", "extra": {"deep": [7]}},
            {"id": 4, "score": "", "name": "empty"},
        ]
    }
    one = {"thing": {"id": "o1", "token": "tok-9"}, "none": None}
    app, _ = make_app(
        {
            "/api/list": (200, "application/json", json.dumps(listing).encode()),
            "/api/one": (200, "application/json", json.dumps(one).encode()),
        }
    )
    server = serve(app)
    write_flow(
        HEADER
        + """\
inputs:
  type: object
  properties:
    go: {type: boolean, default: false}
steps:
  - id: list
    request: {service: api, path: /list}
    records: body.data
    filter: score
    fields:
      id: id
      op: "'created'"
      label: "{{ record.name }}#{{ record.id }}"
      deep: "extra.deep[0]"
    emit: things
  - id: one
    request: {service: api, path: /one}
    records: body.thing
    set: {token: body.thing.token}
    fields: {id: id, op: "'single'"}
    emit: things
  - id: nothing
    request: {service: api, path: /one}
    records: body.none
    emit: never
  - id: use
    request: {service: api, path: "/use/{{ steps.one.vars.token }}"}
    records: '{token: `"x"`}'
    fields: {seen: "{{ steps.one.vars.token }}", n: "{{ steps.list.records | length }}"}
    emit: used
  - id: skipped
    when: inputs.go
    request: {service: api, path: /skipped}
    records: body
    emit: used
"""
    )
    result = cli("run", "flow.yaml", "--summary", "s.json", env={"API": server.url})
    assert result.code == 0, result.stderr
    out = tmp_path / "out"
    assert read_jsonl(out / "things.jsonl") == [
        {"id": 1, "op": "created", "label": "zero#1", "deep": None},
        {"id": 3, "op": "created", "label": "five#3", "deep": 7},
        {"id": "o1", "op": "single"},
    ]
    assert read_jsonl(out / "used.jsonl") == [{"seen": "tok-9", "n": 2}]
    assert (out / "never.jsonl").read_bytes() == b""
    assert server.paths() == ["/api/list", "/api/one", "/api/one", "/api/use/tok-9"]
    summary = summary_of(tmp_path)
    assert summary["records"] == {"things": 3, "used": 1, "never": 0}
    warnings = summary["warnings"]
    assert len(warnings) == 1
    assert "nothing" in warnings[0]
    assert "nothing" in result.stderr
    assert "warning" in result.stderr.lower()


# -- inputs ------------------------------------------------------------------------------------

INPUTS_FLOW = """\
version: 1
name: inputs
inputs:
  type: object
  required: [n]
  properties:
    n: {type: integer}
    flag: {type: boolean, default: false}
    tags: {type: array, items: {type: string}, default: [d]}
    rows: {type: array, default: []}
    doc: {type: object, default: {}}
    label: {type: string, default: deflt}
services:
  api: {base_url: "{{ env.API }}"}
steps:
  - id: echo
    request:
      service: api
      method: POST
      path: /echo
      json: {n: "{{ inputs.n }}", flag: "{{ inputs.flag }}", tags: "{{ inputs.tags }}",
             rows: "{{ inputs.rows }}", doc: "{{ inputs.doc }}", label: "{{ inputs.label }}"}
"""


def test_inputs_coercion_files_and_defaults(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    app, _ = make_app()
    server = serve(app)
    write_flow(INPUTS_FLOW)
    (tmp_path / "doc.json").write_text('{"a": [1, 2]}', encoding="utf-8")
    (tmp_path / "rows.jsonl").write_text('{"r": 1}\n\n{"r": 2}\n', encoding="utf-8")
    (tmp_path / "in.yaml").write_text("n: 5\nlabel: from-file\n", encoding="utf-8")
    env = {"API": server.url}
    result = cli("run", "flow.yaml", "--input", "n=7", env=env)
    assert result.code == 0, result.stderr
    assert json.loads(server.requests[-1].body) == {
        "n": 7,
        "flag": False,
        "tags": ["d"],
        "rows": [],
        "doc": {},
        "label": "deflt",
    }
    result = cli(
        "run", "flow.yaml", "--input", "n=8", "--input", "flag=true",
        "--input", 'tags=["a","b"]', "--input", "doc=@doc.json", "--input", "rows=@rows.jsonl",
        env=env,
    )  # fmt: skip
    assert result.code == 0, result.stderr
    assert json.loads(server.requests[-1].body) == {
        "n": 8, "flag": True, "tags": ["a", "b"], "rows": [{"r": 1}, {"r": 2}],
        "doc": {"a": [1, 2]}, "label": "deflt",
    }  # fmt: skip
    result = cli("run", "flow.yaml", "--inputs-file", "in.yaml", env=env)
    assert result.code == 0, result.stderr
    body = json.loads(server.requests[-1].body)
    assert (body["n"], body["label"]) == (5, "from-file")
    assert len(server.requests) == 3


@pytest.mark.parametrize(
    "args",
    [
        ["--input", "n=seven"],
        ["--input", "n=1", "--input", "flag=maybe"],
        ["--input", "n=1", "--input", "tags=[1, 2]"],
        [],
    ],
    ids=["not-int", "not-bool", "wrong-items", "missing-required"],
)
def test_invalid_inputs_exit_2_before_any_request(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path, args: list[str]
) -> None:
    app, _ = make_app()
    server = serve(app)
    write_flow(INPUTS_FLOW)
    result = cli("run", "flow.yaml", *args, "--summary", "s.json", env={"API": server.url})
    assert result.code == 2
    assert "input" in result.stderr
    assert server.requests == []
    assert summary_of(tmp_path)["exit_code"] == 2
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_services_file_overrides_base_url(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    app, _ = make_app()
    server = serve(app)
    write_flow(
        """\
version: 1
name: svc
services:
  api: {base_url: "https://nowhere.invalid/base", headers: {X-Kept: yes-kept}}
steps:
  - {id: a, request: {service: api, path: /p}}
"""
    )
    (tmp_path / "services.yaml").write_text(
        f"api: {{base_url: '{server.url}/over'}}\n", encoding="utf-8"
    )
    result = cli("run", "flow.yaml", "--services", "services.yaml")
    assert result.code == 0, result.stderr
    assert server.paths() == ["/over/p"]
    assert server.requests[0].headers["X-Kept"] == "yes-kept"


# -- outputs -----------------------------------------------------------------------------------

OUTPUT_FLOW = """\
version: 1
name: outputs
inputs:
  type: object
  properties:
    fail: {type: boolean, default: false}
services:
  api: {base_url: "{{ env.API }}"}
steps:
  - id: rows
    request: {service: api, path: /rows}
    records: body
    emit: rows
  - id: boom
    when: inputs.fail
    request: {service: api, path: /boom}
outputs:
  rows: {primary_key: [id]}
  quiet: {}
"""


def _rows_app(rows: list[dict[str, Any]]) -> web.Application:
    async def rows_handler(request: web.Request) -> web.Response:
        return web.json_response(rows)

    app, _ = make_app({"/rows": rows_handler, "/boom": (400, "text/plain", b"no")})
    return app


def test_files_manifest_and_failed_second_run(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    rows: list[dict[str, Any]] = [{"id": 1, "name": "é"}, {"id": 2, "name": "b"}]
    server = serve(_rows_app(rows))
    write_flow(OUTPUT_FLOW)
    env = {"API": server.url}
    result = cli("run", "flow.yaml", env=env)
    assert result.code == 0, result.stderr
    out = tmp_path / "out"
    data = (out / "rows.jsonl").read_bytes()
    assert data == '{"id":1,"name":"é"}\n{"id":2,"name":"b"}\n'.encode()
    assert (out / "quiet.jsonl").read_bytes() == b""
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert set(manifest) >= {"run_id", "finished_at", "streams"}
    assert manifest["streams"]["rows"]["count"] == 2
    assert manifest["streams"]["rows"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["streams"]["quiet"]["count"] == 0
    assert manifest["streams"]["quiet"]["sha256"] == hashlib.sha256(b"").hexdigest()
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    rows.append({"id": 3, "name": "c"})
    result = cli("run", "flow.yaml", "--input", "fail=true", "--summary", "s.json", env=env)
    assert result.code == 1
    summary = summary_of(tmp_path)
    assert summary["status"] == "failed"
    assert summary["error"]["step"] == "boom"
    assert summary["error"]["status"] == 400
    assert summary["error"]["kind"] == "http"
    after = {p.name: p.read_bytes() for p in out.iterdir() if not p.name.endswith(".partial")}
    assert after == before
    partial = out / f".rows.jsonl.{summary['run_id']}.partial"
    assert read_jsonl(partial) == rows


def test_output_dir_is_locked_and_dead_partials_are_removed(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    import fcntl
    import os

    server = serve(_rows_app([{"id": 1}]))
    write_flow(OUTPUT_FLOW)
    env = {"API": server.url}
    out = tmp_path / "out"
    out.mkdir()
    dead = out / ".rows.jsonl.20240101T000000Z-abcdef.partial"
    dead.write_text('{"id":0}\n')
    mine = out / "notes.partial"  # not a partial of a run: left alone
    mine.write_text("x")

    # Another run holds the folder: exit 75, and nothing in it is touched.
    fd = os.open(out / ".runner.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        result = cli("run", "flow.yaml", "--summary", "s.json", env=env)
        assert result.code == 75, result.stderr
        assert "another run writes into the output directory" in result.stderr
        assert summary_of(tmp_path)["exit_code"] == 75
        assert dead.exists() and not (out / "rows.jsonl").exists()
        assert server.requests == []
    finally:
        os.close(fd)

    result = cli("run", "flow.yaml", env=env)
    assert result.code == 0, result.stderr
    assert not dead.exists() and mine.exists()
    assert read_jsonl(out / "rows.jsonl") == [{"id": 1}]
    assert not [p for p in out.iterdir() if p.name.endswith(".partial") and p != mine]


def test_output_dir_with_run_id_and_stdout(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    server = serve(_rows_app([{"id": 1}, {"id": 2}]))
    write_flow(OUTPUT_FLOW)
    env = {"API": server.url}
    result = cli(
        "run", "flow.yaml", "--output-dir", "runs/{run_id}", "--summary", "s.json", env=env
    )
    assert result.code == 0, result.stderr
    run_id = summary_of(tmp_path)["run_id"]
    folder = tmp_path / "runs" / run_id
    assert read_jsonl(folder / "rows.jsonl") == [{"id": 1}, {"id": 2}]
    assert json.loads((folder / "manifest.json").read_text())["run_id"] == run_id

    result = cli("run", "flow.yaml", "--output", "-", env=env)
    assert result.code == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines == [
        {"stream": "rows", "record": {"id": 1}},
        {"stream": "rows", "record": {"id": 2}},
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("on_invalid", ["fail", "skip"])
def test_output_schema(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path, on_invalid: str
) -> None:
    server = serve(_rows_app([{"id": 1}, {"id": "two"}, {"id": 3}]))
    write_flow(
        """\
version: 1
name: schema
services:
  api: {base_url: "{{ env.API }}"}
steps:
  - {id: rows, request: {service: api, path: /rows}, records: body, emit: rows}
outputs:
  rows:
    schema: {type: object, required: [id], properties: {id: {type: integer}}}
    on_invalid: ON_INVALID
""".replace("ON_INVALID", on_invalid)
    )
    result = cli("run", "flow.yaml", "--summary", "s.json", env={"API": server.url})
    summary = summary_of(tmp_path)
    if on_invalid == "fail":
        assert result.code == 1
        assert summary["error"]["kind"] == "invalid_record"
        assert "rows" in result.stderr
        assert not (tmp_path / "out" / "rows.jsonl").exists()
    else:
        assert result.code == 0, result.stderr
        assert read_jsonl(tmp_path / "out" / "rows.jsonl") == [{"id": 1}, {"id": 3}]
        assert summary["records"] == {"rows": 2}


def test_unwritable_output_dir_exit_2_before_any_request(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    server = serve(_rows_app([{"id": 1}]))
    write_flow(OUTPUT_FLOW)
    # A folder below a regular file cannot be created, even by root.
    (tmp_path / "locked").write_text("a file", encoding="utf-8")
    result = cli("run", "flow.yaml", "--output-dir", "locked/out", env={"API": server.url})
    assert result.code == 2
    assert "locked" in result.stderr
    assert server.requests == []


# -- CLI ---------------------------------------------------------------------------------------


def test_dry_run(serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path) -> None:
    app, _ = make_app()
    server = serve(app)
    write_flow(
        """\
version: 1
name: dry
inputs:
  type: object
  properties:
    q: {type: string, default: hello}
services:
  api:
    base_url: "{{ env.API }}"
    auth: {type: bearer, token: "{{ secrets.API_TOKEN }}"}
    headers: {X-Key: "{{ secrets.API_KEY }}"}
steps:
  - id: first
    request: {service: api, path: /first, query: {q: "{{ inputs.q }}"}}
    records: body
    set: {id: body.id}
    emit: first
  - id: second
    request: {service: api, path: "/second/{{ steps.first.vars.id }}"}
"""
    )
    result = cli(
        "run", "flow.yaml", "--dry-run", "--summary", "s.json",
        env={"API": server.url, "API_KEY": "sekrit-key"},
    )  # fmt: skip
    assert result.code == 0, result.stderr
    assert f"GET {server.url}/first?q=hello" in result.stdout
    assert "X-Key: ***" in result.stdout
    assert "sekrit-key" not in result.stdout + result.stderr
    assert "step second:" in result.stdout
    assert "needs steps.first" in result.stdout
    assert server.requests == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flow.yaml"]


def test_dry_run_renders_a_known_for_each_list_with_its_first_item(
    cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    write_flow(
        """\
version: 1
name: dry
inputs:
  type: object
  properties:
    customers: {type: array, default: [{ref: a-1, name: Ada}, {ref: b-2, name: Bob}]}
services:
  api:
    base_url: https://api.example.com
    auth: {type: api_key, in: header, name: X-Api-Key, value: "{{ secrets.KEY }}"}
steps:
  - id: sync
    for_each: inputs.customers
    steps:
      - id: create
        request: {service: api, method: POST, path: /customers, json: "{{ item }}"}
  - id: list
    request: {service: api, path: /customers}
    records: body
  - id: each
    for_each: steps.list.records
    request: {service: api, path: "/customers/{{ item.id }}"}
"""
    )
    result = cli("run", "flow.yaml", "--dry-run")
    assert result.code == 0, result.stderr
    blocks = result.stdout.strip().split("\n\n")
    assert blocks[0].splitlines() == [
        "step create:",
        "  POST https://api.example.com/customers",
        "  (the for_each's first item)",
        "  Content-Type: application/json",
        "  X-Api-Key: ***",
        '  body: {"ref":"a-1","name":"Ada"}',
    ]
    assert blocks[2].splitlines() == ["step each:", "  needs steps.list (for_each)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flow.yaml"]


def test_summary_and_json_logs(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    server = serve(_rows_app([{"id": 1}]))
    write_flow(OUTPUT_FLOW)
    env = {"API": server.url}
    result = cli("run", "flow.yaml", "--summary", "s.json", "--log-format", "json", env=env)
    assert result.code == 0, result.stderr
    summary = summary_of(tmp_path)
    assert set(summary) >= {
        "run_id", "flow", "status", "exit_code", "started_at", "duration_s", "requests",
        "retries", "status_counts", "records", "skipped", "error",
    }  # fmt: skip
    assert summary["flow"] == "outputs"
    assert summary["status"] == "success"
    assert summary["exit_code"] == 0
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", summary["started_at"])
    assert summary["requests"] == 1
    assert summary["retries"] == 0
    assert summary["status_counts"] == {"200": 1}
    assert summary["records"] == {"rows": 1, "quiet": 0}
    assert summary["error"] is None
    for line in result.stderr.splitlines():
        assert isinstance(json.loads(line), dict), line

    result = cli(
        "run", "flow.yaml", "--input", "fail=true", "--summary", "s.json",
        "--log-format", "json", env=env,
    )  # fmt: skip
    assert result.code == 1
    logged = [json.loads(line) for line in result.stderr.splitlines()]
    assert logged
    assert any("boom" in entry["message"] for entry in logged)
    summary = summary_of(tmp_path)
    assert summary["status"] == "failed"
    assert summary["exit_code"] == 1
    error = summary["error"]
    assert (error["step"], error["status"], error["kind"]) == ("boom", 400, "http")
    assert error["method"] == "GET"
    assert error["url"] == f"{server.url}/boom"
    assert summary["status_counts"] == {"200": 1, "400": 1}


def test_timeout_on_slow_server(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.json_response({})

    app, _ = make_app({"/api/slow": slow})
    server = serve(app)
    write_flow(HEADER + "steps:\n  - {id: slow, request: {service: api, path: /slow}}\n")
    result = cli(
        "run", "flow.yaml", "--timeout", "1", "--summary", "s.json", env={"API": server.url}
    )
    assert result.code == 69
    summary = summary_of(tmp_path)
    assert summary["error"]["kind"] == "timeout"
    assert summary["duration_s"] < 4
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_schema_command(cli: Cli) -> None:
    result = cli("schema")
    assert result.code == 0
    schema = json.loads(result.stdout)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert "steps" in schema["properties"]


def test_bad_flow_exit_2_with_location(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    app, _ = make_app()
    server = serve(app)
    write_flow(
        f"""\
version: 1
name: bad
services:
  api: {{base_url: "{server.url}"}}
steps:
  - id: ok
    request: {{service: api, path: /ok}}
  - id: broken
    request:
      service: api
      method: GTE
      path: /x
"""
    )
    result = cli("run", "flow.yaml", "--summary", "s.json")
    assert result.code == 2
    assert re.search(r"flow\.yaml:11:7: steps\[1\]\.request\.method: .*GTE", result.stderr)
    assert server.requests == []
    summary = summary_of(tmp_path)
    assert (summary["status"], summary["exit_code"], summary["requests"]) == ("failed", 2, 0)


def test_missing_secret_exit_2_before_any_request(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    app, _ = make_app()
    server = serve(app)
    write_flow(
        HEADER
        + """\
steps:
  - {id: a, request: {service: api, path: /a}}
  - id: b
    request: {service: api, path: /b, headers: {X-Token: "{{ secrets.NOT_THERE }}"}}
"""
    )
    result = cli("run", "flow.yaml", "--summary", "s.json", env={"API": server.url})
    assert result.code == 2
    assert "NOT_THERE" in result.stderr
    assert server.requests == []
    assert summary_of(tmp_path)["exit_code"] == 2


def test_unknown_event_loop_is_a_usage_error_before_any_request(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    app, _ = make_app()
    server = serve(app)
    write_flow(HEADER + "steps:\n  - {id: a, request: {service: api, path: /a}}\n")
    env = {"API": server.url, "RUNNER_EVENT_LOOP": "trio"}
    result = cli("run", "flow.yaml", "--summary", "s.json", env=env)
    assert result.code == 2
    assert "RUNNER_EVENT_LOOP='trio': expected one of auto, uvloop, asyncio" in result.stderr
    assert server.requests == []
    assert summary_of(tmp_path)["exit_code"] == 2

    result = cli("run", "flow.yaml", env={**env, "RUNNER_EVENT_LOOP": "asyncio"})
    assert result.code == 0, result.stderr
    assert len(server.requests) == 1


# -- the Python API ----------------------------------------------------------------------------


def test_python_api(serve: Serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import runner

    server = serve(_rows_app([{"id": 1}]))
    path = tmp_path / "flow.yaml"
    path.write_text(OUTPUT_FLOW, encoding="utf-8")
    monkeypatch.setenv("API", server.url)
    flow = runner.load_flow(path)
    ok = runner.run_flow(flow, inputs={}, output_dir=str(tmp_path / "a"))
    assert isinstance(ok, runner.RunResult)
    assert (ok.exit_code, ok.status) == (0, "success")
    assert ok.summary["records"] == {"rows": 1, "quiet": 0}
    assert read_jsonl(tmp_path / "a" / "rows.jsonl") == [{"id": 1}]

    failed = runner.run_flow(flow, inputs={"fail": True}, output_dir=str(tmp_path / "b"))
    assert (failed.exit_code, failed.status) == (1, "failed")
    assert failed.summary["error"]["step"] == "boom"
    assert not (tmp_path / "b" / "manifest.json").exists()
