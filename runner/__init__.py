"""runner: a declarative YAML integration runner for REST services.

Load a flow with `load_flow(path)` and run it with `run_flow(flow, inputs=...)`; the CLI
(`runner run`, `runner validate`, `runner schema`) is a thin layer over these.
"""

from __future__ import annotations

from .errors import (
    FlowError,
    Problem,
    RunError,
    RunnerError,
    UnavailableError,
    UsageError,
)
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
