"""The progress line, seen in a real pseudo-terminal: drawn a few times a second on stderr
while a run goes, cleared at the end, and absent where it would only be noise (a pipe,
`--no-progress`, `--log-format json`, TERM=dumb)."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from aiohttp import web

from tests.conftest import ROOT, Serve, app_with

PAGES = 8
PAGE_DELAY_S = 0.2
COLUMNS = 72

FLOW = """\
version: 1
name: progress
services:
  api: {base_url: "{{ env.API }}"}
steps:
  - id: pages
    request: {service: api, path: /items}
    paginate: {type: page_number}
    records: body.items
    emit: items
outputs:
  items: {}
"""


def _app() -> web.Application:
    async def items(request: web.Request) -> web.Response:
        page = int(request.query.get("page", "1"))
        await asyncio.sleep(PAGE_DELAY_S)
        rows = [{"id": page * 10 + i} for i in range(5)] if page <= PAGES else []
        return web.json_response({"items": rows})

    return app_with(("GET", "/items", items))


def _env(url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNER_")}
    env.update({"API": url, "TERM": "xterm", "PYTHONPATH": str(ROOT), **extra})
    return env


def _in_terminal(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, str, float]:
    """Runs the CLI with stderr on a pseudo-terminal (stdout to a pipe, as a scheduler's log
    capture would leave it); returns the exit code, what the terminal showed, and the time."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, COLUMNS, 0, 0))
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "runner.cli", *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(60)
    os.close(master)
    assert proc.stdout is not None
    proc.stdout.close()
    return proc.returncode, b"".join(chunks).decode(), time.monotonic() - started


def test_a_terminal_shows_the_progress_line_and_it_is_cleared_at_the_end(
    serve: Serve, tmp_path: Path
) -> None:
    server = serve(_app())
    (tmp_path / "flow.yaml").write_text(FLOW)
    code, shown, took = _in_terminal(["run", "flow.yaml"], tmp_path, _env(server.url))
    assert code == 0, shown
    draws = re.findall(r"\r\x1b\[K(runner: step [^\r\n]*)", shown)
    # A run of ~2 s (9 pages at 0.2 s) draws several times, but at most four times a second.
    assert len(draws) >= 3, shown
    assert len(draws) <= took / 0.25 + 2, (len(draws), took)
    last = draws[-1]
    assert re.fullmatch(
        r"runner: step pages \| \d+ requests \| items \d+ \| [\d,]+ records/s \| 0:0\d", last
    ), last
    counts = [int(m.group(1)) for d in draws if (m := re.search(r"\| (\d+) requests? \|", d))]
    assert len(counts) == len(draws)
    assert not [d for d in draws if "| 1 requests" in d]
    assert counts == sorted(counts) and counts[-1] >= 3
    assert all(len(d) < COLUMNS for d in draws)
    # Cleared before the closing log line: that line starts on a clean line and nothing is
    # drawn after it.
    tail = shown[shown.rindex("runner: step") :]
    assert "\r\x1b[K" in tail
    # After the last clear: whole log lines only (the terminal turns "\n" into "\r\n").
    closing = shown.rsplit("\r\x1b[K", 1)[1]
    assert closing.endswith("\r\n")
    assert all(line.startswith("runner: INFO: ") for line in closing.split("\r\n")[:-1])
    closing = closing.split("\r\n")[-2]
    assert closing.startswith("runner: INFO: run ") and "succeeded" in closing, closing
    assert "runner: step" not in shown[shown.index("succeeded") :]


@pytest.mark.parametrize(
    ("args", "extra_env"),
    [
        (["--no-progress"], {}),
        (["--log-format", "json"], {}),
        ([], {"TERM": "dumb"}),
    ],
    ids=["no-progress", "json-logs", "dumb-terminal"],
)
def test_no_progress_line_when_turned_off(
    serve: Serve, tmp_path: Path, args: list[str], extra_env: dict[str, str]
) -> None:
    server = serve(_app())
    (tmp_path / "flow.yaml").write_text(FLOW)
    code, shown, _ = _in_terminal(
        ["run", "flow.yaml", *args], tmp_path, _env(server.url, **extra_env)
    )
    assert code == 0, shown
    assert "\x1b[K" not in shown and "records/s" not in shown
    if "json" in args:
        lines = [json.loads(line) for line in shown.splitlines() if line.strip()]
        assert lines and all(isinstance(line, dict) for line in lines)


def test_no_progress_line_when_stderr_is_not_a_terminal(serve: Serve, tmp_path: Path) -> None:
    server = serve(_app())
    (tmp_path / "flow.yaml").write_text(FLOW)
    proc = subprocess.run(
        [sys.executable, "-m", "runner.cli", "run", "flow.yaml"],
        cwd=tmp_path,
        env=_env(server.url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and "records/s" not in proc.stderr
