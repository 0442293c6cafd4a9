"""runner: a declarative YAML integration runner for REST services.

Load a flow with `load_flow(path)` and run it with `run_flow(flow, inputs=...)`, or with
`await run_flow_async(flow, inputs=...)` inside a running event loop; the CLI (`runner run`,
`runner validate`, `runner schema`) is a thin layer over these. The library writes nothing to
stdout or stderr unless asked: it logs to the `runner` logger.
"""

from __future__ import annotations

import importlib
import logging
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
    from .run import RunResult, load_flow, run_flow, run_flow_async

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
    "run_flow_async",
]

# Imported on first use: `runner validate` must not pay for aiohttp and the engine.
_LAZY = {
    "Flow": "model",
    "RunResult": "run",
    "load_flow": "run",
    "run_flow": "run",
    "run_flow_async": "run",
}

# A library logs and leaves the output to its host: without this, Python's last-resort
# handler would print the warnings and errors of a run on stderr.
logging.getLogger(__name__).addHandler(logging.NullHandler())


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
