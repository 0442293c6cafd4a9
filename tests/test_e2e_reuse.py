"""End-to-end: `include`, `defaults`, `definitions` and `use` through the real CLI, against a
local aiohttp app; problems in merged keys located where they were written."""

from __future__ import annotations

import json
from pathlib import Path

from aiohttp import web

from tests.conftest import Cli, Serve, read_jsonl


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def _app() -> web.Application:
    async def items(request: web.Request) -> web.Response:
        return web.json_response(
            {"data": [{"id": 1, "kind": request.match_info["kind"]}, {"id": 2, "kind": "x"}]}
        )

    app = web.Application()
    app.router.add_get("/{kind}", items)
    return app


SERVICES = """\
services:
  api:
    base_url: "{{ env.API }}"
    headers: {X-Team: data}
"""

DEFAULTS = """\
include: [services.yaml]
defaults:
  request:
    service: api
    query: {limit: 10, region: eu}
    headers: {X-From: defaults}
  retry: {max_attempts: 2}
definitions:
  listing:
    request:
      path: /orders
      query: {region: us, tags: [a]}
      headers: {X-From: definition}
    records: body.data
"""


def test_include_defaults_and_use_merge_in_order(serve: Serve, cli: Cli, tmp_path: Path) -> None:
    server = serve(_app())
    _write(
        tmp_path,
        {
            "common/services.yaml": SERVICES,
            "common/defaults.yaml": DEFAULTS,
            "flows/orders.yaml": """\
version: 1
include: [../common/defaults.yaml]
steps:
  - id: orders
    use: listing
    request: {query: {tags: [b, c]}, headers: {X-Own: "yes"}}
    emit: orders
  - id: refunds
    use: listing
    request: {path: /refunds, query: {region: ap}}
    fields: {id: id}
    emit: refunds
  - id: plain
    request: {path: /plain}
    records: body.data
    emit: plain
""",
        },
    )
    result = cli("run", "flows/orders.yaml", "--output-dir", "out", env={"API": server.url})
    assert result.code == 0, result.stderr
    by_path = {r.path: r for r in server.requests}
    orders = by_path["/orders"]
    # Mappings merge key by key (defaults < definition < step), lists are replaced.
    assert orders.query == {"limit": ["10"], "region": ["us"], "tags": ["b", "c"]}
    assert orders.headers["X-From"] == "definition"
    assert orders.headers["X-Own"] == "yes"
    assert orders.headers["X-Team"] == "data"  # the included service
    assert by_path["/refunds"].query == {"limit": ["10"], "region": ["ap"], "tags": ["a"]}
    assert by_path["/plain"].query == {"limit": ["10"], "region": ["eu"]}
    assert by_path["/plain"].headers["X-From"] == "defaults"
    assert read_jsonl(tmp_path / "out" / "orders.jsonl")[0] == {"id": 1, "kind": "orders"}
    assert read_jsonl(tmp_path / "out" / "refunds.jsonl") == [{"id": 1}, {"id": 2}]


def test_defaults_reach_steps_in_blocks_but_not_the_block(
    serve: Serve, cli: Cli, tmp_path: Path
) -> None:
    server = serve(_app())
    _write(
        tmp_path,
        {
            "flow.yaml": """\
version: 1
services:
  api: {base_url: "{{ env.API }}"}
defaults:
  request: {service: api, headers: {X-Default: "1"}}
  retry: {max_attempts: 1}
steps:
  - id: each
    for_each: "[`1`, `2`]"
    steps:
      - id: inner
        request: {path: "/n{{ item }}"}
""",
        },
    )
    assert cli("validate", "flow.yaml").code == 0
    result = cli("run", "flow.yaml", "--output-dir", "out", env={"API": server.url})
    assert result.code == 0, result.stderr
    assert sorted(server.paths()) == ["/n1", "/n2"]
    assert all(r.headers["X-Default"] == "1" for r in server.requests)


def test_dry_run_shows_the_merged_steps(serve: Serve, cli: Cli, tmp_path: Path) -> None:
    server = serve(_app())
    _write(
        tmp_path,
        {
            "common/services.yaml": SERVICES,
            "common/defaults.yaml": DEFAULTS,
            "flow.yaml": """\
version: 1
include: [common/defaults.yaml]
steps:
  - id: orders
    use: listing
""",
        },
    )
    result = cli("run", "flow.yaml", "--dry-run", env={"API": server.url})
    assert result.code == 0, result.stderr
    assert f"GET {server.url}/orders?limit=10&region=us&tags=a" in result.stdout
    assert "X-From: definition" in result.stdout
    assert server.requests == []


def test_problems_in_merged_keys_are_located_where_written(cli: Cli, tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "common/services.yaml": SERVICES,
            "common/defaults.yaml": """\
include: [services.yaml]
defaults:
  request: {service: api}
  retry:
    max_attempts: many
definitions:
  listing:
    request: {path: /orders, headers: {X-Before: "{{ steps.before.vars.x }}"}}
    records: body.data
""",
            "flows/a.yaml": """\
version: 1
include: [../common/defaults.yaml]
steps:
  - id: orders
    use: listing
  - id: again
    use: listing
""",
            "flows/b.yaml": """\
version: 1
include: [../common/defaults.yaml]
steps:
  - id: orders
    use: listng
""",
        },
    )
    result = cli("validate", "flows")
    assert result.code == 2
    lines = result.stderr.splitlines()
    # A problem of the included file itself: once, whichever flows include it.
    intrinsic = [line for line in lines if "max_attempts" in line]
    assert intrinsic == [
        "common/defaults.yaml:5:5: defaults.retry.max_attempts: expected an integer, "
        "got string 'many'"
    ]
    # A problem that depends on the flow: at the included line, naming the first step.
    dependent = [line for line in lines if "steps.before" in line]
    assert dependent == [
        "common/defaults.yaml:8:51: definitions.listing.request.headers.X-Before: steps.before: "
        "no step has the id 'before' (in step orders of flows/a.yaml)"
    ]
    assert "flows/b.yaml:5:5: steps[0].use: unknown definition 'listng' (did you mean " in (
        result.stderr
    )
    assert len(lines) == len(set(lines))


def test_a_wrong_type_from_defaults_names_the_step(cli: Cli, tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "flows/orders.yaml": """\
version: 1
services:
  api: {base_url: "http://127.0.0.1:1"}
defaults:
  request: {service: apx}
steps:
  - id: orders
    request: {path: /orders}
  - id: users
    request: {path: /users}
""",
        },
    )
    result = cli("validate", "flows/orders.yaml")
    assert result.code == 2
    assert result.stderr.splitlines()[0] == (
        "flows/orders.yaml:5:13: defaults.request.service: unknown service 'apx' "
        "(did you mean 'api'?) (in step orders of flows/orders.yaml)"
    )
    problems = [line for line in result.stderr.splitlines() if not line.startswith("checked ")]
    assert len(problems) == 1  # once per flow, not once per step


def test_include_rules(cli: Cli, tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "a.yaml": "include: [b.yaml]\ndefaults: {retry: {max_attempts: 2}}\n",
            "b.yaml": "include: [a.yaml]\n",
            "steps.yaml": "version: 1\nsteps: []\n",
            "s1.yaml": "services:\n  api: {base_url: 'http://127.0.0.1:1'}\n",
            "s2.yaml": "services:\n  api: {base_url: 'http://127.0.0.1:2'}\n",
            "cycle.yaml": """\
version: 1
include: [a.yaml]
steps:
  - {id: one, request: {url: "http://127.0.0.1:1/x"}}
""",
            "wrong.yaml": """\
version: 1
include: [steps.yaml, missing.yaml]
steps:
  - {id: one, request: {url: "http://127.0.0.1:1/x"}}
""",
            "twice.yaml": """\
version: 1
include: [s1.yaml, s2.yaml]
services:
  other: {base_url: "http://127.0.0.1:3"}
steps:
  - {id: one, request: {service: api, path: /x}}
""",
            "mine.yaml": """\
version: 1
include: [s1.yaml]
services:
  api: {base_url: "http://127.0.0.1:3"}
steps:
  - {id: one, request: {service: api, path: /x}}
""",
            "merge.yaml": """\
version: 1
definitions:
  base: &base {request: {url: "http://127.0.0.1:1/x"}}
steps:
  - id: one
    <<: *base
""",
        },
    )
    cycle = cli("validate", "cycle.yaml")
    assert cycle.code == 2
    assert "b.yaml:1:11: include[0]: include cycle: a.yaml -> b.yaml -> a.yaml" in cycle.stderr

    wrong = cli("validate", "wrong.yaml")
    assert wrong.code == 2
    assert "steps.yaml:1:1: version: unknown key 'version'; expected one of: services," in (
        wrong.stderr
    )
    assert "steps.yaml:2:1: steps: unknown key 'steps'" in wrong.stderr
    assert "wrong.yaml:2:23: include[1]: no such file: missing.yaml" in wrong.stderr

    twice = cli("validate", "twice.yaml")
    assert twice.code == 2
    assert (
        "s2.yaml:2:3: services.api: service 'api' is defined twice: here and in s1.yaml:2:3"
        in twice.stderr
    )
    mine = cli("validate", "mine.yaml")
    assert mine.code == 2
    assert (
        "mine.yaml:4:3: services.api: service 'api' is defined twice: here and in s1.yaml:2:3"
        in mine.stderr
    )
    merge = cli("validate", "merge.yaml")
    assert merge.code == 2
    assert "merge.yaml:6:5: steps[0]: merge keys (<<) are not supported" in merge.stderr


def test_schema_command_knows_the_new_keys(cli: Cli) -> None:
    result = cli("schema")
    assert result.code == 0
    schema = json.loads(result.stdout)
    assert {"include", "defaults", "definitions"} <= set(schema["properties"])
    assert "use" in schema["$defs"]["step"]["properties"]
