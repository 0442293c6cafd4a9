"""The engine: runs a flow's steps in order, follows `goto`, fans out `for_each`, pages and
polls; each request goes through the phases, file by file in data-flow order: build.py
(the request), send.py with http.py and auth.py (sending), decode.py (receiving),
handle.py (rules, retries, expect, set), mapping.py (records, filter, fields, emit)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .build import Builder, type_name
from .clock import SYSTEM_CLOCK, Clock
from .context import (
    END,
    MAP,
    MORE,
    NEXT,
    NO_PAGE,
    STOP,
    Context,
    Goto,
    Outcome,
    Page,
    RunInfo,
    RunState,
    Sink,
    StepReport,
    empty_step_scope,
)
from .decode import receive
from .errors import RunError, UnavailableError
from .handle import Handler, message, request_fields, response_scope
from .http import TransportError, aiohttp_transport
from .incremental import SeenFilter
from .logs import enter_step
from .mapping import Mapper
from .messages import PreparedRequest, Response, Stats
from .model import Flow, StepSpec
from .outputs import Outputs
from .paginate import Pagination
from .redact import Redactor
from .secrets import Secrets
from .send import Sender
from .shard import Shard
from .transport import TransportFactory
from .words import plural

log = logging.getLogger("runner")

# Methods whose next page is requested while the current one is mapped: a page that then
# fails to map leaves one request sent for nothing, harmless only for a safe method.
PREFETCH_METHODS = frozenset({"GET", "HEAD"})
NO_PAGINATION = Pagination(None)

# Re-exported for the run and the dry run.
__all__ = ["Context", "FlowRun", "RunInfo", "Sink"]


@dataclass(slots=True, eq=False)
class FlowRun:
    """One run of a flow: its scope, phases, outputs and counters.

    `transport` makes each service's transport (and its auth's); `clock` times every wait
    and reading of the time; `rng` draws the backoff jitter (None: the `random` module's).
    """

    flow: Flow
    inputs: dict[str, Any]
    environ: Mapping[str, str]
    secrets: Secrets
    state: dict[str, Any]  # state.<stream>.cursor
    outputs: Outputs
    redactor: Redactor
    info: RunInfo
    refresh_token_store: Any = None
    transport: TransportFactory = aiohttp_transport
    clock: Clock = SYSTEM_CLOCK
    rng: random.Random | None = None
    files_dirs: tuple[str, ...] = ()  # --files-dir: folders multipart files may come from
    shard: Shard | None = None  # --shard: the items of `shard: true` steps this run takes
    stats: Stats = field(default_factory=Stats)
    steps_scope: dict[str, dict[str, Any]] = field(default_factory=dict)
    auth_scope: dict[str, Any] = field(default_factory=dict)
    reports: dict[str, StepReport] = field(default_factory=dict)
    cut_short_streams: set[str] = field(default_factory=set)
    # Streams with `cursor.skip_seen`: what they drop, and the keys for the next state.
    seen_filters: dict[str, SeenFilter] = field(default_factory=dict)
    base_scope: dict[str, Any] = field(default_factory=dict)
    # The phases, made in __post_init__.
    run_state: RunState = field(init=False)
    builder: Builder = field(init=False)
    sender: Sender = field(init=False)
    handler: Handler = field(init=False)
    mapper: Mapper = field(init=False)

    def __post_init__(self) -> None:
        for step in self.flow.all_steps():
            self.steps_scope[step.id] = empty_step_scope()
            self.reports[step.id] = StepReport()
        self.base_scope = {
            "inputs": self.inputs,
            "env": dict(self.environ),
            "secrets": self.secrets,
            "state": self.state,
            "auth": self.auth_scope,
            "run": self.info.scope(),
        }
        self.run_state = RunState(
            self.redactor,
            self.steps_scope,
            self.reports,
            self.clock,
            self.rng,
            writes_outside_shard=self.shard is None or self.shard.index == 0,
        )
        self.sender = Sender(
            self.flow,
            stats=self.stats,
            redactor=self.redactor,
            auth_scope=self.auth_scope,
            refresh_token_store=self.refresh_token_store,
            transport=self.transport,
            clock=self.clock,
            rng=self.rng,
        )
        self.builder = Builder(
            self.flow.services,
            self.redactor,
            self.sender.obtain_token,
            self.auth_scope,
            upload_roots=(os.path.dirname(os.path.abspath(self.flow.file)), *self.files_dirs),
        )
        self.handler = Handler(self.run_state, self._resend)
        self.mapper = Mapper(self.run_state, self.seen_filters)

    @property
    def warnings(self) -> list[str]:
        return self.run_state.warnings

    def warn(self, message: str) -> None:
        self.run_state.warn(message)

    def scope(self, ctx: Context, page: dict[str, Any] | None = None) -> dict[str, Any]:
        scope = dict(self.base_scope)
        scope["steps"] = ctx.steps
        if ctx.in_item:
            scope["item"] = ctx.item
            scope["item_index"] = ctx.item_index
        if page is not None:
            scope["page"] = page
        return scope

    def root_context(self) -> Context:
        """The context of the flow's top-level steps: effects go straight to the outputs."""
        return Context(self.steps_scope, Sink(self.outputs, self.steps_scope))

    async def close(self) -> None:
        await self.sender.close()

    # -- the sequence of steps ----------------------------------------------------------

    async def run(self) -> None:
        await self.run_sequence(self.flow.steps, self.root_context())
        for step in self.flow.all_steps():
            report = self.reports[step.id]
            if step.records is not None and report.ok_responses and not report.ok_with_records:
                self.warn(
                    f"step '{step.id}': records ({step.records.source}) was null on every "
                    "ok response: check the expression"
                )

    async def run_sequence(self, steps: tuple[StepSpec, ...], ctx: Context) -> str:
        """Runs steps in order, following `goto`; returns END if an `end` (or, in an item,
        a `stop`) finished the sequence early, else NEXT."""
        index_of = {s.id: i for i, s in enumerate(steps)}
        visits: dict[str, int] = {}
        index = 0
        while index < len(steps):
            step = steps[index]
            visits[step.id] = visits.get(step.id, 0) + 1
            if visits[step.id] > step.max_visits:
                raise RunError(
                    f"step visited more than max_visits ({step.max_visits}) times: "
                    "a goto loop that never ends?",
                    kind="http",
                ).in_context(step=step.id, item_index=ctx.item_index)
            outcome = await self.run_step(step, ctx)
            if isinstance(outcome, Goto):
                index = index_of[outcome.target]
                continue
            if outcome == END or (outcome == STOP and ctx.in_item):
                return END
            index += 1
        return NEXT

    async def run_step(self, step: StepSpec, ctx: Context) -> Outcome:
        enter_step(step.id, ctx.item_index if ctx.in_item else None)
        try:
            if step.when is not None and not step.when.holds(self.scope(ctx)):
                log.info("step %s: skipped (when is false)", step.id)
                return NEXT
            if ctx.in_item:  # an inner step of a block: the block's own line counts it
                return await self._run_step(step, ctx)
            before = self._counts(step)
            started = self.clock.monotonic()
            outcome = await self._run_step(step, ctx)
            self._log_step_done(step, before, started)
            return outcome
        except RunError as exc:
            raise exc.in_context(step=step.id, item_index=ctx.item_index) from exc.__cause__

    async def _run_step(self, step: StepSpec, ctx: Context) -> Outcome:
        if step.for_each is not None:
            await self.run_for_each(step, ctx)
            return NEXT
        if step.parallel:
            await self.run_parallel(step, ctx)
            return NEXT
        return await self.run_request_step(step, ctx)

    def _counts(self, step: StepSpec) -> tuple[int, int]:
        """Records and responses of a step and its inner steps so far."""
        reports = [self.reports[s.id] for s in step.walk()]
        return sum(r.records for r in reports), sum(r.requests for r in reports)

    def _log_step_done(self, step: StepSpec, before: tuple[int, int], started: float) -> None:
        records, responses = self._counts(step)
        records -= before[0]
        responses -= before[1]
        duration_ms = round((self.clock.monotonic() - started) * 1000)
        log.info(
            "step %s: %s from %s in %.1f s",
            step.id, plural(records, "record"), plural(responses, "response"),
            duration_ms / 1000,
            extra={"records": records, "duration_ms": duration_ms},
        )  # fmt: skip

    # -- parallel blocks ----------------------------------------------------------------

    async def run_parallel(self, step: StepSpec, ctx: Context) -> None:
        """The block's steps at the same time, at most `concurrency` at once. Each writes its
        own streams and `steps.<id>` (validate sees to it), so its records keep their order
        without buffering. The first failure cancels the others at once, before any of them
        sends another request, and is the block's failure; `end` ends its own branch."""
        limit = asyncio.Semaphore(step.concurrency)
        failures: list[BaseException] = []
        tasks: list[asyncio.Task[str]] = []

        async def branch(child: StepSpec) -> str:
            async with limit:
                try:
                    return await self.run_sequence((child,), ctx)
                except asyncio.CancelledError:
                    raise
                except BaseException as exc:
                    if not failures:
                        failures.append(exc)
                        # Synchronously, before this task yields: no sibling runs again.
                        current = asyncio.current_task()
                        for task in tasks:
                            if task is not current:
                                task.cancel()
                    raise

        tasks.extend(asyncio.create_task(branch(child)) for child in step.steps)
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for task in tasks:
                task.cancel()
        if failures:
            raise failures[0]

    # -- for_each -----------------------------------------------------------------------

    async def run_for_each(self, step: StepSpec, ctx: Context) -> None:
        assert step.for_each is not None
        items = step.for_each.search(self.scope(ctx))
        if not isinstance(items, list):
            raise RunError(
                f"for_each ({step.for_each.source}) gave {type_name(items)}, not a list",
                kind="http",
            )
        if step.max_items is not None and len(items) > step.max_items:
            self._cut_short(step)
            items = items[: step.max_items]
        # Each item keeps its index in the whole list (`item_index`), sharded or not.
        indexed = list(enumerate(items))
        count = plural(len(items), "item")
        if step.shard and self.shard is not None:
            indexed = self._owned(step, indexed)
            count = f"{len(indexed)} of {count} (shard {self.shard.key})"
        log.info("step %s: %s, concurrency %d", step.id, count, step.concurrency)
        if step.concurrency <= 1 or len(indexed) <= 1:
            for index, item in indexed:
                await self.run_item(step, ctx, item, index, ctx.sink)
            return
        await self._run_items_concurrently(step, ctx, indexed)

    def _owned(self, step: StepSpec, indexed: list[tuple[int, Any]]) -> list[tuple[int, Any]]:
        """The items of a `shard: true` step that this shard runs."""
        shard = self.shard
        assert shard is not None
        if step.shard_key is None:
            return [(i, item) for i, item in indexed if shard.owns(item)]
        key = step.shard_key
        owned = []
        for i, item in indexed:
            value = key.search(item)
            if value is None:
                raise RunError(
                    f"shard_key ({key.source}) is null on item {i}: every item needs a value "
                    "to be sharded by",
                    kind="render",
                ).in_context(item_index=i)
            if shard.owns(value):
                owned.append((i, item))
        return owned

    async def _run_items_concurrently(
        self, step: StepSpec, ctx: Context, items: list[tuple[int, Any]]
    ) -> None:
        """`concurrency` workers take items in order; each item's effects are buffered and
        flushed in input order. A worker waits while the oldest unflushed item is `window`
        items behind: memory stays bounded by the window, not by the number of items."""
        window = step.concurrency * 2
        buffers: dict[int, Sink] = {}
        finished: set[int] = set()
        next_start = 0
        next_flush = 0
        progressed = asyncio.Event()
        waiting = 0  # workers held by the window: only they need `progressed`

        async def worker() -> None:
            nonlocal next_start, next_flush, waiting
            while next_start < len(items):
                if next_start - next_flush >= window:
                    progressed.clear()
                    waiting += 1
                    try:
                        await progressed.wait()
                    finally:
                        waiting -= 1
                    continue
                index = next_start
                next_start += 1
                sink = buffers[index] = ctx.sink.child()
                item_index, item = items[index]
                await self.run_item(step, ctx, item, item_index, sink)
                finished.add(index)
                while next_flush in finished:
                    finished.discard(next_flush)
                    buffers.pop(next_flush).flush()
                    next_flush += 1
                if waiting:
                    progressed.set()

        workers = [asyncio.create_task(worker()) for _ in range(min(step.concurrency, len(items)))]
        try:
            await asyncio.gather(*workers)
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    async def run_item(
        self, step: StepSpec, ctx: Context, item: Any, index: int, sink: Sink
    ) -> None:
        item_ctx = ctx.child(item, index, sink, step.steps)
        enter_step(step.id, index)
        try:
            if step.steps:  # a block
                # The block's steps update this item's own `steps.<id>` and, through the sink,
                # the values seen from outside the block, accumulated in input order.
                await self.run_sequence(step.steps, item_ctx)
            else:
                await self.run_request_step(step, item_ctx)
        except RunError as exc:
            raise exc.in_context(item_index=index) from exc.__cause__

    def _warn_default_max_pages(self, step: StepSpec) -> None:
        paginate = step.paginate
        if paginate is not None and paginate.max_pages_is_default:
            self.warn(
                f"step '{step.id}': pagination stopped after {paginate.max_pages} pages, the "
                "default max_pages, with more pages left; set paginate.max_pages to raise it "
                "(null lifts it)"
            )

    def _cut_short(self, step: StepSpec) -> None:
        for s in step.walk():
            if s.emit:
                self.cut_short_streams.add(s.emit)

    # -- one request step: build, send, receive, handle, map ----------------------------

    async def run_request_step(self, step: StepSpec, ctx: Context) -> Outcome:
        assert step.request is not None
        report = self.reports[step.id]
        # Without `paginate` the pager is never advanced: one shared instance serves every step.
        pager = Pagination(step.paginate) if step.paginate is not None else NO_PAGINATION
        scope = self.scope(ctx, pager.scope())
        builder = self.builder
        request = await builder.request(step, scope, pager)
        pending: asyncio.Future[tuple[Response | None, TransportError | None]] | None = None
        try:
            while True:
                if pending is not None:
                    response, failure = await pending
                    pending = None
                else:
                    response, failure = await self.exchange(step, request, scope)
                report.requests += 1
                report.pages += 1
                outcome, page, rscope = await self._handle(
                    step, ctx, scope, request, response, failure, pager
                )
                more = outcome == MORE and pager.advance(rscope, page.count)
                if more:
                    scope = self.scope(ctx, pager.scope())
                    if pager.next_url is not None:
                        request = builder.next_page(step, request, pager.next_url)
                    else:
                        request = await builder.request(step, scope, pager)
                    if request.method in PREFETCH_METHODS:
                        # The next page is on its way while this one is mapped and written:
                        # still one request at a time, the server works while we do.
                        pending = asyncio.ensure_future(self.exchange(step, request, scope))
                        await asyncio.sleep(0)  # let it reach the socket
                self.mapper.deliver(step, ctx, page)
                if not more:
                    if outcome == MORE:
                        if pager.cut_short:
                            self._cut_short(step)
                            self._warn_default_max_pages(step)
                        return NEXT
                    return outcome
        finally:
            if pending is not None:  # this page failed to map, or the run was cancelled
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending

    async def _handle(
        self,
        step: StepSpec,
        ctx: Context,
        scope: dict[str, Any],
        request: PreparedRequest,
        response: Response | None,
        failure: TransportError | None,
        pager: Pagination,
    ) -> tuple[Outcome, Page, dict[str, Any]]:
        """Handle the final response, select its records; MORE when the pagination may go
        on, else the outcome for the step; the page (selected, not yet mapped) and the
        response's scope."""
        outcome, rscope = await self.handler.handle(step, ctx, scope, request, response, failure)
        if outcome != MAP and outcome != END:
            return outcome, NO_PAGE, rscope
        page = self.mapper.select(step, rscope, pager)
        if outcome == END or step.paginate is None:
            return (END if outcome == END else NEXT), page, rscope
        if page.repeated:
            self.warn(
                f"step '{step.id}': page {pager.pages + 1} repeated the previous page's records; "
                "pagination ended"
            )
            return NEXT, page, rscope
        if step.paginate.stop_when is not None and step.paginate.stop_when.holds(rscope):
            return NEXT, page, rscope
        return MORE, page, rscope

    async def exchange(
        self, step: StepSpec, request: PreparedRequest, scope: dict[str, Any]
    ) -> tuple[Response | None, TransportError | None]:
        """Send and receive; with `poll`, resend until `until` holds. A transport failure
        after all retries is returned, for an `on_status: error` rule to see."""
        clock = self.clock
        started = clock.monotonic() if step.poll is not None else 0.0
        while True:
            try:
                response = await self.sender.send(step, request, scope)
            except TransportError as exc:
                return None, exc
            receive(response, step.response, self.redactor, request.method)
            if step.poll is None:
                return response, None
            rscope = response_scope(scope, response, request)
            if step.poll.until.holds(rscope):
                return response, None
            if step.poll.fail_when is not None and step.poll.fail_when.holds(rscope):
                raise RunError(
                    message(
                        self.redactor,
                        step.poll.message,
                        rscope,
                        f"poll failed: fail_when ({step.poll.fail_when.source}) is true",
                    ),
                    kind="http",
                    **request_fields(self.redactor, request, response),
                )
            if clock.monotonic() - started + step.poll.interval > step.poll.timeout:
                raise UnavailableError(
                    message(
                        self.redactor,
                        step.poll.message,
                        rscope,
                        f"poll timed out after {step.poll.timeout:g} s: until "
                        f"({step.poll.until.source}) never held",
                    ),
                    kind="timeout",
                    **request_fields(self.redactor, request, response),
                )
            await clock.sleep(step.poll.interval)

    async def _resend(
        self,
        step: StepSpec,
        request: PreparedRequest,
        scope: dict[str, Any],
        first_attempt: int,
        initial_wait: float,
    ) -> tuple[Response | None, TransportError | None]:
        """The `retry` action's resend (handle.py): sent and received, not polled."""
        try:
            response = await self.sender.send(
                step, request, scope, first_attempt=first_attempt, initial_wait=initial_wait
            )
        except TransportError as exc:
            return None, exc
        receive(response, step.response, self.redactor, request.method)
        return response, None
