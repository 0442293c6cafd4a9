"""Incremental streams between runs: what templates see as `state.<stream>` (the cursor, or
`cursor.start` before the first run, and `since`, the cursor moved back by `lookback`), and
`skip_seen`, which drops the records an inclusive `updated_since` sends again: those below
the stored cursor, and those at it whose key was already emitted there. The keys at the
greatest value are kept in the state beside the cursor."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from runner.errors import RunError
from runner.outputs.records import StreamSpec, StreamState, _Cursor
from runner.timeutil import subtract_lookback

__all__ = ["SeenFilter", "seen_filters", "state_scope"]


def state_scope(
    streams: Mapping[str, StreamSpec], saved: Mapping[str, Any], names: Iterable[str]
) -> dict[str, dict[str, Any]]:
    """`state.<stream>` for templates: `cursor` (the stored one, else `cursor.start`) and
    `since` (the stored cursor minus `lookback`, else `start`, else null)."""
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        entry = saved.get(name)
        stored = entry.get("cursor") if isinstance(entry, dict) else None
        spec = streams.get(name)
        start = spec.cursor_start if spec is not None else None
        since = stored
        if stored is not None and spec is not None and spec.cursor_lookback is not None:
            try:
                since = subtract_lookback(stored, spec.cursor_lookback)
            except ValueError as exc:
                raise RunError(
                    f"stream '{name}': cursor.lookback cannot apply to the stored cursor "
                    f"{stored!r}: {exc}",
                    kind="cursor",
                ) from exc
        out[name] = {
            "cursor": stored if stored is not None else start,
            "since": since if stored is not None else start,
        }
    return out


def _ident(record: Mapping[str, Any], key: tuple[str, ...]) -> str:
    # JSON text: hashable for any key value, and 1 and 1.0 are one key, as JSON has them.
    return json.dumps([record.get(k) for k in key], separators=(",", ":"), sort_keys=True)


class SeenFilter:
    """One `skip_seen` stream: `keep(record)` drops what was emitted before; `state(cursor)`
    is what to commit with the run's new cursor."""

    __slots__ = (
        "_best",
        "_best_key",
        "_best_seen",
        "_cursor",
        "_key",
        "_lower_key",
        "_old_seen",
        "_stored",
        "_stored_key",
    )

    def __init__(self, spec: StreamSpec, entry: Mapping[str, Any] | None) -> None:
        assert spec.cursor_field is not None
        self._cursor = _Cursor(spec.name, spec.cursor_field, spec.cursor_type)
        self._key = spec.primary_key
        self._stored = entry.get("cursor") if entry is not None else None
        self._stored_key = self._comparable(self._stored)
        lower = self._stored if self._stored is not None else spec.cursor_start
        self._lower_key = self._comparable(lower)
        seen = entry.get("seen") if entry is not None and self._stored is not None else None
        self._old_seen: set[str] = set()
        for key in seen if isinstance(seen, list) else ():
            if isinstance(key, list):
                self._old_seen.add(json.dumps(key, separators=(",", ":"), sort_keys=True))
        self._best: Any = None
        self._best_key: Any = None
        self._best_seen: set[str] = set()

    def _comparable(self, value: Any) -> Any:
        if value is None:
            return None
        return self._cursor.key(value, "in the state file:")

    def keep(self, record: Any) -> bool:
        if not isinstance(record, Mapping):
            return True
        value = self._cursor.read(record)
        if value is None:
            return True  # no cursor to judge by: it passes
        found = self._cursor.key(value, "value")
        lower = self._lower_key
        if lower is not None:
            if found[0] != lower[0]:
                raise RunError(
                    f"stream '{self._cursor.stream}': cursor field '{self._cursor.field}' "
                    f"value {value!r} cannot be compared with the stored cursor",
                    kind="cursor",
                )
            if found[1] < lower[1]:
                return False
        ident = _ident(record, self._key)
        if found == self._stored_key and ident in self._old_seen:
            return False
        best = self._best_key
        if best is None or found[1] > best[1]:
            self._best_key, self._best, self._best_seen = found, value, {ident}
        elif found[1] == best[1]:
            if ident in self._best_seen:
                return False  # the same record twice in this run
            self._best_seen.add(ident)
        return True

    def state(self, cursor: Any) -> StreamState | None:
        """The entry to commit with `cursor` (the run's new cursor of the stream)."""
        if cursor is None:
            return None
        key = self._comparable(cursor)
        seen: set[str] = set()
        if self._stored_key is not None and key == self._stored_key:
            seen |= self._old_seen
        if self._best_key is not None and key == self._best_key:
            seen |= self._best_seen
        return StreamState(cursor, tuple(tuple(json.loads(k)) for k in sorted(seen)))


def seen_filters(
    streams: Mapping[str, StreamSpec], saved: Mapping[str, Any]
) -> dict[str, SeenFilter]:
    return {
        name: SeenFilter(spec, saved.get(name) if isinstance(saved.get(name), dict) else None)
        for name, spec in streams.items()
        if spec.skip_seen
    }
