"""End to end: compressed payloads, conditions that meet nulls, arithmetic and date windows,
through the real CLI against a real local server."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from aiohttp import web

from tests.conftest import Cli, Serve, WriteFlow, app_with, read_jsonl, summary_of

HEAD = """\
version: 1
name: reshape
services:
  api:
    base_url: "{{ env.API }}"
    retry: {max_attempts: 1}
"""


def test_gzip_payloads_by_url_suffix_and_by_content_type(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    csv = b"id,name\n1,ann\n2,bob\n"
    ndjson = b'{"id": 3}\n{"id": 4}\n'

    async def export(_: web.Request) -> web.Response:
        # What object stores send for a .csv.gz: no Content-Encoding, a generic type.
        return web.Response(body=gzip.compress(csv), content_type="application/octet-stream")

    async def events(_: web.Request) -> web.Response:
        return web.Response(body=gzip.compress(ndjson), content_type="application/gzip")

    async def plain(_: web.Request) -> web.Response:
        return web.Response(body=gzip.compress(csv), content_type="application/gzip")

    server = serve(
        app_with(
            ("GET", "/exports/contacts.csv.gz", export),
            ("GET", "/events", events),
            ("GET", "/raw.csv.gz", plain),
        )
    )
    write_flow(
        HEAD
        + """
steps:
  - id: contacts
    request: {service: api, path: /exports/contacts.csv.gz, query: {sig: "a.json.gz"}}
    records: body
    emit: contacts
  - id: events
    request: {service: api, path: /events}
    response: {format: ndjson}
    records: body
    emit: events
  - id: kept
    request: {service: api, path: /raw.csv.gz}
    response: {compression: none}
    records: "{n: length(body)}"
    emit: kept
"""
    )
    result = cli("run", "flow.yaml", "--summary", "s.json", env={"API": server.url})
    assert result.code == 0, result.stderr
    assert read_jsonl(tmp_path / "out" / "contacts.jsonl") == [
        {"id": "1", "name": "ann"},
        {"id": "2", "name": "bob"},
    ]
    assert read_jsonl(tmp_path / "out" / "events.jsonl") == [{"id": 3}, {"id": 4}]
    # none: the gzip bytes are kept; under auto, application/gzip is then text.
    [kept] = read_jsonl(tmp_path / "out" / "kept.jsonl")
    assert kept["n"] > 0


def test_a_gzip_payload_that_is_cut_fails_with_its_url(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    body = gzip.compress(b"id\n" + b"1\n" * 5000)

    async def export(_: web.Request) -> web.Response:
        return web.Response(body=body[: len(body) // 2], content_type="application/gzip")

    server = serve(app_with(("GET", "/e.csv.gz", export)))
    write_flow(
        HEAD
        + "steps:\n  - {id: e, request: {service: api, path: /e.csv.gz}, records: body, emit: e}\n"
    )
    result = cli("run", "flow.yaml", "--summary", "s.json", env={"API": server.url})
    assert result.code == 1
    assert "gzip payload ends before its end marker" in result.stderr
    assert "/e.csv.gz" in result.stderr
    assert summary_of(tmp_path)["error"]["kind"] == "decode"


def test_null_safe_rules_and_arithmetic_in_pagination(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    async def items(request: web.Request) -> web.Response:
        offset = int(request.query.get("offset", "0"))
        if offset >= 6:
            # A body without `message`: the rule's contains() meets null and does not match.
            return web.json_response({"items": [], "total": 6}, status=200)
        return web.json_response(
            {"items": [{"n": offset + i} for i in range(3)], "total": 6, "message": None}
        )

    server = serve(app_with(("GET", "/items", items)))
    write_flow(
        HEAD
        + """
steps:
  - id: items
    request: {service: api, path: /items}
    paginate:
      {type: offset, limit: 3, limit_param: size, stop_when: "add(page.offset, `3`) >= body.total"}
    on_status:
      - {status: 200, when: "contains(body.message, 'quota')", action: fail, message: quota}
    records: body.items
    fields: {n: n, half: "divide(n, `2`)", tripled: "multiply(n, `3`)"}
    emit: items
"""
    )
    result = cli("run", "flow.yaml", env={"API": server.url})
    assert result.code == 0, result.stderr
    rows = read_jsonl(tmp_path / "out" / "items.jsonl")
    assert rows == [
        {"n": n, "half": n / 2 if n % 2 else n // 2, "tripled": 3 * n} for n in range(6)
    ]
    assert [r.query.get("offset") for r in server.requests] == [["0"], ["3"]]


def test_date_windows_drive_for_each_with_concurrency(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    async def report(request: web.Request) -> web.Response:
        return web.json_response({"from": request.query["from"], "to": request.query["to"]})

    server = serve(app_with(("GET", "/reports", report)))
    write_flow(
        HEAD
        + """
inputs:
  type: object
  properties:
    start: {type: string, default: "2024-01-31"}
steps:
  - id: reports
    for_each: "{{ windows(inputs.start, '2024-05-15', 'P1M') }}"
    concurrency: 3
    request: {service: api, path: /reports, query: {from: "{{ item.start }}", to: "{{ item.end }}"}}
    records: body
    emit: reports
"""
    )
    result = cli("run", "flow.yaml", env={"API": server.url})
    assert result.code == 0, result.stderr
    # Records keep the windows' order whatever the concurrency.
    assert read_jsonl(tmp_path / "out" / "reports.jsonl") == [
        {"from": "2024-01-31", "to": "2024-02-29"},
        {"from": "2024-02-29", "to": "2024-03-31"},
        {"from": "2024-03-31", "to": "2024-04-30"},
        {"from": "2024-04-30", "to": "2024-05-15"},
    ]
    json.dumps(rows := [r.query for r in server.requests])
    assert len(rows) == 4


def test_validate_warns_on_a_negated_path(cli: Cli, write_flow: WriteFlow) -> None:
    write_flow(
        HEAD
        + """
steps:
  - id: items
    request: {service: api, path: /items}
    paginate: {type: cursor, cursor: body.next, stop_when: "!body.has_more"}
    records: body.items
    emit: items
"""
    )
    result = cli("validate", "flow.yaml")
    assert result.code == 0, result.stderr
    assert (
        "flow.yaml:11:61: steps[0].paginate.stop_when: warning: '!body.has_more' parses as "
        "'(!body).has_more', which is always null: write '!(body.has_more)'"
    ) in result.stderr
    assert cli("validate", "--strict", "flow.yaml").code == 2


def test_jinja_conditions_read_the_record_and_the_scope(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    posts = [
        {"id": 1, "published": "2024-05-01T10:00:00Z", "tags": ["a"]},
        {"id": 2, "published": "2024-05-02T10:00:00Z", "tags": None},
        {"id": 3, "published": "2024-05-03T10:00:00Z", "tags": ["b"]},
    ]

    async def feed(_: web.Request) -> web.Response:
        return web.json_response({"posts": posts, "more": False})

    server = serve(app_with(("GET", "/feed", feed)))
    write_flow(
        HEAD
        + """
inputs:
  type: object
  properties:
    since: {type: string, default: "2024-05-01T12:00:00Z"}
steps:
  - id: feed
    when: "{{ inputs.since is not none }}"
    request: {service: api, path: /feed}
    expect:
      - {that: "{{ body.posts | length > 0 }}", message: "no posts"}
    records: body.posts
    filter: "{{ (record.published | to_epoch) > (inputs.since | to_epoch) }}"
    fields: {id: id, tagged: "contains(tags, 'b')"}
    emit: posts
"""
    )
    result = cli("run", "flow.yaml", env={"API": server.url})
    assert result.code == 1, result.stderr
    assert "run failed in step 'feed'" in result.stderr
    assert "In function contains(), invalid type for value: None" in result.stderr
    # `contains` as a value (not a condition) on a null still fails: null-safety is for
    # conditions. The same flow with the check as a filter condition runs.
    flow = (
        (tmp_path / "flow.yaml")
        .read_text()
        .replace("tagged: \"contains(tags, 'b')\"", "tagged: \"tags && contains(tags, 'b')\"")
    )
    write_flow(flow)
    result = cli("run", "flow.yaml", env={"API": server.url})
    assert result.code == 0, result.stderr
    assert read_jsonl(tmp_path / "out" / "posts.jsonl") == [
        {"id": 2, "tagged": None},
        {"id": 3, "tagged": True},
    ]


def test_a_jinja_condition_is_one_expression(cli: Cli, write_flow: WriteFlow) -> None:
    write_flow(
        HEAD
        + """
steps:
  - id: items
    request: {service: api, path: /items}
    records: body
    filter: "x {{ record.a }}"
    emit: items
"""
    )
    result = cli("validate", "flow.yaml")
    assert result.code == 2
    assert (
        "flow.yaml:12:14: steps[0].filter: a Jinja condition is exactly one {{ expression }}, "
        "without text around it"
    ) in result.stderr


def test_reshaping_keeps_the_record_in_the_mapping_order(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    async def orders(request: web.Request) -> web.Response:
        account = request.match_info["account"]
        return web.json_response(
            {
                "orders": [
                    {
                        "OrderID": 1,
                        "HTTPStatus": "ok",
                        "Shipping": {"Zip": "01234", "City": "Oslo"},
                        "Billing": {"Zip": "99999", "City": "Bergen"},
                        "internal": {"a": 1, "b": 2},
                        "account": account,
                    },
                    "not-an-object",
                ]
            }
        )

    server = serve(app_with(("GET", "/accounts/{account}/orders", orders)))
    write_flow(
        HEAD
        + """
steps:
  - id: orders
    for_each: "['acme']"
    request: {service: api, path: "/accounts/{{ item }}/orders"}
    records: body.orders
    add_fields:
      account_id: "{{ item | upper }}"
      meta.source: "'api'"
      meta.page: "{{ page.number }}"
      total: "OrderID && multiply(OrderID, `10`)"
    drop_fields: [internal.a, "*.Zip", account]
    rename_keys: snake
    emit: orders
  - id: projected
    request: {service: api, path: "/accounts/x/orders"}
    records: "body.orders[?OrderID]"
    fields: {id: OrderID, city: Shipping.City}
    add_fields: {kind: "'order'", id: "add(id, `100`)"}
    rename_keys: {city: town}
    emit: projected
"""
    )
    result = cli("run", "flow.yaml", env={"API": server.url})
    assert result.code == 0, result.stderr
    rows = read_jsonl(tmp_path / "out" / "orders.jsonl")
    assert rows == [
        {
            "order_id": 1,
            "http_status": "ok",
            "shipping": {"City": "Oslo"},
            "billing": {"City": "Bergen"},
            "internal": {"b": 2},
            "account_id": "ACME",
            "meta": {"source": "api", "page": 1},
            "total": 10,
        },
        {
            "value": "not-an-object",
            "account_id": "ACME",
            "meta": {"source": "api", "page": 1},
            "total": None,
        },
    ]
    assert read_jsonl(tmp_path / "out" / "projected.jsonl") == [
        {"id": 101, "town": "Oslo", "kind": "order"}
    ]


def test_a_dotted_add_through_a_value_and_a_rename_collision_fail_at_their_key(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    async def items(_: web.Request) -> web.Response:
        return web.json_response([{"id": 1, "meta": "text", "Name": "a", "name": "b"}])

    server = serve(app_with(("GET", "/items", items)))
    write_flow(
        HEAD
        + """
steps:
  - id: items
    request: {service: api, path: /items}
    records: body
    add_fields: {meta.source: "'api'"}
    emit: items
"""
    )
    result = cli("run", "flow.yaml", "--summary", "s.json", env={"API": server.url})
    assert result.code == 1
    assert "run failed in step 'items'" in result.stderr
    assert "add_fields.meta.source: 'meta' is a string, not an object" in result.stderr
    write_flow(
        HEAD
        + """
steps:
  - id: items
    request: {service: api, path: /items}
    records: body
    rename_keys: lower
    emit: items
"""
    )
    result = cli("run", "flow.yaml", env={"API": server.url})
    assert result.code == 1
    assert "rename_keys: 'Name' and 'name' are both renamed to 'name'" in result.stderr
