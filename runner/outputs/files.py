"""JSONL files in a folder (the default destination) and NDJSON on stdout.

Files: one `<stream>.jsonl` per stream, written to a hidden partial during the run and
published on commit with `manifest.json`, then the state file. A run locks its folder.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import sys
from collections.abc import Collection, Iterable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, TextIO

from runner.codec import json_dumps_line, json_dumps_line_bytes
from runner.errors import LockedError, RunError, UsageError

from .base import Outputs
from .lockfile import lock_file, unlock_file
from .records import STREAM_NAME, StreamSpec

if TYPE_CHECKING:
    from .state import StateStore

_BATCH_BYTES: Final = 1 << 20  # buffered per write(2): few syscalls, bounded memory
_ASCII_ENCODER: Final = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"))
LOCK_NAME: Final = ".runner.lock"
# `.<stream>.jsonl.<run id>.partial`, what a run writes before its commit, and the temp file
# of an interrupted manifest write.
_PARTIAL: Final = re.compile(
    r"\.[A-Za-z0-9_][A-Za-z0-9_.-]*\.jsonl\.[0-9]{8}T[0-9]{6}Z-[0-9a-f]+\.partial"
    r"|\.manifest\.json\.[0-9a-f]{12}\.tmp"
)


def _encode_line(obj: Any) -> bytes:
    """`obj` as one JSONL line in UTF-8. TypeError or ValueError if it is not JSON data."""
    try:
        return json_dumps_line_bytes(obj)
    except UnicodeEncodeError:
        # A lone surrogate (from a JSON "\ud800") cannot be UTF-8: escape it, still valid JSON.
        return (_ASCII_ENCODER.encode(obj) + "\n").encode("ascii")


def _utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def io_error(action: str, path: str, exc: OSError) -> RunError:
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
        state: StateStore | None = None,
        shard: str | None = None,
    ) -> None:
        super().__init__(streams)
        self.state = self._store = state
        self.shard = shard
        self._lock_fd: int | None = None
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
        if not STREAM_NAME.fullmatch(stream):
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

    def acquire(self) -> None:
        """Lock the folder (a second run into it exits 75), then remove the partial files that
        dead runs left there: while the lock is held, no other run writes into the folder."""
        super().acquire()
        not_writable = f"output directory {self.directory} is not writable"
        try:
            try:
                os.makedirs(self.directory, exist_ok=True)
            except OSError as exc:
                raise UsageError(f"{not_writable}: {exc.strerror or exc}") from exc
            self._lock_fd = lock_file(
                os.path.join(self.directory, LOCK_NAME),
                f"writes into the output directory {self.directory}",
                not_writable,
            )
        except (UsageError, LockedError):
            super().release()
            raise
        with contextlib.suppress(OSError):
            for name in os.listdir(self.directory):
                if _PARTIAL.fullmatch(name) and f".{self.run_id}." not in name:
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(self.directory, name))

    def release(self) -> None:
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            unlock_file(fd)
        super().release()

    def describe(self) -> str:
        return self.directory

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
                raise io_error("create", sink.partial, exc) from exc
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
                raise io_error("write", sink.partial, exc) from exc

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
                raise io_error("write", sink.partial, exc) from exc

    def commit(
        self, cursors: Mapping[str, Any] | None = None, cut_short: Collection[str] = ()
    ) -> dict[str, Any]:
        """Publish: each stream file renamed into place, then the manifest (the commit
        point), then the state file's cursors."""
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
            "shard": self.shard,
            "finished_at": _utc_now_iso(),
            "streams": manifest_streams,
        }
        data = (json.dumps(manifest, ensure_ascii=False, indent=2) + "\n").encode("utf-8")
        self._state = "failed"
        atomic_write(os.path.join(self.directory, "manifest.json"), data)
        self._state = "committed"
        if self._store is not None and cursors is not None:
            self._store.save_streams(cursors)
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

    def __init__(
        self,
        streams: Mapping[str, StreamSpec],
        out: TextIO = sys.stdout,
        state: StateStore | None = None,
    ) -> None:
        super().__init__(streams)
        self.state = self._store = state
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

    def describe(self) -> str:
        return "stdout"

    def commit(
        self, cursors: Mapping[str, Any] | None = None, cut_short: Collection[str] = ()
    ) -> dict[str, Any] | None:
        with contextlib.suppress(OSError, ValueError):
            self._out.flush()
        if self._store is not None and cursors is not None:
            self._store.save_streams(cursors)
        return None

    def abort(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._out.flush()


# --------------------------------------------------------------------------- atomic files


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
        raise io_error("write", path, exc) from exc
