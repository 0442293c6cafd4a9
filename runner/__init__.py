"""runner: a declarative YAML integration runner for REST services.

Load a flow with `load_flow(path)` and run it with `run_flow(flow, inputs=...)`; the CLI
(`runner run`, `runner validate`, `runner schema`) is a thin layer over these.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    FlowError,
    Problem,
    RunError,
    RunnerError,
    UnavailableError,
    UsageError,
)

if TYPE_CHECKING:
    from .model import Flow
    from .run import RunResult, load_flow, run_flow

__version__ = "0.1.0"

__all__ = [
    "Flow",
    "FlowError",
    "Problem",
    "RunError",
    "RunResult",
    "RunnerError",
    "UnavailableError",
    "UsageError",
    "__version__",
    "load_flow",
    "run_flow",
]

# Imported on first use: `runner validate` must not pay for aiohttp and the engine.
_LAZY = {"Flow": "model", "RunResult": "run", "load_flow": "run", "run_flow": "run"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
