"""The flow JSON Schema: valid 2020-12, shipped with the package, and accepting DESIGN's flows."""

from __future__ import annotations

import json
import pathlib
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from runner.loader import load_text
from runner.validate import flow_schema, validate_document

REPO = Path(__file__).resolve().parent.parent

# DESIGN.md, section "A flow", verbatim.
DESIGN_FLOW = """\
# yaml-language-server: $schema=../schemas/flow.schema.json
version: 1
name: crm-contacts
description: Contacts changed since the last run, with their company.

inputs:                       # JSON Schema of the run inputs; defaults are applied
  type: object
  properties:
    since: {type: string, default: "2024-01-01T00:00:00Z"}

services:                     # named external services, like a service id
  crm:
    base_url: "{{ env.CRM_URL }}"
    auth: {type: bearer, token: "{{ secrets.CRM_TOKEN }}"}
    headers: {Accept: application/json}
    timeout: {connect: 5, read: 30, total: 120}        # seconds
    retry: {max_attempts: 5, initial_delay: 0.5, max_delay: 30}
    rate_limit: {requests: 20, per_seconds: 1}
    max_concurrency: 8

steps:
  - id: contacts
    request:
      service: crm
      path: /v2/contacts
      query: {updated_since: "{{ state.contacts.cursor or inputs.since }}", limit: 100}
    paginate: {type: cursor, cursor: body.meta.next, param: cursor}
    records: body.data
    filter: "status != 'deleted'"
    fields: {id: id, email: "emails[0].value", company_id: company.id, updated_at: updated_at}
    emit: contacts

  - id: companies
    for_each: "steps.contacts.records[].company_id"
    concurrency: 4
    request: {service: crm, path: "/v2/companies/{{ item }}"}
    on_status:
      - {status: 404, action: skip}
    records: body
    fields: {id: id, name: name, position: "{{ item_index }}"}
    emit: companies

outputs:
  contacts:
    primary_key: [id]
    cursor: {field: updated_at, type: datetime}   # the greatest updated_at, after a successful run
    schema: {type: object, required: [id, email]}
"""

# DESIGN.md, section "Steps": the upsert block, in a flow of its own.
UPSERT_FLOW = """\
version: 1
inputs: {type: object, properties: {customers: {type: array}}}
services:
  api: {base_url: "https://api.example.com"}
steps:
  - id: sync
    for_each: inputs.customers
    steps:
      - id: create
        request: {service: api, method: POST, path: /customers, json: "{{ item }}"}
        retry_unsafe: true
        on_status:
          - {status: 409, action: goto, goto: update, set: {id: body.existing_id}}
          - {status: 422, action: stop, emit: rejected, fields: {ref: "{{ item.ref }}", error: "body.errors[0]"}}
          - {status: 2xx, action: end}
        records: body
        fields: {id: id, op: "'created'"}
        emit: upserted
      - id: update
        request: {service: api, method: PUT, path: "/customers/{{ steps.create.vars.id }}", json: "{{ item }}"}
        records: body
        fields: {id: id, op: "'updated'"}
        emit: upserted
"""  # noqa: E501

# DESIGN.md, section "Handling": the example rules, on a step.
HANDLING_FLOW = """\
version: 1
services:
  billing: {base_url: "https://billing.example.com"}
steps:
  - id: each
    for_each: "[`1`, `2`]"
    steps:
      - id: update
        request: {service: billing, path: /x}
      - id: fetch
        request: {service: billing, path: "/invoices/{{ item }}"}
        on_status:
          - status: 404                 # 404, "4xx", [401, 403], "500-599", error
            when: body.code == 'gone'   # optional JMESPath
            action: skip                # ok | skip | stop | retry | fail | goto | end
            message: "{{ url }} is gone"
          - {status: 409, action: goto, goto: update, set: {id: body.existing_id}}
          - {status: 422, action: skip, emit: rejected, fields: {ref: "{{ item.ref }}", error: "body.errors[0]"}}
          - {status: "5xx", action: fail, kind: unavailable, message: "billing is down, try later"}
          - {status: 200, when: "headers.\\"x-ratelimit-remaining\\" == '0'", action: retry, delay: 60}
          - {status: [401, 403], action: fail}
          - {status: "500-599", action: retry, delay: "headers.\\"retry-after\\""}
          - {status: error, action: fail}
"""  # noqa: E501


def problems_of(text: str) -> list[str]:
    return [str(p) for p in validate_document(load_text(text, "flow.yaml"))]


def flow_with_step(step: str, service: str = "") -> str:
    """A flow with one service `api` (extra keys in `service`) and one step."""
    indented = "\n".join("    " + line for line in step.strip().splitlines())
    extra = "\n".join("    " + line for line in service.strip().splitlines())
    return (
        "version: 1\nservices:\n  api:\n    base_url: https://api.example.com\n"
        f"{extra}\nsteps:\n  - id: s\n{indented}\n"
    )


def test_schema_is_valid_2020_12() -> None:
    schema = flow_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)


def test_packaged_schema_is_the_repository_file() -> None:
    on_disk = json.loads((REPO / "schemas" / "flow.schema.json").read_text("utf-8"))
    assert flow_schema() == on_disk


def _is_constraint(where: str) -> bool:
    """Subschemas that constrain an object described elsewhere, not objects of the format."""
    return any(part in where for part in ("/if", "/then", "/dependentSchemas"))


def test_every_format_object_is_closed() -> None:
    """Every object with `properties` rejects unknown keys, except the outer auth and
    paginate switches, whose per-type branches are closed."""
    open_objects: list[str] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if "properties" in node and node.get("additionalProperties") is not False:
                open_objects.append(where)
            for key, value in node.items():
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{where}/{index}")

    walk(flow_schema(), "#")
    assert [w for w in open_objects if not _is_constraint(w)] == [
        "#/$defs/auth",
        "#/$defs/paginate",
    ]


def _resolve(ref: str) -> dict[str, Any]:
    """The schema a local `$ref` (a JSON pointer into the flow schema) points to."""
    node: Any = flow_schema()
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    assert isinstance(node, dict)
    if "$ref" in node:  # a reference to a reference: its own keys win
        return {**_resolve(node["$ref"]), **node}
    return node


def test_every_property_has_a_title_and_description() -> None:
    missing: list[str] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for name, prop in node.get("properties", {}).items():
                if _is_constraint(where):
                    continue
                target = prop
                if "$ref" in prop:
                    target = {**_resolve(prop["$ref"]), **prop}
                if "description" not in target or "title" not in target:
                    missing.append(f"{where}/properties/{name}")
            for key, value in node.items():
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{where}/{index}")

    walk(flow_schema(), "#")
    assert missing == []


@pytest.mark.parametrize("text", [DESIGN_FLOW, UPSERT_FLOW, HANDLING_FLOW])
def test_design_examples_validate(text: str) -> None:
    assert problems_of(text) == []


AUTHS = {
    "basic": '{type: basic, username: "{{ env.USER }}", password: "{{ secrets.PASS }}"}',
    "basic_no_password": "{type: basic, username: me}",
    "bearer": '{type: bearer, token: "{{ secrets.TOKEN }}"}',
    "api_key": '{type: api_key, in: header, name: X-API-Key, value: "{{ secrets.KEY }}"}',
    "api_key_query": "{type: api_key, in: query, name: key, value: k}",
    "api_key_cookie_default_in": "{type: api_key, name: key, value: k}",
    "client_credentials": (
        "{type: oauth2_client_credentials, token_url: https://id.example.com/token,"
        ' client_id: abc, client_secret: "{{ secrets.CS }}", scope: "read write",'
        " audience: https://api.example.com, params: {resource: x}, client_auth: body}"
    ),
    "client_credentials_scope_list": (
        "{type: oauth2_client_credentials, token_url: https://id.example.com/token,"
        " client_id: abc, client_secret: s, scope: [read, write], client_auth: basic}"
    ),
    "refresh_token": (
        "{type: oauth2_refresh_token, token_url: https://id.example.com/token,"
        ' client_id: abc, client_secret: s, refresh_token: "{{ secrets.RT }}"}'
    ),
    "refresh_token_public_client": (
        "{type: oauth2_refresh_token, token_url: https://id.example.com/token,"
        " client_id: abc, refresh_token: rt, scope: offline_access}"
    ),
    "session": (
        '{type: session, request: {method: POST, path: /login, json: {user: "{{ env.U }}"}},'
        ' token: body.token, in: header, name: Authorization, prefix: "Bearer "}'
    ),
    "session_form_cookie": (
        "{type: session, request: {method: POST, url: https://login.example.com/, "
        'form: {u: a, p: b}, headers: {X-A: b}, query: {v: 1}}, token: headers."x-session",'
        " in: cookie, name: sid}"
    ),
    "session_form_default_name": (
        "{type: session, request: {path: /login, form: {user: u}}, token: body.token}"
    ),
}


@pytest.mark.parametrize("auth", AUTHS.values(), ids=AUTHS.keys())
def test_each_auth_type_validates_on_service_and_step(auth: str) -> None:
    on_service = flow_with_step("request: {service: api, path: /x}", service=f"auth: {auth}")
    assert problems_of(on_service) == []
    on_step = flow_with_step(f"request: {{service: api, path: /x}}\nauth: {auth}")
    assert problems_of(on_step) == []


def test_step_auth_none_validates() -> None:
    assert problems_of(flow_with_step("request: {service: api, path: /x}\nauth: none")) == []


PAGINATORS = {
    "page_number": (
        "{type: page_number, param: p, start: 0, size_param: per_page, size: 50,"
        " total_pages: body.pages, in: query, max_pages: 10, stop_when: 'length(body) < `50`'}"
    ),
    "page_number_defaults": "{type: page_number}",
    "offset": (
        "{type: offset, param: skip, limit_param: take, limit: 100, total: body.total, in: body}"
    ),
    "offset_header": "{type: offset, in: header, param: X-Offset}",
    "cursor": '{type: cursor, cursor: headers."x-next", param: after, in: none}',
    "next_url": "{type: next_url, next_url: body.links.next, max_pages: 3}",
    "link_header": "{type: link_header, stop_when: body.done}",
}


@pytest.mark.parametrize("paginate", PAGINATORS.values(), ids=PAGINATORS.keys())
def test_each_paginator_validates(paginate: str) -> None:
    step = f"request: {{service: api, path: /x}}\npaginate: {paginate}\nrecords: body.items"
    assert problems_of(flow_with_step(step)) == []


def test_every_step_key_together_validates() -> None:
    step = """
when: "inputs.enabled"
for_each: inputs.ids
concurrency: 2
max_items: 10
max_visits: 3
request:
  service: api
  method: PATCH
  path: "/things/{{ item }}"
  query: {a: null, b: true, c: [1, 2], d: 1.5}
  headers: {X-Version: 2, X-Flag: true, Idempotency-Key: "{{ uuid4() }}"}
  multipart:
    note: "{{ item }}"
    upload: {file: data/upload.csv, filename: upload.csv, content_type: text/csv}
auth: {type: bearer, token: t}
retry: {max_attempts: 1, initial_delay: 0, multiplier: 1.5, max_delay: 2, max_retry_after: 10}
timeout: {connect: 1, read: 2.5, total: 10}
retry_unsafe: true
poll: {until: "body.state == 'done'", fail_when: "body.state == 'failed'", interval: 0.5,
       timeout: 60, message: "job {{ body.id }} failed"}
response:
  format: xml
  max_body_bytes: 1048576
  xml: {force_list: [item], namespaces: keep, attr_prefix: "_", text_key: value}
  csv: {delimiter: ";", encoding: latin-1}
on_status:
  - {status: 404, action: skip, message: gone}
  - {status: 503, action: retry, delay: 1.5}
  - {status: "4XX", action: stop}
  - {status: "200", action: ok}
  - {status: 201, action: end, set: {created: body.id}, emit: audit}
expect:
  - {that: "body.ok", message: "not ok: {{ body }}"}
  - {that: "status == `200`"}
records: body.items
filter: "active"
fields: {id: id}
emit: things
set: {count: "length(body.items)", token: {value: body.token, secret: true}}
"""
    service = """
headers: {Accept: application/json}
timeout: {connect: 5}
retry: {max_attempts: 3}
rate_limit: {requests: 5, per_seconds: 0.5}
max_concurrency: 2
tls: {verify: false, ca_file: ca.pem, client_cert: cert.pem, client_key: key.pem}
cookies: true
allow_insecure_http: false
allow_cross_host: true
"""
    flow = flow_with_step(step, service=service) + (
        "outputs:\n  things: {primary_key: [id], cursor: id, on_invalid: skip}\n"
    )
    assert problems_of(flow) == []


@pytest.mark.parametrize(
    "request_", ["{url: https://x.example.com/a}", "{service: api, url: https://x.example.com/a}",
                 "{service: api, path: /a, method: POST, body: 'x', content_type: text/csv}",
                 "{service: api, path: /a, method: POST, body_file: body.xml}",
                 "{service: api, path: /a, method: POST, form: {a: 1, b: [x, y]}}"],
)  # fmt: skip
def test_request_shapes_validate(
    request_: str, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # body_file is read relative to the flow file: give it one.
    (tmp_path / "body.xml").write_text("<a>{{ inputs }}</a>")
    monkeypatch.chdir(tmp_path)
    assert problems_of(flow_with_step(f"request: {request_}")) == []


def test_missing_body_file_is_located(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    step = "request: {service: api, path: /a, method: POST, body_file: missing.xml}"
    [problem] = problems_of(flow_with_step(step))
    assert "steps[0].request.body_file: cannot read body_file 'missing.xml'" in problem


def test_nested_blocks_validate() -> None:
    step = """
for_each: inputs.accounts
steps:
  - id: inner
    for_each: item.users
    steps:
      - id: leaf
        request: {service: api, path: /u}
"""
    assert problems_of(flow_with_step(step)) == []
