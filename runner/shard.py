"""Sharding: one flow split into N independent runs (`--shard I/N`), each taking the items of
its `shard: true` for_each steps whose stable hash is I modulo N.

The hash is the first 8 bytes, big-endian, of the SHA-256 of the item's canonical JSON
(sorted keys, separators `,` `:`, UTF-8), or of its `shard_key` value's: the same on every
machine and Python version, unlike `hash()`. Each shard keeps its cursors under its own key
(`I/N`); a shard with no entry of its own starts from the smallest cursor any other layout
(the unsharded run, another N) holds, so that changing N never skips a record
(docs/SCALING.md).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from .errors import RunError, UsageError
from .outputs.records import StreamSpec, _Cursor

PLACEHOLDER: Final = "{shard}"
# With --shard, JSONL files go to a folder of each shard's own unless --output-dir says where.
DEFAULT_OUTPUT_DIR: Final = "out/{shard}"

_FORM = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True, slots=True)
class Shard:
    """This run's part of the flow: index I of N."""

    index: int
    count: int

    @property
    def key(self) -> str:
        """`I/N`: its entry in the state, its row in `_runner_state`, its name in the logs."""
        return f"{self.index}/{self.count}"

    def owns(self, value: Any) -> bool:
        return bucket(value, self.count) == self.index

    def fill(self, path: str) -> str:
        """`--output-dir` or `--state` with `{shard}` replaced by the index."""
        return path.replace(PLACEHOLDER, str(self.index))


def parse_shard(text: str, where: str = "--shard") -> Shard:
    """`I/N` with 0 <= I < N; UsageError (exit 2) for anything else."""
    match = _FORM.match(text)
    if match is None:
        raise UsageError(
            f"{where} {text!r}: expected I/N, this shard's index and the number of shards "
            "(0/4 ... 3/4)"
        )
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1:
        raise UsageError(f"{where} {text!r}: the number of shards must be at least 1")
    if index >= count:
        raise UsageError(
            f"{where} {text!r}: the index must be below the number of shards (0 to {count - 1})"
        )
    return Shard(index, count)


def canonical_json(value: Any) -> bytes:
    """The JSON that the hash is taken of: sorted keys, no spaces, UTF-8."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def bucket(value: Any, count: int) -> int:
    """The shard (0 to count - 1) that owns an item, or a shard_key value."""
    try:
        data = canonical_json(value)
    except (TypeError, ValueError) as exc:
        raise RunError(
            f"an item cannot be sharded: it is not JSON ({exc}); give the step a shard_key",
            kind="render",
        ) from exc
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big") % count


# -- state -----------------------------------------------------------------------------------


def entries_of(state: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """Every cursor entry in a state document: `""` for the unsharded run's `streams`, then
    each shard's, as stream -> entry."""
    out: dict[str, Mapping[str, Any]] = {"": state.get("streams") or {}}
    for key, streams in (state.get("shards") or {}).items():
        if isinstance(streams, Mapping):
            out[str(key)] = streams
    return out


def cursors_for(
    state: Mapping[str, Any], shard: Shard | None, specs: Mapping[str, StreamSpec]
) -> dict[str, Any]:
    """stream -> entry that this run starts from: its own entry's where it has one, else the
    entry with the smallest cursor among the other layouts' (its `seen` keys with it, those
    of entries at the same cursor joined), so that no shard layout skips what another did
    not fetch. The other shards of this run's own N are no guide: their items are not this
    shard's, and a shard whose first run starts after its siblings committed would skip its
    own older records. Nothing is deleted."""
    entries = entries_of(state)
    own_key = shard.key if shard is not None else ""
    own = dict(entries.pop(own_key, {}))
    others: dict[str, list[Mapping[str, Any]]] = {}
    for key, streams in entries.items():
        if shard is not None and key.partition("/")[2] == str(shard.count):
            continue  # a sibling of this layout
        for stream, entry in streams.items():
            if isinstance(entry, Mapping) and entry.get("cursor") is not None:
                others.setdefault(stream, []).append(entry)
    for stream, found in others.items():
        if stream not in own:
            own[stream] = _smallest(stream, found, specs.get(stream))
    return own


def _smallest(
    stream: str, entries: list[Mapping[str, Any]], spec: StreamSpec | None
) -> dict[str, Any]:
    field = spec.cursor_field if spec is not None and spec.cursor_field else "cursor"
    cursor = _Cursor(stream, field, spec.cursor_type if spec is not None else None)
    keyed = []
    for entry in entries:
        kind, key = cursor.key(entry["cursor"], "in the state (another shard's):")
        keyed.append((kind, key, entry))
    if len({kind for kind, _, _ in keyed}) > 1:
        raise RunError(
            f"stream '{stream}': the shards' stored cursors differ in type: "
            f"{', '.join(repr(e['cursor']) for e in entries)}",
            kind="cursor",
        )
    low = min(key for _, key, _ in keyed)
    at_low = [entry for _, key, entry in keyed if key == low]
    seen: list[Any] = []
    for entry in at_low:
        for key in entry.get("seen") or ():
            if key not in seen:
                seen.append(key)
    chosen = dict(at_low[0])
    if seen:
        chosen["seen"] = seen
    return chosen
