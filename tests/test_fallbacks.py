"""orjson, uvloop and jsonschema-rs are dependencies for speed only: with all three made
unimportable, the standard library's paths give the same files, the same problems and the
same exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from aiohttp import web

from tests.conftest import ROOT, Serve, app_with, read_jsonl

FAST = ("orjson", "uvloop", "jsonschema_rs")

# The CLI with the fast modules blocked (None in sys.modules makes `import` raise ImportError);
# it checks on the way out that none of them slipped in.
_BLOCKED = f"""\
import sys
for name in {FAST!r}:
    sys.modules[name] = None
from runner.cli import main
code = main(sys.argv[1:])
leaked = [n for n in {FAST!r} if sys.modules.get(n) is not None]
assert not leaked, leaked
sys.exit(code)
"""

FLOW = """\
version: 1
name: fallbacks
services:
  api: {base_url: "{{ env.API }}"}
steps:
  - id: items
    request: {service: api, path: /items}
    paginate: {type: page_number, max_pages: 3}
    records: body.items
    fields: {id: id, name: name, score: score, big: big, tags: tags}
    emit: items
outputs:
  items:
    primary_key: [id]
    cursor: id
"""

BROKEN = """\
version: 1
name: broken
steps:
  - id: a
    request: {method: GTE, url: "http://127.0.0.1/x"}
    records: "body.items["
"""

PAGE = (
    b'{"items": [{"id": 1, "name": "Zo\\u00eb \xe2\x9c\x93", "score": 1.5e-07, '
    b'"big": 123456789012345678901234567890, "tags": ["a", null, true]}, '
    b'{"id": 2, "name": "line\\nbreak \\"q\\"", "score": 0.00001, "big": -1, "tags": []}]}'
)


def _cli(args: list[str], cwd: Path, env: dict[str, str], blocked: bool) -> subprocess.Popen[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("RUNNER_")}
    full.update(env, PYTHONPATH=str(ROOT))
    prefix = [sys.executable, "-c", _BLOCKED] if blocked else [sys.executable, "-m", "runner.cli"]
    return subprocess.Popen(
        [*prefix, *args],
        cwd=cwd,
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err


def test_a_run_without_the_fast_modules_writes_the_same_bytes(serve: Serve, tmp_path: Path) -> None:
    async def items(request: web.Request) -> web.Response:
        page = request.query.get("page")
        body = PAGE if page == "1" else b'{"items": []}'
        return web.Response(body=body, content_type="application/json")

    server = serve(app_with(("GET", "/items", items)))
    (tmp_path / "flow.yaml").write_text(FLOW)
    results = {}
    for blocked in (False, True):
        out = tmp_path / ("slow" if blocked else "fast")
        code, _, err = _finish(
            _cli(
                ["run", "flow.yaml", "--output-dir", str(out), "--state", f"{out}.state.json"],
                tmp_path,
                {"API": server.url},
                blocked,
            )
        )
        assert code == 0, err
        results[blocked] = (
            (out / "items.jsonl").read_bytes(),
            Path(f"{out}.state.json").read_text(),
        )
    assert results[True] == results[False]
    records = read_jsonl(tmp_path / "slow" / "items.jsonl")
    assert [r["id"] for r in records] == [1, 2]
    assert records[0]["big"] == 123456789012345678901234567890
    assert records[0]["name"] == "Zoë ✓"


def test_validate_without_the_fast_modules_reports_the_same_problems(tmp_path: Path) -> None:
    (tmp_path / "broken.yaml").write_text(BROKEN)
    (tmp_path / "good.yaml").write_text(FLOW)
    runs = [_finish(_cli(["validate", "."], tmp_path, {}, blocked)) for blocked in (False, True)]
    assert runs[0] == runs[1]
    code, _, err = runs[1]
    assert code == 2
    assert "broken.yaml:5:" in err and "GTE" in err
