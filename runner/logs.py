"""Logging for machines and people: every record of the `runner` logger carries the run's
fields (run id, flow, step, item), log calls add their own (method, URL, status, attempt,
delay, duration, records), and `--log-format json` writes them as fields, one object a line.

The library only logs (a NullHandler keeps Python's last-resort handler quiet); `setup`, used
by the CLI, is what writes to stderr. A host's own handlers see the same fields as attributes
of each record (`record.step`, `record.url`, ...).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TextIO

from .redact import Redactor

log = logging.getLogger("runner")

# The structured fields, in the order a JSON line shows them. A log call passes its own with
# `extra={...}`; run_id, flow, step and item_index come from the context below.
FIELDS = (
    "run_id",
    "flow",
    "shard",
    "step",
    "item_index",
    "method",
    "url",
    "status",
    "attempt",
    "delay_s",
    "duration_ms",
    "records",
)
_CONTEXT_FIELDS = ("run_id", "flow", "shard", "step", "item_index")


class _Run:
    """The run being logged; `latest_step` is the step started last in any task (shown by
    the progress line)."""

    __slots__ = ("flow", "latest_step", "run_id", "shard")

    def __init__(self, run_id: str, flow: str) -> None:
        self.run_id = run_id
        self.flow = flow
        self.shard: str | None = None  # `I/N` under --shard
        self.latest_step: str | None = None


# Context variables, not arguments: the HTTP client logs attempts without knowing the step,
# and each for_each worker is a task with its own copy of the context.
_RUN: ContextVar[_Run | None] = ContextVar("runner_run", default=None)
_STEP: ContextVar[tuple[str, int | None] | None] = ContextVar("runner_step", default=None)


@contextlib.contextmanager
def run_context(run_id: str, flow: str) -> Iterator[_Run]:
    """Records logged inside carry `run_id` and `flow` (the flow's name can be set on the
    yielded object once the flow is loaded)."""
    run = _Run(run_id, flow)
    token = _RUN.set(run)
    # The step, too, is this run's: a run awaited in a host's task leaves the task's own
    # context as it found it.
    step_token = _STEP.set(None)
    try:
        yield run
    finally:
        _STEP.reset(step_token)
        _RUN.reset(token)


def enter_step(step: str, item_index: int | None = None) -> None:
    """Records logged from here on, in this task, carry `step` and `item_index`. The engine
    calls it as a step (or an item) starts; tasks it starts inherit it."""
    _STEP.set((step, item_index))
    run = _RUN.get()
    if run is not None:
        run.latest_step = step


def leave_step() -> None:
    """Records logged from here on, in this task, name no step (the run's closing lines)."""
    _STEP.set(None)


def current_run_step() -> str | None:
    """The step the current run started last (in whichever task)."""
    run = _RUN.get()
    return run.latest_step if run is not None else None


def one_line(text: str) -> str:
    """A failure's text (a head line, then indented detail lines) on one line, without the
    `body:` and `after N attempts` lines."""
    out = ""
    for line in text.split("\n"):
        part = line.strip()
        if not part or (line.startswith("  ") and part.startswith(("body: ", "after "))):
            continue
        out = part if not out else out + (" " if out.endswith(":") else ": ") + part
    return out


class _ContextFilter(logging.Filter):
    """Adds the context's fields to each record of the `runner` logger as it is made (in the
    caller's task, so a host that formats records in another thread still gets them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        run = _RUN.get()
        if run is not None:
            record.run_id = run.run_id
            record.flow = run.flow
            if run.shard is not None:
                record.shard = run.shard
        step = _STEP.get()
        if step is not None:
            if not hasattr(record, "step"):
                record.step = step[0]
            if step[1] is not None and not hasattr(record, "item_index"):
                record.item_index = step[1]
        return True


# Fields some lines add after those above: the run's totals on its closing line, and a
# failure's kind, attempts and body excerpt.
MORE_FIELDS = ("streams", "requests", "retries", "error", "attempts", "body")


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields a record carries, in FIELDS order, then MORE_FIELDS."""
    values = record.__dict__
    return {name: values[name] for name in FIELDS + MORE_FIELDS if values.get(name) is not None}


def error_fields(error: Exception, text: str) -> dict[str, Any]:
    """`extra=` for the line that reports a failed run (`text`, as printed): the failure's
    place as fields, and the text on one line (`short`) without the body and the attempts,
    which are fields of their own."""
    from .errors import RunError, RunnerError

    fields: dict[str, Any] = {"short": one_line(text)}
    if isinstance(error, RunnerError):
        fields["error"] = error.kind
    if isinstance(error, RunError):
        for name in ("step", "item_index", "method", "url", "status", "attempts", "body"):
            value = getattr(error, name)
            if value is not None:
                fields[name] = value
    return fields


# Once per process (the package's __init__ gives the logger its NullHandler).
if not any(isinstance(f, _ContextFilter) for f in log.filters):
    log.addFilter(_ContextFilter())


# -- the CLI's handler ----------------------------------------------------------------------


class RedactingFilter(logging.Filter):
    """Masks every known secret in a log record (its message, its string fields, its
    traceback), whatever formatter prints it."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        if self.redactor:
            record.msg = self.redactor.redact(record.getMessage())
            record.args = None
            for name in (*FIELDS, *MORE_FIELDS, "short"):
                value = record.__dict__.get(name)
                if isinstance(value, str):
                    setattr(record, name, self.redactor.redact(value))
            if record.exc_info:
                # A traceback quotes exception messages, which may hold a secret.
                text = logging.Formatter().formatException(record.exc_info)
                record.exc_text = self.redactor.redact(text)
                record.exc_info = None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, message, then the structured fields."""

    def format(self, record: logging.LogRecord) -> str:
        short = record.__dict__.get("short")
        data: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "level": record.levelname.lower(),
            # A failure's text spells out its place over several lines; here the place is in
            # the fields, and the message is the failure's own.
            "message": short if isinstance(short, str) and short else record.getMessage(),
        }
        data.update(fields_of(record))
        if record.exc_text:
            data["traceback"] = record.exc_text
        return json.dumps(data, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """`runner: INFO: message` for people; the fields are already in the message's words.
    A shard's lines say which shard they are from: `runner 1/4: INFO: message`."""

    def __init__(self) -> None:
        super().__init__("runner: %(levelname)s: %(message)s")
        self._sharded = logging.Formatter("runner %(shard)s: %(levelname)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if isinstance(record.__dict__.get("shard"), str):
            return self._sharded.format(record)
        return super().format(record)


class Handler(logging.StreamHandler[TextIO]):
    """The CLI's stderr handler. A progress line registers `around` so that a log line is
    written on a cleared line and the progress line is drawn again below it."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self.around: tuple[Callable[[], None], Callable[[], None]] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        around = self.around
        if around is None:
            super().emit(record)
            return
        around[0]()  # handle() holds the handler's lock around emit
        try:
            super().emit(record)
        finally:
            around[1]()


def setup(
    fmt: str, redactor: Redactor, verbose: bool = False, stream: TextIO | None = None
) -> Handler:
    """The CLI's logging: text or JSON lines on stderr, secrets masked; INFO, or DEBUG with -v."""
    handler = Handler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RedactingFilter(redactor))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False
    return handler
