"""Virtual time for offline tests: a clock whose time moves only when every task waits,
jumping to the earliest deadline, and the event loop that keeps that time.

The loop's `time()` is the clock's virtual monotonic time, so every timer of the run
(the clock's `sleep`, `asyncio.sleep`, `asyncio.timeout`, `call_later`) is virtual. When the
loop has nothing ready to run and would block until its next timer, it first polls for I/O
without waiting; if none is ready it advances the clock to that timer instead of sleeping.
Eight items backing off one second at once thus take one virtual second, and a poll every
30 s takes no wall time at all. Callbacks run in the order they were scheduled, so the same
case gives the same interleaving, and the same result, every time.
"""

from __future__ import annotations

import asyncio
import selectors
from datetime import UTC, datetime, timedelta
from typing import Any

# Where virtual monotonic time starts: far from zero, like a real monotonic clock, so that
# code subtracting a margin from it never goes negative.
_EPOCH = 1_000_000.0


class VirtualClock:
    """The clock seam's virtual implementation; make the run's loop with `new_event_loop`."""

    def __init__(self, start: datetime | None = None) -> None:
        self._wall_start = (start or datetime.now(UTC)).astimezone(UTC)
        self._t = _EPOCH

    # -- the Clock protocol

    def monotonic(self) -> float:
        return self._t

    def time(self) -> float:
        return self._wall_start.timestamp() + (self._t - _EPOCH)

    def now(self) -> datetime:
        return self._wall_start + timedelta(seconds=self._t - _EPOCH)

    async def sleep(self, seconds: float) -> None:
        # On the virtual loop, asyncio's own sleep is a virtual one.
        await asyncio.sleep(max(0.0, seconds))

    # -- virtual time

    @property
    def elapsed(self) -> float:
        """Virtual seconds since the clock was made."""
        return self._t - _EPOCH

    def advance(self, seconds: float) -> None:
        if seconds > 0:
            self._t += seconds

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        """An event loop whose time is this clock's (for `asyncio.Runner(loop_factory=...)`)."""
        return _VirtualLoop(self)


class _JumpingSelector(selectors.BaseSelector):
    """Wraps the real selector: where the loop would wait for its next timer, time jumps."""

    def __init__(self, clock: VirtualClock) -> None:
        self._clock = clock
        self._real = selectors.DefaultSelector()

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._real.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.modify(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            return self._real.select(None)  # no timer: only I/O (a thread's result) can come
        ready = self._real.select(0)
        if ready or timeout <= 0:
            return ready
        self._clock.advance(timeout)
        return []

    def close(self) -> None:
        self._real.close()

    def get_map(self) -> Any:
        return self._real.get_map()


class _VirtualLoop(asyncio.SelectorEventLoop):
    """asyncio's selector loop on a virtual clock."""

    def __init__(self, clock: VirtualClock) -> None:
        self._virtual_clock = clock
        super().__init__(_JumpingSelector(clock))
        # Timers due within this much of now run now: virtual time has no jitter to absorb.
        self._clock_resolution = 1e-9

    def time(self) -> float:
        return self._virtual_clock.monotonic()
