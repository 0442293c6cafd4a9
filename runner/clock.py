"""The clock seam: every wait and every reading of the time in a run goes through one `Clock`.

Retry backoff, Retry-After and rate-limit pauses, the rate limiter, polls, token expiry,
`now()` in templates, `run.started_at`, the summary's times and `--timeout` all take the
run's clock, so that an offline test can pass a virtual one: its `sleep` advances virtual
time instead of waiting (jumping to the earliest deadline once every task waits), and
`now`, `time` and `monotonic` read that virtual time. `SystemClock` is the real one.

A clock reaches the code that needs it explicitly (`run_flow(clock=...)`, `FlowRun.clock`,
`ServiceClient(clock=...)`), except for templates' `now()`: compiled templates are shared
between runs, so they read the clock of the current context (`using`, `current`).
"""

from __future__ import annotations

import contextlib
import contextvars
import time as _time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable


@runtime_checkable
class Clock(Protocol):
    """Wall-clock time, a monotonic time and a sleep, all on one time line.

    `time()` and `monotonic()` are seconds; `now()` is `time()` as an aware UTC datetime.
    Differences of `monotonic()` measure durations and deadlines; `time()` and `now()` are
    for what is shown or compared with servers' dates. `sleep` must be awaited for every
    wait that should pass in this clock's time.
    """

    def now(self) -> datetime:
        """The current wall-clock time, an aware datetime in UTC."""
        ...

    def time(self) -> float:
        """The current wall-clock time in seconds since the epoch."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back, for durations and deadlines."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Waits `seconds` of this clock's time (at once for zero or less)."""
        ...


class SystemClock:
    """The real clock: the operating system's time and asyncio's sleep."""

    __slots__ = ()

    # The C functions themselves, not methods around them: the client reads the clock a few
    # times per request.
    time = staticmethod(_time.time)
    monotonic = staticmethod(_time.monotonic)

    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep(self, seconds: float) -> None:
        # asyncio imported here: templates read this module, and `runner validate` does not
        # load asyncio.
        import asyncio

        await asyncio.sleep(seconds)


SYSTEM_CLOCK: Clock = SystemClock()

_CURRENT: contextvars.ContextVar[Clock] = contextvars.ContextVar(
    "runner_clock", default=SYSTEM_CLOCK
)


def current() -> Clock:
    """The clock of the current context (set by `using`), else the system's."""
    return _CURRENT.get()


@contextlib.contextmanager
def using(clock: Clock) -> Iterator[None]:
    """Makes `clock` the current one for this context and the tasks created inside it."""
    token = _CURRENT.set(clock)
    try:
        yield
    finally:
        _CURRENT.reset(token)


@contextlib.asynccontextmanager
async def deadline(clock: Clock, seconds: float | None) -> AsyncIterator[None]:
    """Like `asyncio.timeout(seconds)`, measured on `clock`: TimeoutError when the body has
    not finished after `seconds` of the clock's time. None: no deadline.

    A task sleeping on the clock cancels the body, so that a virtual clock ends the body at
    the same virtual moment a real one would.
    """
    if seconds is None:
        yield
        return
    import asyncio

    task = asyncio.current_task()
    assert task is not None
    expired = False

    async def watch() -> None:
        nonlocal expired
        await clock.sleep(seconds)
        expired = True
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        yield
    except asyncio.CancelledError:
        # Ours only if this cancel was the watcher's and no other is pending (a signal).
        if expired and task.uncancel() == 0:
            raise TimeoutError from None
        raise
    finally:
        # Not awaited: a cancel of this task arriving meanwhile must not be swallowed.
        watcher.cancel()
