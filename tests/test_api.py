"""The Python API for hosts: `run_flow_async` in the host's event loop, `run_flow` refusing a
running loop, nothing written to stdout or stderr, the run's fields on the host's log
records, and every parameter documented."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

import runner
from tests.conftest import ROOT, Serve, app_with, read_jsonl

FLOW = """\
version: 1
name: api-flow
inputs:
  type: object
  properties:
    fail: {type: boolean, default: false}
services:
  api: {base_url: "{{ env.API }}"}
steps:
  - id: rows
    request: {service: api, path: /rows, query: {fail: "{{ inputs.fail }}"}}
    records: body.rows
    emit: rows
outputs:
  rows: {primary_key: [id]}
"""


def _app(delay: float = 0.0) -> web.Application:
    async def rows(request: web.Request) -> web.Response:
        await asyncio.sleep(delay)
        if request.query.get("fail") == "true":
            return web.json_response({"error": "broken"}, status=400)
        return web.json_response({"rows": [{"id": 1}, {"id": 2}]})

    return app_with(("GET", "/rows", rows))


@pytest.fixture
def flow_file(tmp_path: Path) -> Path:
    path = tmp_path / "flow.yaml"
    path.write_text(FLOW, encoding="utf-8")
    return path


async def test_run_flow_async_runs_in_the_callers_loop(
    serve: Serve, flow_file: Path, tmp_path: Path
) -> None:
    server = serve(_app())
    env = {"API": server.url}
    loop = asyncio.get_running_loop()
    result = await runner.run_flow_async(
        flow_file, environ=env, output_dir=str(tmp_path / "out"), summary=str(tmp_path / "s.json")
    )
    assert asyncio.get_running_loop() is loop
    assert isinstance(result, runner.RunResult)
    assert (result.exit_code, result.status) == (0, "success")
    assert result.summary["records"] == {"rows": 2}
    assert read_jsonl(tmp_path / "out" / "rows.jsonl") == [{"id": 1}, {"id": 2}]
    assert json.loads((tmp_path / "s.json").read_text()) == result.summary
    # The run was awaited in this very task: its context is left as it was, so a later
    # record of the logger names no run or step.
    after = logging.LogRecord("runner", logging.INFO, __file__, 1, "after", None, None)
    for flt in logging.getLogger("runner").filters:
        flt.filter(after)
    assert not hasattr(after, "run_id") and not hasattr(after, "step")

    failed = await runner.run_flow_async(
        runner.load_flow(flow_file),
        {"fail": True},
        environ=env,
        output_dir=str(tmp_path / "failed"),
    )
    assert (failed.exit_code, failed.status) == (1, "failed")
    assert failed.summary["error"]["status"] == 400
    assert not (tmp_path / "failed" / "manifest.json").exists()


async def test_two_runs_share_one_loop_and_keep_their_own_log_fields(
    serve: Serve, flow_file: Path, tmp_path: Path
) -> None:
    server = serve(_app(delay=0.1))
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    logger = logging.getLogger("runner")
    keep = Keep()
    logger.addHandler(keep)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        a, b = await asyncio.gather(
            *(
                runner.run_flow_async(
                    flow_file, environ={"API": server.url}, output_dir=str(tmp_path / name)
                )
                for name in ("a", "b")
            )
        )
    finally:
        logger.removeHandler(keep)
        logger.setLevel(old_level)
    assert (a.exit_code, b.exit_code) == (0, 0)
    assert a.summary["run_id"] != b.summary["run_id"]
    closing = [r for r in seen if "succeeded" in r.getMessage()]
    assert sorted(r.__dict__["run_id"] for r in closing) == sorted(
        [a.summary["run_id"], b.summary["run_id"]]
    )
    for record in closing:
        assert record.__dict__["run_id"] in record.getMessage()
        assert record.__dict__["flow"] == "api-flow"
        assert record.__dict__["records"] == 2


async def test_run_flow_inside_a_running_loop_names_the_async_one(
    serve: Serve, flow_file: Path, tmp_path: Path
) -> None:
    server = serve(_app())
    with pytest.raises(RuntimeError, match=r"await runner\.run_flow_async\(\.\.\.\)"):
        runner.run_flow(flow_file, environ={"API": server.url}, output_dir=str(tmp_path / "o"))
    assert server.requests == []
    assert not (tmp_path / "o").exists()


async def test_cancelling_the_awaiting_task_commits_nothing(
    serve: Serve, flow_file: Path, tmp_path: Path
) -> None:
    server = serve(_app(delay=5))
    task = asyncio.create_task(
        runner.run_flow_async(
            flow_file, environ={"API": server.url}, output_dir=str(tmp_path / "o")
        )
    )
    while not server.requests:
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not (tmp_path / "o" / "manifest.json").exists()
    assert not (tmp_path / "o" / "rows.jsonl").exists()


_HOST = """\
import json, logging, sys
import runner

mode = sys.argv[1]
if mode == "logging":
    seen = []
    class Keep(logging.Handler):
        def emit(self, record):
            seen.append({k: record.__dict__.get(k) for k in
                         ("levelname", "run_id", "flow", "step", "method", "url", "status")})
    logging.getLogger().addHandler(Keep())
    logging.getLogger().setLevel(logging.INFO)
ok = runner.run_flow(sys.argv[2], output_dir=sys.argv[3])
bad = runner.run_flow(sys.argv[2], {"fail": True}, output_dir=sys.argv[3] + "-bad")
result = {"codes": [ok.exit_code, bad.exit_code]}
if mode == "logging":
    result["records"] = seen
with open(sys.argv[4], "w") as f:
    json.dump(result, f)
"""


def _host(mode: str, flow_file: Path, tmp_path: Path, url: str) -> tuple[dict[str, Any], str, str]:
    report = tmp_path / f"{mode}.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNER_")}
    proc = subprocess.run(
        [sys.executable, "-c", _HOST, mode, str(flow_file), str(tmp_path / mode), str(report)],
        env={**env, "API": url, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    data: dict[str, Any] = json.loads(report.read_text())
    return data, proc.stdout, proc.stderr


def test_the_library_writes_nothing_unless_asked(
    serve: Serve, flow_file: Path, tmp_path: Path
) -> None:
    server = serve(_app())
    data, out, err = _host("quiet", flow_file, tmp_path, server.url)
    assert data["codes"] == [0, 1]
    assert (out, err) == ("", "")


def test_a_hosts_logging_gets_the_records_with_their_fields(
    serve: Serve, flow_file: Path, tmp_path: Path
) -> None:
    server = serve(_app())
    data, out, err = _host("logging", flow_file, tmp_path, server.url)
    assert (out, err) == ("", "")
    records = data["records"]
    failure = [r for r in records if r["levelname"] == "ERROR"]
    assert len(failure) == 1
    assert failure[0]["step"] == "rows"
    assert failure[0]["method"] == "GET"
    assert failure[0]["status"] == 400
    assert failure[0]["url"].startswith(server.url + "/rows")
    assert failure[0]["flow"] == "api-flow"
    assert re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{6}", failure[0]["run_id"])


def _documented_parameters(text: str) -> set[str]:
    return set(re.findall(r"^\s{4}(\w+):", text, re.M))


def test_every_parameter_is_documented_and_both_entry_points_agree() -> None:
    from runner.run import run_flow, run_flow_async

    sync = inspect.signature(run_flow)
    asynchronous = inspect.signature(run_flow_async)
    assert list(sync.parameters) == list(asynchronous.parameters)
    for name, parameter in sync.parameters.items():
        other = asynchronous.parameters[name]
        assert (parameter.default, parameter.kind) == (other.default, other.kind), name
    assert sync.return_annotation == asynchronous.return_annotation == "RunResult"

    assert run_flow.__doc__ is not None and run_flow_async.__doc__ is not None
    assert _documented_parameters(run_flow.__doc__) == set(sync.parameters)
    assert "run_flow" in run_flow_async.__doc__

    readme = (ROOT / "README.md").read_text()
    api = readme[readme.index("## Python API") :]
    api = api[: api.index("\n## ", 1)]
    for name in sync.parameters:
        assert f"`{name}`" in api, f"README's Python API does not document {name}"
    assert "run_flow_async" in api
