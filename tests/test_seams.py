"""The transport and clock seams: a canned transport and a virtual clock stand in for the
network and the time, and the client, the auth layer and a whole run behave as with the
real ones (the end-to-end tests prove the aiohttp transport and the system clock)."""

from __future__ import annotations

import asyncio
import heapq
import json
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from runner.auth import ServiceAuth
from runner.clock import SYSTEM_CLOCK, Clock, SystemClock, current, deadline, using
from runner.errors import DecodeError
from runner.http import (
    USER_AGENT,
    PreparedRequest,
    RateLimit,
    Response,
    RetryPolicy,
    ServiceClient,
    Stats,
    Timeouts,
    TransportError,
)
from runner.redact import Redactor
from runner.run import run_flow
from runner.templates import compile_template
from runner.transport import Transport, TransportFailure, TransportOptions, full_url

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
# The virtual clock of these tests reads asyncio's ready queue.
ASYNCIO = {"RUNNER_EVENT_LOOP": "asyncio"}
TIMEOUTS = Timeouts(connect=1, read=2, total=3)


class VirtualClock:
    """Virtual time: sleepers wait until every task waits, then time jumps to the earliest
    deadline (the loop is idle when its ready queue is empty: no I/O happens here)."""

    def __init__(self, start: datetime = T0) -> None:
        self.start = start
        self.elapsed = 0.0
        self.sleeps: list[float] = []
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._ticking = False

    def now(self) -> datetime:
        return self.start + timedelta(seconds=self.elapsed)

    def time(self) -> float:
        return self.start.timestamp() + self.elapsed

    def monotonic(self) -> float:
        return 1000.0 + self.elapsed

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        heapq.heappush(self._sleepers, (self.elapsed + max(0.0, seconds), id(waiter), waiter))
        if not self._ticking:
            self._ticking = True
            loop.call_soon(self._tick)
        await waiter

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        if loop._ready:  # type: ignore[attr-defined]  # some task can still run: not idle
            loop.call_soon(self._tick)
            return
        while self._sleepers and self._sleepers[0][2].done():  # cancelled sleepers
            heapq.heappop(self._sleepers)
        if not self._sleepers:
            self._ticking = False
            return
        self.elapsed = max(self.elapsed, self._sleepers[0][0])
        while self._sleepers and self._sleepers[0][0] <= self.elapsed:
            waiter = heapq.heappop(self._sleepers)[2]
            if not waiter.done():
                waiter.set_result(None)
        loop.call_soon(self._tick)


Answer = Response | TransportFailure | Callable[[PreparedRequest], Response]


class CannedTransport:
    """Answers each send with the next canned answer; records what it was sent, and when."""

    def __init__(self, options: TransportOptions, answers: list[Answer], clock: Clock) -> None:
        self.options = options
        self.answers = answers
        self.clock = clock
        self.sent: list[tuple[float, PreparedRequest]] = []
        self.closed = False

    async def send(
        self, request: PreparedRequest, timeouts: Timeouts, max_body_bytes: int
    ) -> Response:
        self.sent.append((self.clock.monotonic(), request))
        answer = self.answers.pop(0)
        if isinstance(answer, TransportFailure):
            raise answer
        response = answer(request) if callable(answer) else answer
        if len(response.body) > max_body_bytes:
            raise DecodeError("too large", status=response.status)
        return Response(response.status, response.reason, dict(response.headers), response.body,
                        response.url or str(full_url(request)))  # fmt: skip

    async def close(self) -> None:
        self.closed = True


class Factory:
    """A TransportFactory: one CannedTransport per client, sharing one list of answers."""

    def __init__(self, answers: list[Answer], clock: Clock = SYSTEM_CLOCK) -> None:
        self.answers = answers
        self.clock = clock
        self.made: list[CannedTransport] = []

    def __call__(self, options: TransportOptions) -> Transport:
        transport = CannedTransport(options, self.answers, self.clock)
        self.made.append(transport)
        return transport

    @property
    def sent(self) -> list[tuple[float, PreparedRequest]]:
        return [item for transport in self.made for item in transport.sent]


def ok(body: Any = None, status: int = 200, **headers: str) -> Response:
    data = b"" if body is None else json.dumps(body).encode()
    headers = {k.replace("_", "-").lower(): v for k, v in headers.items()}
    headers.setdefault("content-type", "application/json")
    return Response(status, "OK" if status < 300 else "Error", headers, data, "")


def client(factory: Factory, clock: Clock, **kwargs: Any) -> ServiceClient:
    return ServiceClient(
        "api", stats=Stats(), redactor=Redactor(), clock=clock, transport=factory, **kwargs
    )


async def send(c: ServiceClient, url: str, retry: RetryPolicy, **kwargs: Any) -> Response:
    return await c.send(
        PreparedRequest("GET", url, **kwargs), retry=retry, timeouts=TIMEOUTS, max_body_bytes=1000
    )


# -- the client above the transport -----------------------------------------------------------


async def test_retry_timing_with_a_canned_transport_and_a_virtual_clock() -> None:
    clock = VirtualClock()
    factory = Factory([ok(status=503, retry_after="2"), ok(status=503), ok({"a": 1})], clock)
    policy = RetryPolicy(max_attempts=4, initial_delay=1.0, multiplier=3.0, max_delay=5.0)
    c = client(factory, clock, rng=random.Random(7))
    response = await send(c, "https://api.example/x", policy)
    # The first wait is the Retry-After; the second is full jitter from the seeded RNG.
    expected_jitter = random.Random(7).uniform(0, 3.0)
    assert clock.sleeps == [2.0, expected_jitter]
    assert (response.status, response.attempts) == (200, 3)
    assert response.elapsed_s == pytest.approx(2.0 + expected_jitter)
    assert [when - 1000.0 for when, _ in factory.sent] == pytest.approx(
        [0.0, 2.0, 2.0 + expected_jitter]
    )
    assert (c.stats.requests, c.stats.retries) == (3, 2)
    assert c.stats.status_counts == {"503": 2, "200": 1}
    assert factory.made[0].options == TransportOptions(service="api")
    await c.close()
    assert factory.made[0].closed


async def test_transport_failures_are_retried_then_raised_with_their_message() -> None:
    clock = VirtualClock()
    failures: list[Answer] = [
        TransportFailure("refused", "cannot connect: refused"),
        TransportFailure("timeout", "timed out after 2 s waiting for data (read timeout)"),
        TransportFailure("reset", "response body cut short: x", status=200, headers={}),
    ]
    factory = Factory(failures, clock)
    c = client(factory, clock, rng=random.Random(1))
    with pytest.raises(TransportError) as caught:
        await send(c, "https://api.example/x", RetryPolicy(max_attempts=3, initial_delay=1.0))
    assert caught.value.message == "response body cut short: x"
    assert caught.value.attempts == 3
    assert len(clock.sleeps) == 2
    # Every attempt is one request; the one whose response had begun counts its status.
    assert (c.stats.requests, c.stats.status_counts) == (3, {"200": 1})


async def test_redirect_hops_are_each_a_send_and_credentials_stay_on_their_origin() -> None:
    clock = VirtualClock()
    factory = Factory(
        [ok(status=302, location="https://other.example/b?x=1"), ok({"done": True})], clock
    )
    c = client(factory, clock)
    response = await send(
        c, "https://api.example/a", RetryPolicy(), headers={"Authorization": "Bearer t"}
    )
    assert response.status == 200
    first, second = (request for _, request in factory.sent)
    # Every hop says who sent it; the credentials stay on their origin.
    assert (first.url, first.headers) == (
        "https://api.example/a",
        {"Authorization": "Bearer t", "User-Agent": USER_AGENT},
    )
    assert (second.url, second.headers) == (
        "https://other.example/b?x=1",
        {"User-Agent": USER_AGENT},
    )
    assert c.stats.requests == 2


async def test_rate_limit_headers_pause_the_service_on_the_clock() -> None:
    clock = VirtualClock()
    factory = Factory([ok([], x_ratelimit_remaining="0", x_ratelimit_reset="5"), ok([])], clock)
    c = client(factory, clock)
    await send(c, "https://api.example/a", RetryPolicy())
    await send(c, "https://api.example/b", RetryPolicy())
    assert [when - 1000.0 for when, _ in factory.sent] == [0.0, 5.0]


async def test_the_rate_limiter_waits_on_the_clock() -> None:
    clock = VirtualClock()
    factory = Factory([ok([]) for _ in range(5)], clock)
    c = client(factory, clock, rate_limit=RateLimit(2, 1.0))
    for _ in range(5):
        await send(c, "https://api.example/a", RetryPolicy())
    assert [when - 1000.0 for when, _ in factory.sent] == [0.0, 0.0, 1.0, 1.0, 2.0]


async def test_token_requests_go_through_the_transport_and_expire_on_the_clock() -> None:
    clock = VirtualClock()
    tokens = iter(["t1", "t2"])

    def token(request: PreparedRequest) -> Response:
        return ok({"access_token": next(tokens), "expires_in": 100})

    factory = Factory([token, token], clock)
    auth = ServiceAuth("api", stats=Stats(), redactor=Redactor(), clock=clock, transport=factory)
    config = {
        "type": "oauth2_client_credentials",
        "token_url": "https://idp.example/token",
        "client_id": "id",
        "client_secret": "secret",
    }
    authorize = auth.authorizer(config, None)
    request = PreparedRequest("GET", "https://api.example/x")
    assert (await authorize.apply(request)).headers["Authorization"] == "Bearer t1"
    clock.elapsed += 89.9  # the margin is min(30, 10 % of 100) = 10 s
    assert (await authorize.apply(request)).headers["Authorization"] == "Bearer t1"
    clock.elapsed += 0.1
    assert (await authorize.apply(request)).headers["Authorization"] == "Bearer t2"
    [transport] = factory.made
    assert transport.options == TransportOptions(service="api", auth=True)
    assert [(r.method, r.url) for _, r in transport.sent] == [
        ("POST", "https://idp.example/token")
    ] * 2
    await auth.close()
    assert transport.closed


# -- the clock ---------------------------------------------------------------------------------


async def test_a_deadline_ends_the_body_at_the_clocks_time() -> None:
    clock = VirtualClock()
    never = asyncio.Event()
    with pytest.raises(TimeoutError):
        async with deadline(clock, 10):
            await never.wait()
    assert clock.elapsed == 10


async def test_a_body_that_ends_in_time_is_left_alone() -> None:
    clock = VirtualClock()
    async with deadline(clock, 10):
        await clock.sleep(4)
    async with deadline(clock, None):
        await clock.sleep(1)
    await clock.sleep(20)  # the watcher is gone: nothing is cancelled now
    assert clock.elapsed == 25


def test_now_in_templates_reads_the_current_clock() -> None:
    template = compile_template("{{ now() }}")
    assert isinstance(current(), SystemClock)
    with using(VirtualClock()):
        assert template.render({}) == "2024-05-01T12:00:00Z"
    assert template.render({}) != "2024-05-01T12:00:00Z"


async def test_the_system_clock() -> None:
    before = SYSTEM_CLOCK.time()
    start = SYSTEM_CLOCK.monotonic()
    await SYSTEM_CLOCK.sleep(0.01)
    assert SYSTEM_CLOCK.monotonic() - start >= 0.009
    assert abs(SYSTEM_CLOCK.now().timestamp() - before) < 5
    assert SYSTEM_CLOCK.now().tzinfo is UTC


# -- a whole run -------------------------------------------------------------------------------

POLL_FLOW = """
version: 1
name: seams
services:
  api:
    base_url: https://api.example
steps:
  - id: job
    request:
      service: api
      path: /job
      query: {asked_at: "{{ now() }}", run_started: "{{ run.started_at }}"}
    poll: {until: "body.status == 'done'", interval: 30, timeout: 600}
    retry: {max_attempts: 3, initial_delay: 1}
    records: body.rows
    emit: rows
outputs:
  rows: {}
"""


def test_a_whole_run_with_a_canned_transport_and_a_virtual_clock(tmp_path: Path) -> None:
    path = tmp_path / "flow.yaml"
    path.write_text(POLL_FLOW, encoding="utf-8")
    clock = VirtualClock()
    factory = Factory(
        [
            ok({"status": "pending"}),
            ok(status=503, retry_after="7"),
            ok({"status": "pending"}),
            ok({"status": "done", "rows": [{"id": 1}, {"id": 2}]}),
        ],
        clock,
    )
    result = run_flow(
        path,
        output_dir=str(tmp_path / "out"),
        environ=ASYNCIO,
        transport=factory,
        clock=clock,
        rng=random.Random(3),
    )
    assert result.exit_code == 0, result.summary
    # Two poll waits of 30 s and the 503's Retry-After of 7 s, in virtual time only.
    assert clock.sleeps == [30, 7.0, 30]
    assert result.summary["started_at"] == "2024-05-01T12:00:00Z"
    assert result.summary["duration_s"] == 67.0
    assert (result.summary["requests"], result.summary["retries"]) == (4, 1)
    assert result.summary["records"] == {"rows": 2}
    # The request is rendered once; `now()` and `run.started_at` read the virtual clock.
    queries = {str(full_url(request)) for _, request in factory.sent}
    assert queries == {
        "https://api.example/job?asked_at=2024-05-01T12:00:00Z&run_started=2024-05-01T12:00:00Z"
    }
    lines = (tmp_path / "out" / "rows.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [{"id": 1}, {"id": 2}]


def test_the_runs_timeout_is_measured_on_its_clock(tmp_path: Path) -> None:
    path = tmp_path / "flow.yaml"
    path.write_text(POLL_FLOW, encoding="utf-8")
    clock = VirtualClock()
    factory = Factory([ok({"status": "pending"}) for _ in range(10)], clock)
    result = run_flow(
        path,
        output_dir=str(tmp_path / "out"),
        environ=ASYNCIO,
        transport=factory,
        clock=clock,
        timeout=45,
    )
    assert (result.exit_code, result.summary["error"]["kind"]) == (69, "timeout")
    assert "--timeout (45 s)" in result.summary["error"]["message"]
    assert len(factory.sent) == 2  # sent at 0 s and 30 s; the 60 s poll never came


# -- the arrows --------------------------------------------------------------------------------


def test_the_phases_import_neither_the_engine_nor_the_run() -> None:
    from test_architecture import import_graph

    graph = import_graph()

    def reach(start: str) -> set[str]:
        seen: set[str] = set()
        todo = [start]
        while todo:
            for nxt in graph[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    above = {"runner.engine", "runner.run", "runner.cli", "runner.dryrun"}
    for phase in ("build", "send", "http", "auth", "decode", "handle", "mapping", "context"):
        assert not reach(f"runner.{phase}") & above, phase
    # The seams stand on plain data only.
    assert reach("runner.clock") == set()
    assert reach("runner.transport") <= {"runner.messages", "runner.errors"}


def test_a_run_with_another_transport_never_loads_aiohttp() -> None:
    import subprocess
    import sys

    code = "import sys, runner.run; print('aiohttp' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr
