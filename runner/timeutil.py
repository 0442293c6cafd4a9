"""Date arithmetic that both languages share: ISO 8601 durations, calendar steps clamped to
the month's end, date windows, and datetimes parsed from text with a strftime format."""

from __future__ import annotations

import calendar
import functools
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from runner.clock import current as current_clock

__all__ = [
    "MAX_WINDOWS",
    "Duration",
    "parse_datetime",
    "parse_datetime_text",
    "parse_duration",
    "windows",
]

# A `windows()` call gives at most this many windows: a step of PT1S over years is a mistake,
# and the list is held in memory (for_each reads it whole).
MAX_WINDOWS = 100_000

_DURATION = re.compile(
    r"P(?!$)(?:(\d+)Y)?(?:(\d+)M)?(?:(\d+)W)?(?:(\d+)D)?"
    r"(?:T(?=\d)(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:[.,]\d+)?)S)?)?"
)


def parse_datetime(value: str) -> datetime:
    """An ISO 8601 datetime as an aware datetime; no zone means UTC.

    Accepts `Z` or an offset, fractional seconds of any length (cut to microseconds), and a
    bare date (midnight UTC). Raises ValueError on anything else.
    """
    if not isinstance(value, str):
        raise ValueError(f"not a datetime string: {value!r}")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        # RFC 3339 allows lower-case `t` and `z`; fromisoformat does not.
        try:
            parsed = datetime.fromisoformat(value.upper())
        except ValueError:
            raise ValueError(f"not an ISO 8601 datetime: {value!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


@dataclass(frozen=True, slots=True)
class Duration:
    """An ISO 8601 duration: calendar months (years are 12) and a fixed part (days are 24 h:
    the arithmetic is in UTC, which has no daylight saving)."""

    months: int = 0
    fixed: timedelta = timedelta(0)

    @property
    def is_zero(self) -> bool:
        return self.months == 0 and not self.fixed

    def times(self, k: int) -> Duration:
        return Duration(self.months * k, self.fixed * k)


@functools.lru_cache(maxsize=256)
def parse_duration(text: str) -> Duration:
    """`P1M`, `P1Y2M10DT2H30M`, `PT6H`, `P2W`, `PT0.5S`; ValueError on anything else."""
    if not isinstance(text, str):
        raise ValueError(f"not an ISO 8601 duration: {text!r}")
    match = _DURATION.fullmatch(text.strip().upper())
    if match is None:
        raise ValueError(f"not an ISO 8601 duration (P1D, P1M, PT6H, ...): {text!r}")
    years, months, weeks, days, hours, minutes, seconds = match.groups()
    return Duration(
        months=int(years or 0) * 12 + int(months or 0),
        fixed=timedelta(
            weeks=int(weeks or 0),
            days=int(days or 0),
            hours=int(hours or 0),
            minutes=int(minutes or 0),
            seconds=float((seconds or "0").replace(",", ".")),
        ),
    )


def add_months(moment: datetime, months: int) -> datetime:
    """`moment` plus calendar months, the day clamped to the month's end (Jan 31 + 1 month is
    Feb 29 in a leap year)."""
    if months == 0:
        return moment
    index = moment.year * 12 + moment.month - 1 + months
    year, month = divmod(index, 12)
    if not 1 <= year <= 9999:
        raise ValueError("date out of range (years 1 to 9999)")
    day = min(moment.day, calendar.monthrange(year, month + 1)[1])
    return moment.replace(year=year, month=month + 1, day=day)


def shift(moment: datetime, duration: Duration, sign: int = 1) -> datetime:
    """`moment` plus (or minus) a duration: calendar months first, then the fixed part."""
    try:
        return add_months(moment, sign * duration.months) + sign * duration.fixed
    except OverflowError:
        raise ValueError("date out of range (years 1 to 9999)") from None


# --- the shape of a datetime string, kept from input to output ------------------------------


@dataclass(frozen=True, slots=True)
class _Shape:
    """How a boundary was written: a date, an epoch number, or a datetime (with a zone or
    without one: no zone means UTC, and is written back without one)."""

    kind: str  # date | epoch | datetime
    zone: bool = True


def _read(value: Any, what: str) -> tuple[datetime, _Shape]:
    if isinstance(value, bool) or value is None:
        raise ValueError(f"windows(): {what} must be an ISO 8601 datetime, got {value!r}")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError(f"windows(): {what} is not a finite number: {value!r}")
        return datetime.fromtimestamp(value, UTC), _Shape("epoch")
    if not isinstance(value, str):
        raise ValueError(f"windows(): {what} must be an ISO 8601 datetime, got {value!r}")
    try:
        moment = parse_datetime(value)
    except ValueError:
        raise ValueError(f"windows(): {what} is not an ISO 8601 datetime: {value!r}") from None
    text = value.strip()
    if len(text) == 10 and "T" not in text.upper():
        return moment, _Shape("date")
    zoned = text[-1:] in ("Z", "z") or datetime.fromisoformat(text.upper()).tzinfo is not None
    return moment.astimezone(UTC), _Shape("datetime", zoned)


def _write(moment: datetime, shape: _Shape) -> Any:
    if shape.kind == "epoch":
        seconds = (moment - datetime(1970, 1, 1, tzinfo=UTC)) / timedelta(seconds=1)
        return int(seconds) if seconds == int(seconds) else seconds
    if shape.kind == "date":
        return moment.date().isoformat()
    return format_utc(moment, zone=shape.zone)


def format_utc(moment: datetime, *, zone: bool = True) -> str:
    """ISO 8601 in UTC: `2024-05-01T12:00:00Z`, with fractional seconds only when there are."""
    moment = moment.astimezone(UTC)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if moment.microsecond:
        text += f".{moment.microsecond:06d}".rstrip("0")
    return text + "Z" if zone else text


def windows(start: Any, end: Any, step: Any) -> list[dict[str, Any]]:
    """Half-open windows `[{start, end}, ...]` from `start` to `end` (None: now), each `step`
    long (an ISO 8601 duration); window k starts at start + k x step, computed from `start`
    so that month ends stay clamped per window; the last one ends at `end`. Boundaries are
    written as `start` was (a date, a UTC datetime, an epoch number)."""
    if start is None:
        raise ValueError("windows(): start is null")
    begin, shape = _read(start, "start")
    # A null end is now (the run's clock), to the second, as `now()` writes it.
    now = current_clock().now
    finish = now().replace(microsecond=0) if end is None else _read(end, "end")[0]
    if shape.kind == "date":
        # Date boundaries: the windows end on the end's day (a time of day cannot be written).
        finish = datetime.combine(finish.astimezone(UTC).date(), datetime.min.time(), UTC)
    if not isinstance(step, str):
        raise ValueError(f"windows(): step must be an ISO 8601 duration string, got {step!r}")
    duration = parse_duration(step)
    if duration.is_zero:
        raise ValueError(f"windows(): step {step!r} is zero")
    out: list[dict[str, Any]] = []
    current = begin
    k = 0
    while current < finish:
        k += 1
        try:
            following = min(shift(begin, duration.times(k)), finish)
        except ValueError:
            following = finish
        out.append({"start": _write(current, shape), "end": _write(following, shape)})
        if len(out) > MAX_WINDOWS:
            raise ValueError(
                f"windows(): more than {MAX_WINDOWS} windows from {start!r} by {step!r}; "
                "use a longer step or a later start"
            )
        current = following
    return out


def subtract_lookback(value: Any, lookback: str | float) -> Any:
    """A cursor value moved back by `lookback` (an ISO 8601 duration, or a number: seconds
    for a datetime, units for a number), written as the value was."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if isinstance(lookback, str):
            duration = parse_duration(lookback)
            if duration.months:
                moment = shift(datetime.fromtimestamp(value, UTC), duration, -1)
                return _write(moment, _Shape("epoch"))
            seconds = duration.fixed.total_seconds()
            return value - (int(seconds) if seconds == int(seconds) else seconds)
        return value - lookback
    moment, shape = _read(value, "the cursor")
    if isinstance(lookback, str):
        return _write(shift(moment, parse_duration(lookback), -1), shape)
    return _write(moment - timedelta(seconds=lookback), shape)


# --- datetimes from text --------------------------------------------------------------------

RFC_2822 = "%a, %d %b %Y %H:%M:%S %z"


def parse_datetime_text(text: Any, fmt: Any) -> str:
    """`text` read with the strftime format `fmt`, as ISO 8601 UTC with `Z`; no zone in the
    text means UTC. The RFC 2822 format also takes what mail and RSS dates really hold
    (`GMT`, `UT`, `EST`, no day name)."""
    if not isinstance(text, str):
        raise ValueError(f"parse_datetime(): expected a string, got {text!r}")
    if not isinstance(fmt, str):
        raise ValueError(f"parse_datetime(): the format must be a string, got {fmt!r}")
    stripped = text.strip()
    try:
        moment = datetime.strptime(stripped, fmt)
    except ValueError as exc:
        moment_or_none = _rfc_2822(stripped) if fmt.strip() == RFC_2822 else None
        if moment_or_none is None:
            raise ValueError(f"parse_datetime(): {text!r} does not match {fmt!r}") from exc
        moment = moment_or_none
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return format_utc(moment)


def _rfc_2822(text: str) -> datetime | None:
    from email.utils import parsedate_to_datetime

    try:
        return parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
