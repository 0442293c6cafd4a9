"""The working objects of a run that the engine and the phases share: what a step sees
(`Context`), where its effects go (`Sink`), its counters, a page of selected records, the
outcomes that steer the engine, and `RunState`, the part of the run a phase may use."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from .clock import Clock
from .model import StepSpec
from .redact import Redactor

if TYPE_CHECKING:
    from .outputs import Outputs

log = logging.getLogger("runner")

# -- outcomes: where the engine goes on after a step (or a page) -----------------------------


@dataclass(frozen=True, slots=True)
class Goto:
    """The outcome of a `goto` rule: go on at the step named `target`."""

    target: str


NEXT = "next"  # go on with the next step
STOP = "stop"  # this step's pagination (or this item) ended by a `stop` action
END = "end"  # the flow (or, inside an item, the item) finished successfully
MAP = "map"  # an ok response: its records are mapped, then the step goes on
MORE = "more"  # the page was handled and the pagination may go on
Outcome = str | Goto


# The run's working objects compare by identity (eq=False), as mutable state should; it also
# spares Python 3.11 compiling a value `__eq__` for each at start-up.
@dataclass(slots=True, eq=False)
class Page:
    """A response's records as `records` selected them, before filter, fields and emit."""

    count: int  # records the page held, before filter (what max_items counts)
    records: list[Any] | None
    rscope: dict[str, Any] | None
    repeated: bool = False  # the same records as the previous page: pagination ends


NO_PAGE = Page(0, None, None)


# -- where a context's effects go ----------------------------------------------------------


class Sink:
    """Receives the effects of steps: emitted records and the `steps.<id>` values.

    The root sink writes records to the outputs and updates the run's `steps` scope at once.
    An item of a concurrent for_each gets a buffered sink (`child`), replayed into its parent
    in input order, so records keep input order whatever order responses arrive in.
    """

    __slots__ = ("_ops", "outputs", "parent", "steps_scope")

    def __init__(
        self, outputs: Outputs, steps_scope: dict[str, dict[str, Any]], parent: Sink | None = None
    ) -> None:
        self.outputs = outputs
        self.steps_scope = steps_scope
        self.parent = parent
        self._ops: list[tuple[str, Any, Any]] = []

    def child(self) -> Sink:
        """A buffered sink whose effects reach this one on `flush`."""
        return Sink(self.outputs, self.steps_scope, self)

    def emit(self, stream: str, record: dict[str, Any]) -> None:
        if self.parent is None:
            self.outputs.write(stream, record)
        else:
            self._ops.append(("emit", stream, record))

    def emit_many(self, stream: str, records: list[dict[str, Any]]) -> None:
        """A page of records: written in one call at the root."""
        if self.parent is None:
            self.outputs.write_many(stream, records)
        else:
            self._ops.append(("emit_many", stream, records))

    def step_records(self, step_id: str, records: list[Any]) -> None:
        if self.parent is None:
            self.steps_scope[step_id]["records"].extend(records)
        else:
            self._ops.append(("records", step_id, records))

    def step_response(self, step_id: str, response: dict[str, Any]) -> None:
        if self.parent is None:
            self.steps_scope[step_id]["response"] = response
        else:
            self._ops.append(("response", step_id, response))

    def step_vars(self, step_id: str, values: dict[str, Any]) -> None:
        if self.parent is None:
            self.steps_scope[step_id]["vars"].update(values)
        else:
            self._ops.append(("vars", step_id, values))

    def flush(self) -> None:
        parent = self.parent
        assert parent is not None
        for op, key, value in self._ops:
            if op == "emit_many":
                parent.emit_many(key, value)
            elif op == "emit":
                parent.emit(key, value)
            elif op == "records":
                parent.step_records(key, value)
            elif op == "response":
                parent.step_response(key, value)
            else:
                parent.step_vars(key, value)
        self._ops.clear()


@dataclass(slots=True, eq=False)
class Context:
    """What a step sees: the `steps` scope, the current item, and where its effects go."""

    steps: dict[str, dict[str, Any]]
    sink: Sink
    item: Any = None
    item_index: int | None = None
    in_item: bool = False

    def child(self, item: Any, index: int, sink: Sink, block: tuple[StepSpec, ...]) -> Context:
        steps = self.steps
        if block:
            # A block's own steps hold this item's values; the rest of the scope is shared.
            steps = dict(self.steps)
            for inner in block:
                for s in inner.walk():
                    steps[s.id] = empty_step_scope()
        return Context(steps, sink, item, index, True)


def empty_step_scope() -> dict[str, Any]:
    return {"records": [], "response": None, "vars": {}}


@dataclass(slots=True, eq=False)
class StepReport:
    """Per-step counters for the log and the summary."""

    requests: int = 0
    pages: int = 0
    records: int = 0
    skipped: int = 0
    stopped: int = 0
    ok_responses: int = 0
    ok_with_records: int = 0
    kept: int = 0  # records kept for steps.<id>.records


@dataclass(slots=True, eq=False)
class RunInfo:
    """The `run` scope: this run's id, start time and flow name."""

    run_id: str
    started_at: datetime
    flow_name: str

    def scope(self) -> dict[str, Any]:
        return {
            "id": self.run_id,
            "started_at": self.started_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "flow": self.flow_name,
        }


@dataclass(slots=True, eq=False)
class RunState:
    """What the phases share of a run: its secrets' redactor, the root `steps` scope, the
    counters and warnings, and its clock and jitter. Passed to each phase, never the run."""

    redactor: Redactor
    steps_scope: dict[str, dict[str, Any]]
    reports: dict[str, StepReport]
    clock: Clock
    rng: random.Random | None = None
    warnings: list[str] = field(default_factory=list)
    # False in shards 1 to N-1: the records of steps outside every `shard: true` step are
    # shard 0's to write (`StepSpec.in_shard`).
    writes_outside_shard: bool = True

    def writes(self, step: StepSpec) -> bool:
        """Whether this run writes the step's emitted records."""
        return self.writes_outside_shard or step.in_shard

    def warn(self, message: str) -> None:
        message = self.redactor.redact(message)
        self.warnings.append(message)
        log.warning(message)

    def keep_local(self, ctx: Context, step_id: str) -> dict[str, Any] | None:
        """The item's own `steps.<id>` of a block step (its effects go to the sink too)."""
        if ctx.steps is self.steps_scope:
            return None
        return ctx.steps.get(step_id)
