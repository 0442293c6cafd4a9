"""The state of a flow between runs: the `--state` file, and the protocol that a database
destination's state store follows too.

Its shape: `{"version": 1, "streams": {"<stream>": {"cursor": ...}}, "shards": {"I/N":
{"<stream>": {"cursor": ...}}}, "auth": {"<service>": {"refresh_token": ...}}}`; `streams`
and `shards` (one entry a shard, written by `--shard` runs) are tied to successful runs.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from typing import Any, Protocol

from runner.errors import UsageError

from .files import atomic_write, io_error
from .lockfile import lock_file, unlock_file
from .records import STATE_VERSION, state_entry


class StateBackend(Protocol):
    """Where a destination keeps a flow's state: the state file, or a database table."""

    def acquire(self) -> None: ...

    def release(self) -> None: ...

    def load(self) -> dict[str, Any]:
        """The whole state document; `streams` maps each stream to `{"cursor": ...}`."""
        ...

    def refresh_token(self, service: str) -> str | None: ...

    def save_refresh_token(self, service: str, token: str) -> None:
        """Store a rotated refresh token at once, whatever becomes of the run."""
        ...


def _empty_state() -> dict[str, Any]:
    return {"version": STATE_VERSION, "streams": {}, "auth": {}}


class StateStore:
    """The `--state` file: cursors of the last successful run and rotated refresh tokens.

    A lock on `path + ".lock"` (flock, released by the kernel if the holder dies) keeps two
    runs from overlapping; the lock file is never deleted, since deleting it would race.
    """

    def __init__(self, path: str, shard: str | None = None) -> None:
        self.path = path
        self.shard = shard  # `I/N`: this run's cursors go to `shards`, not `streams`
        self.lock_path = path + ".lock"
        self._lock_fd: int | None = None
        self._state: dict[str, Any] | None = None

    def acquire(self) -> None:
        if self._lock_fd is not None:
            return
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        except OSError as exc:
            raise UsageError(
                f"cannot open the lock file {self.lock_path}: {exc.strerror or exc}"
            ) from exc
        self._lock_fd = lock_file(self.lock_path, f"holds the state file {self.path}")
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
        unlock_file(fd)

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
        shards = data.get("shards", {})
        if not isinstance(shards, dict) or not all(
            isinstance(streams, dict) and all(isinstance(v, dict) for v in streams.values())
            for streams in shards.values()
        ):
            raise UsageError(
                f"state file {self.path}: 'shards' must map each shard (I/N) to its streams"
            )
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
            raise io_error("create the folder of", self.path, exc) from exc
        # 0o600: the auth part holds refresh tokens.
        atomic_write(self.path, data, mode=0o600)
        self._state = state

    def save_streams(self, cursors: Mapping[str, Any]) -> None:
        """Set the cursors of a successful run; streams not named, and the auth part, stay.

        A None cursor writes nothing for that stream (it has no state yet).
        """
        state = self._read()
        own = state["streams"]
        if self.shard is not None:
            own = state.setdefault("shards", {}).setdefault(self.shard, {})
        for stream, cursor in cursors.items():
            if cursor is not None:
                own.setdefault(stream, {}).update(state_entry(cursor))
        self._write(state)

    def save_refresh_token(self, service: str, token: str) -> None:
        """Store a rotated refresh token at once; the streams part stays as it is on disk."""
        state = self._read()
        state["auth"].setdefault(service, {})["refresh_token"] = token
        self._write(state)
