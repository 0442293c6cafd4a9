"""End-to-end: auth alternatives chosen once per run (`when` on inputs, env and
`has_secret`), and one service sharing another's auth (`auth: {use: S}`) against a local
OAuth server that rotates refresh tokens and refuses a spent one with invalid_grant."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import Cli, Serve, WriteFlow, read_jsonl
from tests.test_e2e_auth import API_KEY, BEARER, CLIENT_SECRET, Api, api_app

CHOICE = """\
version: 1
inputs:
  type: object
  properties: {mode: {type: string, default: auto}}
services:
  api:
    base_url: "{{ env.API }}"
    auth:
      - when: "inputs.mode == 'bearer'"
        type: bearer
        token: "{{ secrets.BEARER_TOKEN }}"
      - when: "has_secret('CS')"
        type: oauth2_client_credentials
        token_url: "{{ env.API }}/oauth/token"
        client_id: cid
        client_secret: "{{ secrets.CS }}"
      - when: "{{ (env.USE_KEY | default('')) == 'yes' }}"
        type: api_key
        name: X-API-Key
        value: "{{ secrets.KEY }}"
steps:
  - id: get
    request: {service: api, path: /static/KIND}
    records: body
    emit: rows
"""


def test_the_first_alternative_whose_when_holds_is_used(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    api = Api()
    server = serve(api_app(api))
    write_flow(CHOICE.replace("KIND", "header"), "key.yaml")
    write_flow(CHOICE.replace("KIND", "bearer"), "bearer.yaml")
    write_flow(CHOICE.replace("/static/KIND", "/data/1"), "oauth.yaml")
    assert cli("validate", "key.yaml").code == 0

    # Only KEY is set: the OAuth and bearer secrets are not required.
    env = {"API": server.url, "KEY": API_KEY, "USE_KEY": "yes"}
    result = cli("run", "key.yaml", "--output-dir", "out1", env=env)
    assert result.code == 0, result.stderr
    assert read_jsonl(tmp_path / "out1" / "rows.jsonl") == [{"kind": "header"}]
    assert api.token_forms == []

    # An input chooses the first alternative; its secret is then required, and used.
    result = cli("run", "bearer.yaml", "--input", "mode=bearer", "--output-dir", "o", env=env)
    assert result.code == 2
    assert "missing secret BEARER_TOKEN" in result.stderr
    env_bearer = {**env, "BEARER_TOKEN": BEARER}
    result = cli(
        "run", "bearer.yaml", "--input", "mode=bearer", "--output-dir", "o", env=env_bearer
    )
    assert result.code == 0, result.stderr

    # A secret that exists chooses OAuth, before the api_key alternative.
    result = cli("run", "oauth.yaml", "--output-dir", "out2", env={**env, "CS": CLIENT_SECRET})
    assert result.code == 0, result.stderr
    assert len(api.token_forms) == 1
    assert read_jsonl(tmp_path / "out2" / "rows.jsonl")[0]["token"].startswith("at-")

    # None holds: exit 2 before any request.
    before = len(server.requests)
    result = cli("run", "key.yaml", "--output-dir", "out3", env={"API": server.url})
    assert result.code == 2
    assert "service 'api': no auth alternative applies" in result.stderr
    assert len(server.requests) == before
    # A `when` that fails to evaluate: exit 2, naming the service and the alternative.
    write_flow(CHOICE.replace("(env.USE_KEY | default(''))", "env.USE_KEY"), "strict.yaml")
    result = cli("run", "strict.yaml", "--output-dir", "out4", env={"API": server.url})
    assert result.code == 2
    assert "service 'api': auth[2].when: template error" in result.stderr
    assert len(server.requests) == before


def test_dry_run_shows_the_chosen_alternative_only(
    serve: Serve, cli: Cli, write_flow: WriteFlow
) -> None:
    server = serve(api_app(Api()))
    write_flow(CHOICE.replace("KIND", "header"))
    result = cli("run", "flow.yaml", "--dry-run", env={"API": server.url, "USE_KEY": "yes"})
    assert result.code == 0, result.stderr
    assert "X-API-Key: ***" in result.stdout
    assert "oauth2" not in result.stdout and "Bearer" not in result.stdout
    assert server.requests == []


def test_validate_checks_every_alternative(cli: Cli, write_flow: WriteFlow) -> None:
    write_flow(
        """\
version: 1
services:
  api:
    base_url: "http://127.0.0.1:1"
    auth:
      - {type: bearer, token: "{{ secrets.A }}"}
      - when: "steps.get.vars.x"
        type: bearer
        token: "{{ secrets.B | nosuchfilter }}"
      - {when: "has_secret(`1`, `2`)", type: basic, username: u}
  other:
    base_url: "http://127.0.0.1:2"
    auth: {when: "env.X", type: bearer, token: t}
  third:
    base_url: "http://127.0.0.1:3"
    auth: {use: nobody}
steps:
  - id: get
    request: {service: api, path: /x}
"""
    )
    result = cli("validate", "flow.yaml")
    assert result.code == 2
    out = result.stderr
    assert "flow.yaml:6:9: services.api.auth[0]: an alternative without 'when' is always" in out
    assert "services.api.auth[1].when: an auth alternative's when reads inputs, env" in out
    assert "services.api.auth[1].token:" in out and "nosuchfilter" in out
    assert "services.api.auth[2].when: JMESPath: has_secret() takes 1 argument, got 2" in out
    assert "flow.yaml:13:12: services.other.auth.when: 'when' belongs to an entry" in out
    assert "flow.yaml:16:12: services.third.auth.use: unknown service 'nobody'" in out


REFRESH = (
    '{type: oauth2_refresh_token, token_url: "{{ env.API }}/oauth/token", client_id: cid, '
    'client_secret: "{{ secrets.CS }}", refresh_token: "{{ secrets.RT }}"}'
)

SHARED = """\
version: 1
services:
  harvest:
    base_url: "{{ env.API }}"
    auth: REFRESH
  forecast:
    base_url: "{{ env.API2 }}"
    auth: SECOND
steps:
  - id: a
    for_each: "[`1`, `2`, `3`, `4`]"
    concurrency: 4
    request: {service: harvest, path: "/data/{{ item }}"}
    records: body
    emit: harvest
  - id: b
    for_each: "[`5`, `6`, `7`, `8`]"
    concurrency: 4
    request: {service: forecast, path: "/data/{{ item }}"}
    records: body
    emit: forecast
"""


def test_two_services_share_one_rotating_refresh_token(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    api = Api()
    # Two origins that trust the same OAuth server's tokens, like two products of one vendor.
    first = serve(api_app(api))
    second = serve(api_app(api))
    env = {"API": first.url, "API2": second.url, "CS": CLIENT_SECRET, "RT": "rt-0"}

    # Each service with its own copy of the refresh token: the second spends a token the
    # first has already rotated, and the server refuses it.
    write_flow(SHARED.replace("REFRESH", REFRESH).replace("SECOND", REFRESH), "apart.yaml")
    result = cli("run", "apart.yaml", "--state", "apart.json", env=env)
    assert result.code == 1
    assert "invalid_grant" in result.stderr

    api.refresh_tokens = {"rt-0"}
    api.token_forms.clear()
    write_flow(
        SHARED.replace("REFRESH", REFRESH).replace("SECOND", "{use: harvest}"), "shared.yaml"
    )
    assert cli("validate", "shared.yaml").code == 0
    for run in range(2):
        result = cli(
            "run", "shared.yaml", "--state", "state.json", "--output-dir", f"o{run}", env=env
        )
        assert result.code == 0, result.stderr
        # One refresh per run, for both services: the token is cached and shared.
        assert len(api.token_forms) == run + 1
        rows = read_jsonl(tmp_path / f"o{run}" / "harvest.jsonl")
        rows += read_jsonl(tmp_path / f"o{run}" / "forecast.jsonl")
        assert len({row["token"] for row in rows}) == 1
        assert {r.path for r in second.requests} >= {"/data/5", "/data/8"}
        assert all(r.path != "/oauth/token" for r in second.requests)
        # One rotated refresh token, stored once, under the service that owns the auth.
        state = json.loads((tmp_path / "state.json").read_text())
        (current,) = api.refresh_tokens
        assert state["auth"] == {"harvest": {"refresh_token": current}}
    assert api.token_forms[0]["refresh_token"] == "rt-0"


def test_an_environment_variable_read_only_by_an_alternative_not_chosen_may_be_missing(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path
) -> None:
    api = Api()
    server = serve(api_app(api))
    flow = CHOICE.replace("KIND", "header").replace(
        "client_id: cid", 'client_id: "{{ env.OAUTH_CLIENT_ID }}"'
    )
    write_flow(flow)
    env = {"API": server.url, "KEY": API_KEY, "USE_KEY": "yes"}
    result = cli("run", "flow.yaml", env=env)
    assert result.code == 0, result.stderr
    assert read_jsonl(tmp_path / "out" / "rows.jsonl") == [{"kind": "header"}]
    # Chosen, the alternative's variable is required again, named with where it is read.
    result = cli("run", "flow.yaml", env={**env, "CS": CLIENT_SECRET})
    assert result.code == 2
    assert "environment variable OAUTH_CLIENT_ID is not set (read at " in result.stderr
    assert "services.api.auth[1].client_id" in result.stderr
