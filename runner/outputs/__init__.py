"""Where a run's records go: the destination seam (`Outputs`) and its destinations.

| module | destination |
| --- | --- |
| `files.py` | JSONL files in a folder (the default) and NDJSON on stdout |

`records.py` holds what every destination shares (stream settings, record checks, cursors);
`state.py` the state file.
"""

from __future__ import annotations

from .base import Outputs
from .files import FileOutputs, StdoutOutputs, atomic_write
from .records import StreamSpec
from .state import StateBackend, StateStore

__all__ = [
    "FileOutputs",
    "Outputs",
    "StateBackend",
    "StateStore",
    "StdoutOutputs",
    "StreamSpec",
    "atomic_write",
]
