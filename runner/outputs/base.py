"""The destination seam: one interface that every destination implements.

The engine hands records to an `Outputs` and never asks which one it has. A run calls, in
order: `acquire` (locks, and the state store's lock), `open` (before the first request),
`write` / `write_many` (a batch of one stream's records), then `commit` with the new
cursors on success or `abort` on failure, and `release` at the end whatever happened.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from runner.errors import InvalidRecordError

from .records import MESSAGE_CHARS, StreamSpec, _Check

if TYPE_CHECKING:
    from .state import StateBackend

_MESSAGE_CHARS = MESSAGE_CHARS


class Outputs(ABC):
    """Where a run's records go: checks each record, tracks cursors, hands it to the
    destination's `_write_line` (or a page of them to `write_many`)."""

    #: The state of the flow kept by this destination (cursors, refresh tokens), or None.
    state: StateBackend | None = None

    def __init__(self, streams: Mapping[str, StreamSpec]) -> None:
        self._checks: dict[str, _Check] = {name: _Check(spec) for name, spec in streams.items()}
        self.counts: dict[str, int] = {}
        self.invalid_skipped: dict[str, int] = {}

    def acquire(self) -> None:
        """Take the locks of this destination and of its state (exit 75 when held), before
        anything else; UsageError or UnavailableError if it cannot be reached."""
        if self.state is not None:
            self.state.acquire()

    def release(self) -> None:
        """Give back what `acquire` took; called once at the end of every run."""
        if self.state is not None:
            self.state.release()

    @abstractmethod
    def open(self) -> None:
        """Prepare the sink before the first request; UsageError if it cannot be written."""

    @abstractmethod
    def _write_line(self, stream: str, record: dict[str, Any]) -> None: ...

    @abstractmethod
    def commit(
        self, cursors: Mapping[str, Any], cut_short: Collection[str] = ()
    ) -> dict[str, Any] | None:
        """Finish a successful run: publish the records and the new cursors together (a None
        cursor keeps the stream's old state). `cut_short` names the streams whose step left
        pages or items unfetched. Returns the manifest, if the sink has one."""

    @abstractmethod
    def abort(self) -> None:
        """Finish a failed or interrupted run: publish nothing."""

    def describe(self) -> str:
        """Where the records went, for the log line of a successful run."""
        return type(self).__name__

    def write(self, stream: str, record: dict[str, Any]) -> None:
        """Check, track the cursor, write. InvalidRecordError unless the stream skips it."""
        check = self._checks.get(stream)
        if check is None:  # an undeclared stream: nothing to check
            check = self._checks[stream] = _Check(None)
        validator = check.validator
        if validator is not None and not validator.is_valid(record):
            if check.skip:
                self.invalid_skipped[stream] = self.invalid_skipped.get(stream, 0) + 1
                return
            from jsonschema.exceptions import best_match

            error = best_match(validator.iter_errors(record))
            message = error.message if error is not None else "invalid"
            if len(message) > _MESSAGE_CHARS:
                message = message[: _MESSAGE_CHARS - 3] + "..."
            where = error.json_path if error is not None else "$"
            raise InvalidRecordError(
                f"stream '{stream}': record {self.counts.get(stream, 0) + 1} does not match "
                f"the schema at {where}: {message}"
            )
        if check.cursor is not None:
            check.cursor.offer(record)
        self._write_line(stream, record)
        self.counts[stream] = self.counts.get(stream, 0) + 1

    def write_many(self, stream: str, records: Iterable[dict[str, Any]]) -> None:
        """`write` each record in turn: the same checks, counts and errors (the records
        before a failing one are written). Sinks override it with a faster loop."""
        write = self.write
        for record in records:
            write(stream, record)

    def new_cursors(self, old: Mapping[str, Any]) -> dict[str, Any]:
        """Per stream with a cursor: the greatest of `old[stream]` and every emitted value.

        A stream with no cursor value keeps its old one (None if it had none).
        """
        out: dict[str, Any] = {}
        for name, check in self._checks.items():
            if check.cursor is not None:
                out[name] = check.cursor.merged_with(old.get(name))
        return out
