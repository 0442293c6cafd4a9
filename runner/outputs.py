"""Stream writers, record checks, cursors, atomic commit with a manifest, and the state file.

Records are never kept: each one is checked, offered to its stream's cursor and written.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, TextIO

from runner.decode import json_dumps_line, json_dumps_line_bytes
from runner.errors import InvalidRecordError, LockedError, RunError, UsageError
from runner.expressions import parse_datetime

if TYPE_CHECKING:
    from jsonschema import Draft202012Validator

__all__ = [
    "FileOutputs",
    "Outputs",
    "StateStore",
    "StdoutOutputs",
    "StreamSpec",
    "atomic_write",
]

CURSOR_TYPES: Final = frozenset({"datetime", "number", "string"})
ON_INVALID: Final = frozenset({"fail", "skip"})
STATE_VERSION: Final = 1

# A stream name becomes a file name: no separators, no leading dot (hidden partials use one).
_STREAM_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_BATCH_BYTES: Final = 1 << 20  # buffered per write(2): few syscalls, bounded memory
_MESSAGE_CHARS: Final = 300

_ASCII_ENCODER: Final = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"))


def _encode_line(obj: Any) -> bytes:
    """`obj` as one JSONL line in UTF-8. TypeError or ValueError if it is not JSON data."""
    try:
        return json_dumps_line_bytes(obj)
    except UnicodeEncodeError:
        # A lone surrogate (from a JSON "\ud800") cannot be UTF-8: escape it, still valid JSON.
        return (_ASCII_ENCODER.encode(obj) + "\n").encode("ascii")


def _utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """What `outputs.<stream>` declares: identity, cursor, schema and what to do on a bad record."""

    name: str
    primary_key: tuple[str, ...] = ()
    cursor_field: str | None = None
    # None compares by JSON type (numbers as numbers, strings as strings).
    cursor_type: str | None = None
    schema: Mapping[str, Any] | None = None
    on_invalid: str = "fail"

    def __post_init__(self) -> None:
        if not _STREAM_NAME.fullmatch(self.name):
            raise UsageError(
                f"stream name {self.name!r}: use letters, digits, '_', '-' and '.', "
                "not starting with '.' or '-'"
            )
        if self.on_invalid not in ON_INVALID:
            raise UsageError(
                f"outputs.{self.name}.on_invalid: {self.on_invalid!r} is not one of fail, skip"
            )
        if self.cursor_type is not None and self.cursor_type not in CURSOR_TYPES:
            raise UsageError(
                f"outputs.{self.name}.cursor.type: {self.cursor_type!r} is not one of "
                "datetime, number, string"
            )
        if self.cursor_type is not None and self.cursor_field is None:
            raise UsageError(f"outputs.{self.name}.cursor: a type needs a field")
        if self.cursor_field == "":
            raise UsageError(f"outputs.{self.name}.cursor.field: must not be empty")


# --------------------------------------------------------------------------- cursors

_MISSING: Final = object()


class _Cursor:
    """The greatest cursor value seen in one stream, kept as (comparable key, original value)."""

    __slots__ = ("best", "best_key", "field", "kind", "parts", "stream", "type")

    def __init__(self, stream: str, field: str, cursor_type: str | None) -> None:
        self.stream = stream
        self.field = field
        # A literal top-level key wins; otherwise a dotted name walks nested objects.
        self.parts = tuple(field.split(".")) if "." in field else ()
        self.type = cursor_type
        self.kind: str | None = cursor_type
        self.best: Any = None
        self.best_key: Any = None

    def read(self, record: Mapping[str, Any]) -> Any:
        value = record.get(self.field, _MISSING)
        if value is _MISSING:
            if not self.parts:
                return None
            node: Any = record
            for part in self.parts:
                if not isinstance(node, Mapping):
                    return None
                node = node.get(part)
            return node
        return value

    def key(self, value: Any, origin: str) -> tuple[str, Any]:
        """(kind, comparable) for a value; RunError if it cannot be a cursor of this stream."""
        kind = self.type
        if kind == "datetime":
            try:
                # Fractions past microseconds are cut: values differing only there are equal.
                parsed = parse_datetime(value)
            except ValueError as exc:
                raise RunError(
                    f"stream '{self.stream}': cursor field '{self.field}' {origin} "
                    f"{_short(value)} is not an ISO 8601 datetime",
                    kind="cursor",
                ) from exc
            return kind, parsed
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise RunError(
                f"stream '{self.stream}': cursor field '{self.field}' {origin} "
                f"{_short(value)} is not a {kind or 'number or string'}",
                kind="cursor",
            )
        found = "string" if isinstance(value, str) else "number"
        if kind is not None and found != kind:
            raise RunError(
                f"stream '{self.stream}': cursor field '{self.field}' {origin} "
                f"{_short(value)} is not a {kind}",
                kind="cursor",
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise RunError(
                f"stream '{self.stream}': cursor field '{self.field}' {origin} "
                f"{_short(value)} is not a finite number",
                kind="cursor",
            )
        return found, value

    def offer(self, record: Mapping[str, Any]) -> None:
        value = self.read(record)
        if value is None or (value == self.best and type(value) is type(self.best)):
            return
        kind, key = self.key(value, "value")
        self._take(kind, key, value)

    def _take(self, kind: str, key: Any, value: Any) -> None:
        if self.best_key is None:
            self.kind, self.best_key, self.best = kind, key, value
            return
        if kind != self.kind:
            raise RunError(
                f"stream '{self.stream}': cursor field '{self.field}' mixes types: "
                f"{_short(self.best)} and {_short(value)}; declare cursor.type",
                kind="cursor",
            )
        if key > self.best_key:
            self.best_key, self.best = key, value

    def merged_with(self, old: Any) -> Any:
        """The greatest of the old cursor and every value seen; the old one if none was seen."""
        if self.best_key is None or old is None:
            return old if self.best_key is None else self.best
        kind, key = self.key(old, "in the state file:")
        if kind != self.kind:
            raise RunError(
                f"stream '{self.stream}': cursor field '{self.field}' in the state file "
                f"{_short(old)} and the new value {_short(self.best)} differ in type",
                kind="cursor",
            )
        return self.best if self.best_key > key else old


# --------------------------------------------------------------------------- outputs


class _Check:
    """Per-stream compiled checks: the schema validator and the cursor."""

    __slots__ = ("cursor", "skip", "validator")

    def __init__(self, spec: StreamSpec | None) -> None:
        self.validator: Draft202012Validator | None = None
        self.skip = False
        self.cursor: _Cursor | None = None
        if spec is None:
            return
        if spec.schema is not None:
            # Imported only for a stream with a schema: jsonschema costs ~30 ms to import.
            from jsonschema import Draft202012Validator
            from jsonschema.exceptions import SchemaError

            try:
                Draft202012Validator.check_schema(spec.schema)
            except SchemaError as exc:
                raise UsageError(
                    f"outputs.{spec.name}.schema: not a valid JSON Schema: {exc.message}"
                ) from exc
            self.validator = Draft202012Validator(spec.schema)
        self.skip = spec.on_invalid == "skip"
        if spec.cursor_field is not None:
            self.cursor = _Cursor(spec.name, spec.cursor_field, spec.cursor_type)


class Outputs(ABC):
    """The sink of a run's records: checks each record, tracks cursors, writes a line."""

    def __init__(self, streams: Mapping[str, StreamSpec]) -> None:
        self._checks: dict[str, _Check] = {name: _Check(spec) for name, spec in streams.items()}
        self.counts: dict[str, int] = {}
        self.invalid_skipped: dict[str, int] = {}

    @abstractmethod
    def open(self) -> None:
        """Prepare the sink before the first request; UsageError if it cannot be written."""

    @abstractmethod
    def _write_line(self, stream: str, record: dict[str, Any]) -> None: ...

    @abstractmethod
    def commit(self) -> dict[str, Any] | None:
        """Finish a successful run; returns the manifest, if the sink has one."""

    @abstractmethod
    def abort(self) -> None:
        """Finish a failed or interrupted run: keep what was written, publish nothing."""

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


def _io_error(action: str, path: str, exc: OSError) -> RunError:
    return RunError(f"cannot {action} {path}: {exc.strerror or exc}", kind="io")


class _FileSink:
    """One stream's partial file, its line buffer and its running sha256."""

    __slots__ = ("buffer", "count", "fd", "final", "partial", "sha256")

    def __init__(self, final: str, partial: str) -> None:
        self.final = final
        self.partial = partial
        # A bytearray, not a list of lines: thousands of live orjson results are slow.
        self.buffer = bytearray()
        self.sha256 = hashlib.sha256()
        self.count = 0
        self.fd: int | None = None

    def flush(self) -> None:
        if not self.buffer or self.fd is None:
            return
        chunk = bytes(self.buffer)
        self.buffer.clear()
        self.sha256.update(chunk)
        view = memoryview(chunk)
        while view:
            view = view[os.write(self.fd, view) :]

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)


class FileOutputs(Outputs):
    """One `<stream>.jsonl` per stream in a folder, published on commit with `manifest.json`."""

    def __init__(
        self,
        output_dir: str,
        run_id: str,
        streams: Mapping[str, StreamSpec],
        emitted: Iterable[str],
        started_at: datetime,
    ) -> None:
        super().__init__(streams)
        if started_at.tzinfo is None:
            started_at = started_at.replace(tzinfo=UTC)
        date = started_at.astimezone(UTC).strftime("%Y-%m-%d")
        self.run_id = run_id
        self.directory = output_dir.replace("{run_id}", run_id).replace("{date}", date)
        self._sinks: dict[str, _FileSink] = {}
        self._state = "new"  # new -> open -> committed | aborted
        for name in sorted({*streams, *emitted}):
            self._add_sink(name)

    def _add_sink(self, stream: str) -> _FileSink:
        if not _STREAM_NAME.fullmatch(stream):
            raise UsageError(f"stream name {stream!r} cannot be a file name")
        sink = _FileSink(
            os.path.join(self.directory, f"{stream}.jsonl"),
            os.path.join(self.directory, f".{stream}.jsonl.{self.run_id}.partial"),
        )
        self._sinks[stream] = sink
        self.counts.setdefault(stream, 0)
        return sink

    def _open_sink(self, sink: _FileSink) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        sink.fd = os.open(sink.partial, flags, 0o666)

    def open(self) -> None:
        if self._state != "new":
            raise RuntimeError(f"FileOutputs.open() called when {self._state}")
        try:
            os.makedirs(self.directory, exist_ok=True)
            for sink in self._sinks.values():
                self._open_sink(sink)
        except OSError as exc:
            self.abort()
            raise UsageError(
                f"output directory {self.directory} is not writable: {exc.strerror or exc}"
            ) from exc
        self._state = "open"

    def _write_line(self, stream: str, record: dict[str, Any]) -> None:
        sink = self._sinks.get(stream)
        if sink is None:
            if self._state != "open":
                raise RuntimeError(f"FileOutputs.write() called when {self._state}")
            sink = self._add_sink(stream)
            try:
                self._open_sink(sink)
            except OSError as exc:
                raise _io_error("create", sink.partial, exc) from exc
        if sink.fd is None:
            raise RuntimeError(f"FileOutputs.write() called when {self._state}")
        try:
            sink.buffer += _encode_line(record)
        except (TypeError, ValueError) as exc:
            raise RunError(
                f"stream '{stream}': record cannot be written as JSON: {exc}", kind="io"
            ) from exc
        sink.count += 1
        if len(sink.buffer) >= _BATCH_BYTES:
            try:
                sink.flush()
            except OSError as exc:
                raise _io_error("write", sink.partial, exc) from exc

    def write_many(self, stream: str, records: Iterable[dict[str, Any]]) -> None:
        check = self._checks.get(stream)
        sink = self._sinks.get(stream)
        if check is None or check.validator is not None or sink is None or sink.fd is None:
            super().write_many(stream, records)
            return
        # One page of records in a tight loop: what `write` and `_write_line` do per record,
        # with the lookups hoisted out of it.
        offer = check.cursor.offer if check.cursor is not None else None
        buffer = sink.buffer
        written = 0
        try:
            for record in records:
                if offer is not None:
                    offer(record)
                try:
                    buffer += _encode_line(record)
                except (TypeError, ValueError) as exc:
                    raise RunError(
                        f"stream '{stream}': record cannot be written as JSON: {exc}", kind="io"
                    ) from exc
                written += 1
        finally:
            sink.count += written
            self.counts[stream] = self.counts.get(stream, 0) + written
        if len(buffer) >= _BATCH_BYTES:
            try:
                sink.flush()
            except OSError as exc:
                raise _io_error("write", sink.partial, exc) from exc

    def commit(self) -> dict[str, Any]:
        if self._state != "open":
            raise RuntimeError(f"FileOutputs.commit() called when {self._state}")
        manifest_streams: dict[str, Any] = {}
        try:
            for sink in self._sinks.values():
                sink.flush()
                assert sink.fd is not None
                os.fsync(sink.fd)
                sink.close()
            for name, sink in self._sinks.items():
                os.replace(sink.partial, sink.final)
                manifest_streams[name] = {
                    "file": os.path.basename(sink.final),
                    "count": sink.count,
                    "sha256": sink.sha256.hexdigest(),
                }
            # Make the renames durable before the manifest can claim them.
            _fsync_dir(self.directory)
        except OSError as exc:
            self.abort()
            raise RunError(
                f"cannot publish the outputs in {self.directory}: {exc.strerror or exc}",
                kind="io",
            ) from exc
        manifest = {
            "run_id": self.run_id,
            "finished_at": _utc_now_iso(),
            "streams": manifest_streams,
        }
        data = (json.dumps(manifest, ensure_ascii=False, indent=2) + "\n").encode("utf-8")
        self._state = "failed"
        atomic_write(os.path.join(self.directory, "manifest.json"), data)
        self._state = "committed"
        return manifest

    def abort(self) -> None:
        """Write what is buffered to the partials and close them; the last good files stay."""
        for sink in self._sinks.values():
            with contextlib.suppress(OSError):
                sink.flush()
            with contextlib.suppress(OSError):
                sink.close()
        if self._state in ("new", "open"):
            self._state = "aborted"


class StdoutOutputs(Outputs):
    """NDJSON on a text stream, one `{"stream": ..., "record": {...}}` line per record."""

    def __init__(self, streams: Mapping[str, StreamSpec], out: TextIO = sys.stdout) -> None:
        super().__init__(streams)
        self._out = out
        for name in streams:
            self.counts.setdefault(name, 0)

    def open(self) -> None:
        pass

    def _write_line(self, stream: str, record: dict[str, Any]) -> None:
        try:
            line = json_dumps_line({"stream": stream, "record": record})
        except (TypeError, ValueError) as exc:
            raise RunError(
                f"stream '{stream}': record cannot be written as JSON: {exc}", kind="io"
            ) from exc
        try:
            self._out.write(line + "\n")
            # Flushed per line so that a consumer of the pipe sees each record as it comes.
            self._out.flush()
        except UnicodeEncodeError:
            self._out.write(_ASCII_ENCODER.encode({"stream": stream, "record": record}) + "\n")
            self._out.flush()
        except OSError as exc:
            raise RunError(f"cannot write to stdout: {exc.strerror or exc}", kind="io") from exc

    def commit(self) -> dict[str, Any] | None:
        with contextlib.suppress(OSError, ValueError):
            self._out.flush()
        return None

    def abort(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._out.flush()


# --------------------------------------------------------------------------- files and state


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory or ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some filesystems cannot fsync a directory; the rename is still atomic there.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _atomic_write(path: str, data: bytes, mode: int) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    temp = os.path.join(directory, f".{os.path.basename(path)}.{os.urandom(6).hex()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    _fsync_dir(directory)


def atomic_write(path: str, data: bytes, mode: int = 0o666) -> None:
    """Replace `path` with `data` so that a crash leaves either the old or the new file.

    Temp file in the same folder, write, fsync, `os.replace`, fsync the folder. `mode` is
    masked by the umask. An OSError becomes a RunError naming the file.
    """
    try:
        _atomic_write(path, data, mode)
    except OSError as exc:
        raise _io_error("write", path, exc) from exc


def _empty_state() -> dict[str, Any]:
    return {"version": STATE_VERSION, "streams": {}, "auth": {}}


class StateStore:
    """The `--state` file: cursors of the last successful run and rotated refresh tokens.

    A lock on `path + ".lock"` (flock, released by the kernel if the holder dies) keeps two
    runs from overlapping; the lock file is never deleted, since deleting it would race.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock_path = path + ".lock"
        self._lock_fd: int | None = None
        self._state: dict[str, Any] | None = None

    def acquire(self) -> None:
        if self._lock_fd is not None:
            return
        try:
            directory = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(directory, exist_ok=True)
            fd = os.open(
                self.lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666
            )
        except OSError as exc:
            raise UsageError(
                f"cannot open the lock file {self.lock_path}: {exc.strerror or exc}"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise LockedError(
                    f"another run holds the state file {self.path} (lock {self.lock_path})"
                ) from exc
            raise UsageError(f"cannot lock {self.lock_path}: {exc.strerror or exc}") from exc
        self._lock_fd = fd
        self._remove_stale_temp_files()

    def _remove_stale_temp_files(self) -> None:
        # Left by a writer killed mid-write; only the lock holder may write, so none is live.
        directory = os.path.dirname(os.path.abspath(self.path))
        prefix = f".{os.path.basename(self.path)}."
        with contextlib.suppress(OSError):
            for name in os.listdir(directory):
                if name.startswith(prefix) and name.endswith(".tmp"):
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(directory, name))

    def release(self) -> None:
        if self._lock_fd is None:
            return
        fd, self._lock_fd = self._lock_fd, None
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> StateStore:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def _read(self) -> dict[str, Any]:
        try:
            with open(self.path, "rb") as fh:
                raw = fh.read()
        except FileNotFoundError:
            return _empty_state()
        except OSError as exc:
            raise UsageError(
                f"state file {self.path} cannot be read: {exc.strerror or exc}"
            ) from exc
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            raise UsageError(f"state file {self.path} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise UsageError(f"state file {self.path}: expected a JSON object")
        if data.get("version", STATE_VERSION) != STATE_VERSION:
            raise UsageError(
                f"state file {self.path}: version {data.get('version')!r} is not supported "
                f"(expected {STATE_VERSION})"
            )
        for part in ("streams", "auth"):
            value = data.setdefault(part, {})
            if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
                raise UsageError(f"state file {self.path}: '{part}' must map names to objects")
        data["version"] = STATE_VERSION
        return data

    def load(self) -> dict[str, Any]:
        self._state = self._read()
        return self._state

    def _loaded(self) -> dict[str, Any]:
        return self._state if self._state is not None else self.load()

    def stream_cursor(self, stream: str) -> Any:
        entry = self._loaded()["streams"].get(stream)
        return entry.get("cursor") if entry is not None else None

    def refresh_token(self, service: str) -> str | None:
        entry = self._loaded()["auth"].get(service)
        token = entry.get("refresh_token") if entry is not None else None
        return token if isinstance(token, str) else None

    def _write(self, state: dict[str, Any]) -> None:
        data = (json.dumps(state, ensure_ascii=False, indent=2) + "\n").encode("utf-8")
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        except OSError as exc:
            raise _io_error("create the folder of", self.path, exc) from exc
        # 0o600: the auth part holds refresh tokens.
        atomic_write(self.path, data, mode=0o600)
        self._state = state

    def save_streams(self, cursors: Mapping[str, Any]) -> None:
        """Set the cursors of a successful run; streams not named, and the auth part, stay.

        A None cursor writes nothing for that stream (it has no state yet).
        """
        state = self._read()
        for stream, cursor in cursors.items():
            if cursor is not None:
                state["streams"].setdefault(stream, {})["cursor"] = cursor
        self._write(state)

    def save_refresh_token(self, service: str, token: str) -> None:
        """Store a rotated refresh token at once; the streams part stays as it is on disk."""
        state = self._read()
        state["auth"].setdefault(service, {})["refresh_token"] = token
        self._write(state)
