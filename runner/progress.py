"""The progress line: on a terminal, one line on stderr with the requests sent, the records
per stream, the rate, the time elapsed and the current step, redrawn a few times a second
and cleared at the end. The CLI turns it on only where it helps (see `wanted`)."""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Callable, Mapping
from typing import TextIO

from .logs import Handler, current_run_step
from .messages import Stats

log = logging.getLogger("runner")

INTERVAL_S = 0.25  # at most four redraws a second: readable, and costs nothing
_CLEAR = "\r\x1b[K"  # back to the line's start, erase to its end


def wanted(stream: TextIO, log_format: str, disabled: bool, environ: Mapping[str, str]) -> bool:
    """A progress line only on a real terminal, with text logs, not turned off, not TERM=dumb."""
    if disabled or log_format != "text" or environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def _count(n: int) -> str:
    return f"{n:,}"


def _elapsed(seconds: float) -> str:
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Draws the line from the run's live counters; `run` is the drawing task's body."""

    def __init__(
        self,
        stream: TextIO,
        stats: Stats,
        records: Mapping[str, int],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.stats = stats
        self.records = records
        self.clock = clock
        self.started = clock()
        self.shown = False
        self.draws = 0

    def line(self, width: int) -> str:
        elapsed = max(self.clock() - self.started, 1e-9)
        total = sum(self.records.values())
        parts = []
        step = current_run_step()
        if step is not None:
            parts.append(f"step {step}")
        requests = self.stats.requests
        parts.append(f"{_count(requests)} {'request' if requests == 1 else 'requests'}")
        if self.records:
            per_stream = ", ".join(f"{name} {_count(n)}" for name, n in self.records.items())
            parts.append(per_stream)
        else:
            parts.append("0 records")
        parts.append(f"{_count(round(total / elapsed))} records/s")
        parts.append(_elapsed(elapsed))
        text = "runner: " + " | ".join(parts)
        # A line wider than the terminal wraps, and "\r" would then redraw only its tail.
        return text if len(text) < width else text[: max(width - 2, 0)] + "…"

    def draw(self) -> None:
        width = shutil.get_terminal_size((80, 24)).columns
        try:
            self.stream.write(_CLEAR + self.line(width))
            self.stream.flush()
        except (OSError, ValueError):
            return
        self.shown = True
        self.draws += 1

    def clear(self) -> None:
        if not self.shown:
            return
        try:
            self.stream.write(_CLEAR)
            self.stream.flush()
        except (OSError, ValueError):
            pass
        self.shown = False

    def _handlers(self) -> list[Handler]:
        return [
            h
            for h in log.handlers
            if isinstance(h, Handler) and getattr(h, "stream", None) is self.stream
        ]

    async def run(self) -> None:
        """Draws until cancelled, then clears the line. A log line written to the same stream
        clears it first; the next tick draws it again."""
        handlers = self._handlers()
        for handler in handlers:
            handler.around = (self.clear, _nothing)
        try:
            while True:
                self.draw()
                # The screen's own cadence, not the run's clock: a virtual clock must not
                # make it spin.
                await asyncio.sleep(INTERVAL_S)
        finally:
            for handler in handlers:
                handler.around = None
            self.clear()


def _nothing() -> None:
    return None
