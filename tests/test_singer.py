"""`--sink singer`: the runner's stdout piped into a real Singer target (target-jsonl from
PyPI) gives the same records as the runner's own JSONL files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import Cli, Serve, WriteFlow, read_jsonl
from tests.destinations import ItemsApi, flow_text, item

SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "integer"}, "name": {"type": "string"}},
}


def _env(url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNER_")}
    env["API"] = url
    return env


def test_singer_messages_into_target_jsonl(
    serve: Serve, cli: Cli, write_flow: WriteFlow, tmp_path: Path, target_jsonl: Path
) -> None:
    items = ItemsApi([item(i, tags=["a"] if i % 2 else None) for i in range(1, 8)])
    items.records.append({"id": 8, "name": "late", "updated": 8, "extra": {"x": 1.5}})
    server = serve(items.app())
    write_flow(flow_text())

    # The runner's own files, for comparison.
    result = cli("run", "flow.yaml", "--output-dir", "files", env={"API": server.url})
    assert result.code == 0, result.stderr
    expected = read_jsonl(tmp_path / "files" / "items.jsonl")

    (tmp_path / "config.json").write_text(json.dumps({"destination_path": "singer-out"}))
    pipeline = (
        f"set -o pipefail; {sys.executable} -m runner.cli run flow.yaml --sink singer "
        f"--state state.json | tee messages.jsonl | {target_jsonl} -c config.json"
    )
    proc = subprocess.run(
        ["bash", "-c", pipeline],
        cwd=tmp_path,
        env=_env(server.url),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    files = list((tmp_path / "singer-out").glob("items-*.jsonl"))
    assert len(files) == 1
    assert read_jsonl(files[0]) == expected

    # The target's last word is the STATE message's value: the state document.
    state = {"version": 1, "streams": {"items": {"cursor": 8}}}
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == state
    assert json.loads((tmp_path / "state.json").read_text())["streams"] == state["streams"]

    messages = read_jsonl(tmp_path / "messages.jsonl")
    assert {m["type"] for m in messages} == {"SCHEMA", "RECORD", "STATE"}
    assert messages[0]["type"] == "SCHEMA" and messages[0]["key_properties"] == ["id"]
    assert messages[-1] == {"type": "STATE", "value": state}
    schemas = [m for m in messages if m["type"] == "SCHEMA"]
    assert schemas[-1]["schema"]["properties"]["extra"] == {"type": ["object", "null"]}


def test_singer_declared_schema_empty_stream_and_failed_run(
    serve: Serve, write_flow: WriteFlow, tmp_path: Path
) -> None:
    items = ItemsApi([])
    server = serve(items.app())
    write_flow(flow_text(schema=SCHEMA))
    args = [sys.executable, "-m", "runner.cli", "run", "flow.yaml", "--sink", "singer"]
    proc = subprocess.run(
        args, cwd=tmp_path, env=_env(server.url), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    messages: list[dict[str, Any]] = [json.loads(line) for line in proc.stdout.splitlines()]
    assert messages == [
        {"type": "SCHEMA", "stream": "items", "schema": SCHEMA, "key_properties": ["id"]},
        {"type": "STATE", "value": {"version": 1, "streams": {}}},
    ]

    # A failed run sends its records but never a STATE message.
    items.records = [item(1)]
    proc = subprocess.run(
        [*args, "--input", "fail=true"],
        cwd=tmp_path,
        env=_env(server.url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    types = [json.loads(line)["type"] for line in proc.stdout.splitlines()]
    assert types == ["SCHEMA", "RECORD"]
