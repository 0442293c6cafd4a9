"""Runs a flow's steps: build, send, receive, handle and map each request; for_each; goto; poll."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .clock import SYSTEM_CLOCK, Clock
from .decode import decode_body, decode_lenient
from .errors import (
    BODY_KEEP_CHARS,
    DecodeError,
    ExpectError,
    RenderError,
    RunError,
    SecurityError,
    UnavailableError,
)
from .expressions import truthy
from .http import (
    PreparedRequest,
    RateLimit,
    Response,
    RetryPolicy,
    ServiceClient,
    Stats,
    Timeouts,
    TlsOptions,
    TransportError,
    aiohttp_transport,
    backoff_delay,
    build_url,
    encode_multipart,
    encode_query,
    is_loopback,
    origin,
    retry_after_seconds,
)
from .model import FieldSpec, Flow, RuleSpec, ServiceSpec, SetSpec, StepSpec
from .outputs import Outputs
from .paginate import Pagination
from .redact import Redactor
from .secrets import Secrets
from .transport import TransportFactory

if TYPE_CHECKING:
    from .auth import ServiceAuth

log = logging.getLogger("runner")

UNAVAILABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# What a base_url of text and lookups may read to be rendered once per run: names whose
# values never change during it.
RUN_CONSTANT_NAMES = frozenset({"env", "inputs", "secrets", "run"})
CONTENT_TYPES = {".xml": "application/xml", ".json": "application/json", ".html": "text/html"}


def is_unavailable_status(status: int | None) -> bool:
    return status is not None and (status in UNAVAILABLE_STATUSES or 500 <= status <= 599)


# -- control flow between steps ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Goto:
    """The outcome of a `goto` rule: go on at the step named `target`."""

    target: str


NEXT = "next"  # go on with the next step
STOP = "stop"  # this step's pagination (or this item) ended by a `stop` action
END = "end"  # the flow (or, inside an item, the item) finished successfully
Outcome = str | Goto

# Methods whose next page is requested while the current one is mapped: a page that then
# fails to map leaves one request sent for nothing, harmless only for a safe method.
PREFETCH_METHODS = frozenset({"GET", "HEAD"})


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
NO_PAGINATION = Pagination(None)


# -- where a context's effects go ----------------------------------------------------------


class Sink:
    """Receives the effects of steps: emitted records and the `steps.<id>` values.

    The root sink writes records to the outputs and updates the run's `steps` scope at once.
    An item of a concurrent for_each gets a buffered sink, replayed into its parent in input
    order, so records keep input order whatever order responses arrive in.
    """

    def __init__(self, run: FlowRun, parent: Sink | None = None) -> None:
        self.run = run
        self.parent = parent
        self._ops: list[tuple[str, Any, Any]] = []

    def emit(self, stream: str, record: dict[str, Any]) -> None:
        if self.parent is None:
            self.run.outputs.write(stream, record)
        else:
            self._ops.append(("emit", stream, record))

    def emit_many(self, stream: str, records: list[dict[str, Any]]) -> None:
        """A page of records: written in one call at the root."""
        if self.parent is None:
            self.run.outputs.write_many(stream, records)
        else:
            self._ops.append(("emit_many", stream, records))

    def step_records(self, step_id: str, records: list[Any]) -> None:
        if self.parent is None:
            self.run.steps_scope[step_id]["records"].extend(records)
        else:
            self._ops.append(("records", step_id, records))

    def step_response(self, step_id: str, response: dict[str, Any]) -> None:
        if self.parent is None:
            self.run.steps_scope[step_id]["response"] = response
        else:
            self._ops.append(("response", step_id, response))

    def step_vars(self, step_id: str, values: dict[str, Any]) -> None:
        if self.parent is None:
            self.run.steps_scope[step_id]["vars"].update(values)
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
                    steps[s.id] = _empty_step_scope()
        return Context(steps, sink, item, index, True)


def _empty_step_scope() -> dict[str, Any]:
    return {"records": [], "response": None, "vars": {}}


@dataclass(slots=True, eq=False)
class StepReport:
    """Per-step counters for the log and the summary."""

    requests: int = 0
    pages: int = 0
    records: int = 0
    skipped: int = 0
    ok_responses: int = 0
    ok_with_records: int = 0


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
class FlowRun:
    """One run of a flow: its scope, clients, outputs and counters.

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
    stats: Stats = field(default_factory=Stats)
    steps_scope: dict[str, dict[str, Any]] = field(default_factory=dict)
    auth_scope: dict[str, Any] = field(default_factory=dict)
    reports: dict[str, StepReport] = field(default_factory=dict)
    cut_short_streams: set[str] = field(default_factory=set)
    warnings: list[str] = field(default_factory=list)
    clients: dict[str, ServiceClient] = field(default_factory=dict)
    auths: dict[tuple[str, str], ServiceAuth] = field(default_factory=dict)
    base_scope: dict[str, Any] = field(default_factory=dict)
    fixed_base_urls: dict[str, str] = field(default_factory=dict)  # rendered once per run
    debug: bool = False  # the debug log is on (a line per request)
    uses_auth: bool = False  # some service or step has auth: requests look for an authorizer
    _checked_origins: set[tuple[str, bool]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.debug = log.isEnabledFor(logging.DEBUG)
        self.uses_auth = any(s.auth is not None for s in self.flow.services.values()) or any(
            not isinstance(step.auth, str) for step in self.flow.all_steps()
        )
        for step in self.flow.all_steps():
            self.steps_scope[step.id] = _empty_step_scope()
            self.reports[step.id] = StepReport()
        self.base_scope = {
            "inputs": self.inputs,
            "env": dict(self.environ),
            "secrets": self.secrets,
            "state": self.state,
            "auth": self.auth_scope,
            "run": self.info.scope(),
        }

    # -- scope ------------------------------------------------------------------------

    def scope(self, ctx: Context, page: dict[str, Any] | None = None) -> dict[str, Any]:
        scope = dict(self.base_scope)
        scope["steps"] = ctx.steps
        if ctx.in_item:
            scope["item"] = ctx.item
            scope["item_index"] = ctx.item_index
        if page is not None:
            scope["page"] = page
        return scope

    def warn(self, message: str) -> None:
        message = self.redactor.redact(message)
        self.warnings.append(message)
        log.warning(message)

    # -- clients ----------------------------------------------------------------------

    def client(self, service: str | None) -> ServiceClient:
        key = service or ""
        existing = self.clients.get(key)
        if existing is not None:
            return existing
        spec = self.flow.services.get(service) if service else None
        if spec is None:
            made = ServiceClient(
                "(no service)",
                stats=self.stats,
                redactor=self.redactor,
                clock=self.clock,
                rng=self.rng,
                transport=self.transport,
            )
        else:
            made = ServiceClient(
                spec.name,
                rate_limit=RateLimit(*spec.rate_limit) if spec.rate_limit else None,
                max_concurrency=spec.max_concurrency,
                tls=spec.tls,
                cookies=spec.cookies,
                stats=self.stats,
                redactor=self.redactor,
                allow_insecure_http=spec.allow_insecure_http,
                clock=self.clock,
                rng=self.rng,
                transport=self.transport,
            )
        self.clients[key] = made
        return made

    def service_auth(self, service: str, step: StepSpec | None) -> ServiceAuth:
        key = (service, step.id if step is not None else "")
        existing = self.auths.get(key)
        if existing is not None:
            return existing
        from .auth import ServiceAuth  # only flows with auth need it (~5 ms of start-up)

        spec = self.flow.services.get(service)
        made = ServiceAuth(
            service,
            stats=self.stats,
            redactor=self.redactor,
            tls=spec.tls if spec else TlsOptions(),
            timeouts=spec.timeout if spec else Timeouts(),
            retry=spec.retry if spec else RetryPolicy(),
            refresh_token_store=self.refresh_token_store,
            allow_insecure_http=spec.allow_insecure_http if spec else False,
            clock=self.clock,
            rng=self.rng,
            transport=self.transport,
        )
        self.auths[key] = made
        return made

    async def close(self) -> None:
        for auth in self.auths.values():
            await auth.close()
        for client in self.clients.values():
            await client.close()

    # -- running ----------------------------------------------------------------------

    async def run(self) -> None:
        ctx = Context(self.steps_scope, Sink(self))
        await self.run_sequence(self.flow.steps, ctx)
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
        try:
            if step.when is not None and not truthy(step.when.search(self.scope(ctx))):
                log.info("step %s: skipped (when is false)", step.id)
                return NEXT
            if step.for_each is not None:
                await self.run_for_each(step, ctx)
                return NEXT
            return await self.run_request_step(step, ctx)
        except RunError as exc:
            raise exc.in_context(step=step.id, item_index=ctx.item_index) from exc.__cause__

    # -- for_each -----------------------------------------------------------------------

    async def run_for_each(self, step: StepSpec, ctx: Context) -> None:
        assert step.for_each is not None
        items = step.for_each.search(self.scope(ctx))
        if not isinstance(items, list):
            raise RunError(
                f"for_each ({step.for_each.source}) gave {_type_name(items)}, not a list",
                kind="http",
            )
        if step.max_items is not None and len(items) > step.max_items:
            self._cut_short(step)
            items = items[: step.max_items]
        log.info("step %s: %d items, concurrency %d", step.id, len(items), step.concurrency)
        if step.concurrency <= 1 or len(items) <= 1:
            for index, item in enumerate(items):
                await self.run_item(step, ctx, item, index, ctx.sink)
            return
        await self._run_items_concurrently(step, ctx, items)

    async def _run_items_concurrently(self, step: StepSpec, ctx: Context, items: list[Any]) -> None:
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
                sink = buffers[index] = Sink(self, ctx.sink)
                await self.run_item(step, ctx, items[index], index, sink)
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
        try:
            if step.steps:  # a block
                # The block's steps update this item's own `steps.<id>` and, through the sink,
                # the values seen from outside the block, accumulated in input order.
                await self.run_sequence(step.steps, item_ctx)
            else:
                await self.run_request_step(step, item_ctx)
        except RunError as exc:
            raise exc.in_context(item_index=index) from exc.__cause__

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
        request = await self.build_request(step, scope, pager)
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
                outcome, page = await self.handle(
                    step, ctx, scope, request, response, failure, pager
                )
                more = outcome == "more" and pager.advance(
                    self._response_scope(scope, response, request), page.count
                )
                if more:
                    scope = self.scope(ctx, pager.scope())
                    if pager.next_url is not None:
                        request = self._follow(step, request, pager.next_url)
                    else:
                        request = await self.build_request(step, scope, pager)
                    if request.method in PREFETCH_METHODS:
                        # The next page is on its way while this one is mapped and written:
                        # still one request at a time, the server works while we do.
                        pending = asyncio.ensure_future(self.exchange(step, request, scope))
                        await asyncio.sleep(0)  # let it reach the socket
                self._deliver(step, ctx, page)
                if not more:
                    if outcome == "more":
                        if pager.cut_short:
                            self._cut_short(step)
                        return NEXT
                    return outcome
        finally:
            if pending is not None:  # this page failed to map, or the run was cancelled
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending

    def _follow(self, step: StepSpec, previous: PreparedRequest, url: str) -> PreparedRequest:
        """The request for a next URL: same method, body, headers and auth; the URL as given."""
        name = step.request.service if step.request else None
        service = self.flow.services.get(name) if name else None
        allowed = service is not None and service.allow_cross_host
        if origin(url) != origin(previous.url) and not allowed:
            raise SecurityError(
                f"next page URL {self.redactor.redact(url)} is on another origin than "
                f"{self.redactor.redact(previous.url)}; set allow_cross_host: true on the "
                "service to follow it",
                method=previous.method,
            )
        return PreparedRequest(
            method=previous.method,
            url=url,
            query=[],
            headers=dict(previous.headers),
            body=previous.body,
            cookies=dict(previous.cookies),
            sensitive_headers=set(previous.sensitive_headers),
        )

    async def build_request(
        self, step: StepSpec, scope: dict[str, Any], pager: Pagination
    ) -> PreparedRequest:
        spec = step.request
        assert spec is not None
        service = self.flow.services.get(spec.service) if spec.service else None
        headers: dict[str, str] = {}
        base_url = ""
        if service is not None:
            if service.base_url is not None:
                base_url = self.fixed_base_urls.get(service.name) or await self._base_url(
                    service, scope
                )
            if service.headers is not None:
                headers.update(_header_values(service.headers.render(scope)))
        if spec.url is not None:
            url = _as_str(spec.url.render(scope), "url")
        else:
            path = _as_str(spec.path.render(scope), "path") if spec.path is not None else ""
            url = build_url(base_url, path)
        self._check_scheme(url, service.allow_insecure_http if service else False)
        if spec.headers is not None:
            headers.update(_header_values(spec.headers.render(scope)))
        query_data = dict(spec.query.render(scope)) if spec.query is not None else {}
        body: bytes | None = None
        json_body: Any = None
        if spec.body_kind == "json":
            assert spec.body is not None
            json_body = spec.body.render(scope)
        elif spec.body_kind == "form":
            assert spec.body is not None
            body = _form_bytes(spec.body.render(scope))
            _default_content_type(headers, "application/x-www-form-urlencoded")
        elif spec.body_kind == "multipart":
            assert spec.body is not None
            body, content_type = encode_multipart(spec.body.render(scope))
            headers["Content-Type"] = content_type
        elif spec.body_kind == "body":
            assert spec.body is not None
            body = str(spec.body.render(scope)).encode("utf-8")
            ctype = spec.content_type.render(scope) if spec.content_type else "text/plain"
            _default_content_type(headers, str(ctype))
        elif spec.body_kind == "body_file":
            assert spec.body_template is not None and spec.body_file is not None
            body = str(spec.body_template.render(scope)).encode("utf-8")
            suffix = os.path.splitext(spec.body_file)[1].lower()
            default_type = CONTENT_TYPES.get(suffix, "text/plain")
            ctype = spec.content_type.render(scope) if spec.content_type else default_type
            _default_content_type(headers, str(ctype))
        # The page token goes where `paginate.in` says.
        location = step.paginate.location if step.paginate else "query"
        for param, value in pager.tokens() if step.paginate is not None else ():
            if location == "query":
                query_data[param] = value
            elif location == "header":
                headers[param] = _header_value(value)
            elif location == "body":
                json_body = _set_body_path(json_body, param, value)
        if spec.body_kind == "json" or (json_body is not None and spec.body_kind is None):
            body = json.dumps(json_body, ensure_ascii=False, separators=(",", ":")).encode()
            _default_content_type(headers, "application/json")
        return PreparedRequest(
            method=spec.method,
            url=url,
            query=encode_query(query_data) if query_data else [],
            headers=headers,
            body=body,
        )

    async def _base_url(self, service: ServiceSpec, scope: dict[str, Any]) -> str:
        """The service's base_url, rendered; kept for the run when nothing in it can change."""
        template = service.base_url
        assert template is not None
        if "auth" in template.names and service.name not in self.auth_scope:
            await self._obtain_token(service.name, scope)
        base_url = _as_str(template.render(scope), "base_url")
        if template.lookups_only and template.names <= RUN_CONSTANT_NAMES:
            self.fixed_base_urls[service.name] = base_url
        return base_url

    def _check_scheme(self, url: str, allow_insecure: bool) -> None:
        # Checked once per scheme://host[:port] prefix: the same few origins come back on
        # every request.
        scheme_end = url.find("://")
        path_start = url.find("/", scheme_end + 3) if scheme_end >= 0 else -1
        key = (url if path_start < 0 else url[:path_start], allow_insecure)
        if key in self._checked_origins:
            return
        self._check_scheme_now(url, allow_insecure)
        self._checked_origins.add(key)

    def _check_scheme_now(self, url: str, allow_insecure: bool) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RunError(f"not an absolute http(s) URL: {self.redactor.redact(url)!r}")
        if parts.scheme == "http" and not allow_insecure and not is_loopback(parts.hostname):
            raise SecurityError(
                f"plain http:// to {parts.hostname} is refused: use https, or set "
                "allow_insecure_http: true on the service",
                url=self.redactor.redact(url),
            )

    async def _obtain_token(self, service_name: str, scope: dict[str, Any]) -> None:
        """Fetch the service's token now, for a base_url that reads `auth.<service>` (the
        Salesforce instance URL): the token response must exist before base_url renders."""
        service = self.flow.services[service_name]
        if service.auth is None:
            return
        config = service.auth.render(scope)
        authorizer = self.service_auth(service_name, None).authorizer(config, None)
        try:
            # The token is cached by the authorizer; this request is never sent.
            await authorizer.apply(PreparedRequest("GET", "https://token.invalid/"))
        finally:
            self._refresh_auth_scope()

    def _authorizer(self, step: StepSpec, request: PreparedRequest, scope: dict[str, Any]) -> Any:
        spec = step.request
        assert spec is not None
        if step.auth == "none" or spec.service is None:
            return None
        service = self.flow.services[spec.service]
        if step.auth != "inherit" and not isinstance(step.auth, str):
            config = step.auth.render(scope)
            auth = self.service_auth(spec.service, step)
        elif service.auth is not None:
            config = service.auth.render(scope)
            auth = self.service_auth(spec.service, None)
        else:
            return None
        base_url = _as_str(service.base_url.render(scope), "base_url") if service.base_url else None
        # Credentials go only to the service's own origin: an absolute `url` elsewhere, or a
        # next page on another host (allow_cross_host), gets none.
        if base_url and origin(request.url) != origin(base_url):
            return None
        return auth.authorizer(config, base_url)

    async def send(
        self,
        step: StepSpec,
        request: PreparedRequest,
        scope: dict[str, Any],
        *,
        first_attempt: int = 1,
        initial_wait: float | None = None,
    ) -> Response:
        assert step.request is not None
        client = self.client(step.request.service)
        authorize = self._authorizer(step, request, scope) if self.uses_auth else None
        try:
            response = await client.send(
                request,
                retry=step.retry,
                timeouts=step.timeout,
                retry_unsafe=step.retry_unsafe,
                max_body_bytes=step.response.max_body_bytes,
                first_attempt=first_attempt,
                initial_wait=initial_wait,
                authorize=authorize,
            )
        finally:
            if self.auths:
                self._refresh_auth_scope()
        if self.debug:  # redacting costs a regex pass per request
            log.debug(
                "%s %s -> %s (attempt %d)",
                request.method,
                self.redactor.redact(response.url),
                response.status,
                response.attempts,
            )
        return response

    def _refresh_auth_scope(self) -> None:
        for (service, step_id), auth in self.auths.items():
            if not step_id and auth.token_response is not None:
                self.auth_scope[service] = auth.token_response

    async def exchange(
        self, step: StepSpec, request: PreparedRequest, scope: dict[str, Any]
    ) -> tuple[Response | None, TransportError | None]:
        """Send and decode; with `poll`, resend until `until` holds. A transport failure after
        all retries is returned, for an `on_status: error` rule to see."""
        started = self.clock.monotonic() if step.poll is not None else 0.0
        while True:
            try:
                response = await self.send(step, request, scope)
            except TransportError as exc:
                return None, exc
            self.decode(step, response)
            if step.poll is None:
                return response, None
            rscope = self._response_scope(scope, response, request)
            if truthy(step.poll.until.search(rscope)):
                return response, None
            if step.poll.fail_when is not None and truthy(step.poll.fail_when.search(rscope)):
                raise RunError(
                    self._message(
                        step.poll.message,
                        rscope,
                        f"poll failed: fail_when ({step.poll.fail_when.source}) is true",
                    ),
                    kind="http",
                    **self._request_fields(request, response),
                )
            if self.clock.monotonic() - started + step.poll.interval > step.poll.timeout:
                raise UnavailableError(
                    self._message(
                        step.poll.message,
                        rscope,
                        f"poll timed out after {step.poll.timeout:g} s: until "
                        f"({step.poll.until.source}) never held",
                    ),
                    kind="timeout",
                    **self._request_fields(request, response),
                )
            await self.clock.sleep(step.poll.interval)

    def decode(self, step: StepSpec, response: Response) -> None:
        """Decode the body in place of the raw bytes (kept in `response.body` as data)."""
        raw = response.body
        ctype = response.content_type
        if 200 <= response.status < 300:
            try:
                data = decode_body(raw, ctype, step.response)
            except DecodeError as exc:
                raise exc.in_context(
                    url=self.redactor.redact(response.url), status=response.status
                ) from exc.__cause__
        else:
            data = decode_lenient(raw, ctype, step.response)
        response.data = data

    def _response_scope(
        self, scope: dict[str, Any], response: Response | None, request: PreparedRequest
    ) -> dict[str, Any]:
        if response is None:
            return {
                **scope,
                "status": None,
                "reason": None,
                "headers": {},
                "body": None,
                "url": request.url,
            }
        return {**scope, **_response_dict(response)}

    def _request_fields(
        self, request: PreparedRequest, response: Response | None
    ) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "method": request.method,
            "url": self.redactor.redact(response.url if response else request.url),
        }
        if response is not None:
            fields.update(
                status=response.status,
                reason=response.reason,
                body=self.redactor.excerpt(response.body, BODY_KEEP_CHARS),
                attempts=response.attempts,
                elapsed_s=response.elapsed_s,
            )
        return fields

    def _message(self, template: Any, scope: dict[str, Any], default: str) -> str:
        """A rule's or poll's `message`; one that fails to render falls back to the default."""
        if template is None:
            return default
        try:
            return self.redactor.redact(str(template.render(scope)))
        except RunError:
            return default

    def match_rule(self, step: StepSpec, rscope: dict[str, Any]) -> RuleSpec | None:
        status = rscope["status"]
        for rule in step.on_status:
            if not rule.matches_status(status):
                continue
            if rule.when is not None and not truthy(rule.when.search(rscope)):
                continue
            return rule
        return None

    async def handle(
        self,
        step: StepSpec,
        ctx: Context,
        scope: dict[str, Any],
        request: PreparedRequest,
        response: Response | None,
        failure: TransportError | None,
        pager: Pagination,
    ) -> tuple[Outcome, Page]:
        """Apply the rules to the final response; returns "more" when the pagination may go
        on, else the outcome for the step; and the page's records, selected but not mapped."""
        report = self.reports[step.id]
        while True:
            rscope = self._response_scope(scope, response, request)
            rule = self.match_rule(step, rscope) if step.on_status else None
            if rule is None:
                if failure is not None:
                    raise failure
                assert response is not None
                action = "ok" if 200 <= response.status < 300 else "fail"
            else:
                action = rule.action
                self._rule_effects(step, ctx, rule, rscope)
            if response is not None and step.referenced:
                kept = _response_dict(response)
                ctx.sink.step_response(step.id, kept)
                if ctx.steps is not self.steps_scope and step.id in ctx.steps:
                    ctx.steps[step.id]["response"] = kept
            if action != "retry":
                break
            assert rule is not None
            response, failure = await self._retry(
                step, request, scope, rule, rscope, response, failure
            )
        if action == "fail":
            raise self._failure(step, rule, rscope, request, response, failure)
        if action == "goto":
            assert rule is not None and rule.goto is not None
            return Goto(rule.goto), NO_PAGE
        if action == "stop":
            return STOP, NO_PAGE
        if action == "skip":
            report.skipped += 1
            return NEXT, NO_PAGE
        # ok and end: expect, set, select (mapped by the caller), stop_when.
        if step.expect:
            self._check_expect(step, rscope, request, response)
        if step.set:
            self._apply_set(step, ctx, step.set, rscope)
        page = self._select(step, rscope, pager)
        if action == "end":
            return END, page
        if step.paginate is None:
            return NEXT, page
        if page.repeated:
            self.warn(
                f"step '{step.id}': page {pager.pages + 1} repeated the previous page's records; "
                "pagination ended"
            )
            return NEXT, page
        if step.paginate.stop_when is not None and truthy(step.paginate.stop_when.search(rscope)):
            return NEXT, page
        return "more", page

    async def _retry(
        self,
        step: StepSpec,
        request: PreparedRequest,
        scope: dict[str, Any],
        rule: RuleSpec,
        rscope: dict[str, Any],
        response: Response | None,
        failure: TransportError | None,
    ) -> tuple[Response | None, TransportError | None]:
        """The `retry` action: resend, sharing max_attempts with the transport's retries."""
        attempts = response.attempts if response else (failure.attempts if failure else None) or 1
        if attempts >= step.retry.max_attempts:
            status = response.status if response is not None else None
            error_class = UnavailableError if is_unavailable_status(status) else RunError
            raise error_class(
                self._message(
                    rule.message, rscope, f"retry attempts exhausted ({attempts} attempts)"
                ),
                kind=rule.kind or ("unavailable" if error_class is UnavailableError else "http"),
                **self._request_fields(request, response),
            )
        delay: float | None = None
        if isinstance(rule.delay, float):
            delay = rule.delay
        elif rule.delay is not None:
            value = rule.delay.search(rscope)
            delay = float(value) if isinstance(value, int | float | str) and value != "" else None
        if delay is None and response is not None:
            delay = retry_after_seconds(response.headers.get("retry-after"), self.clock.time())
            if delay is not None and delay > step.retry.max_retry_after:
                raise UnavailableError(
                    f"Retry-After of {delay:g} s exceeds max_retry_after "
                    f"({step.retry.max_retry_after:g} s)",
                    **self._request_fields(request, response),
                )
        if delay is None:
            delay = backoff_delay(step.retry, attempts, self.rng)
        # The client counts this resend (first_attempt > 1) in stats.retries.
        try:
            new = await self.send(
                step, request, scope, first_attempt=attempts + 1, initial_wait=delay
            )
        except TransportError as exc:
            return None, exc
        self.decode(step, new)
        return new, None

    def _failure(
        self,
        step: StepSpec,
        rule: RuleSpec | None,
        rscope: dict[str, Any],
        request: PreparedRequest,
        response: Response | None,
        failure: TransportError | None,
    ) -> RunError:
        if failure is not None and response is None:
            if rule is not None and rule.message is not None:
                failure.message = self._message(rule.message, rscope, failure.message)
            return failure
        assert response is not None
        status = response.status
        if rule is None:
            unavailable = is_unavailable_status(status)
            default = (
                "the service stayed unavailable (try again later)"
                if unavailable
                else f"status {status} is not 2xx and no on_status rule matched it"
            )
            cls = UnavailableError if unavailable else RunError
            return cls(
                default,
                kind="unavailable" if unavailable else "http",
                **self._request_fields(request, response),
            )
        default = f"status {status} matched a fail rule"
        message = self._message(rule.message, rscope, default)
        kind = rule.kind or "http"
        cls = UnavailableError if kind == "unavailable" else RunError
        return cls(message, kind=kind, **self._request_fields(request, response))

    def _check_expect(
        self,
        step: StepSpec,
        rscope: dict[str, Any],
        request: PreparedRequest,
        response: Response | None,
    ) -> None:
        failed = []
        for expect in step.expect:
            if not truthy(expect.that.search(rscope)):
                failed.append(
                    self._message(
                        expect.message, rscope, f"expectation failed: {expect.that.source}"
                    )
                )
        if failed:
            raise ExpectError("; ".join(failed), **self._request_fields(request, response))

    def _apply_set(
        self, step: StepSpec, ctx: Context, sets: tuple[SetSpec, ...], rscope: dict[str, Any]
    ) -> None:
        if not sets:
            return
        values = {}
        for spec in sets:
            value = spec.expression.search(rscope)
            if spec.secret:
                self._add_secret(value)
            values[spec.name] = value
        ctx.sink.step_vars(step.id, values)
        local = ctx.steps.get(step.id)
        if local is not None and ctx.steps is not self.steps_scope:
            local["vars"].update(values)

    def _add_secret(self, value: Any) -> None:
        if isinstance(value, str):
            self.redactor.add(value)
        elif value is not None:
            self.redactor.add(json.dumps(value, ensure_ascii=False, separators=(",", ":")))

    def _rule_effects(
        self, step: StepSpec, ctx: Context, rule: RuleSpec, rscope: dict[str, Any]
    ) -> None:
        """A rule's own `set` and `emit` run whatever its action."""
        self._apply_set(step, ctx, rule.set, rscope)
        if rule.emit:
            if rule.fields is None:
                record = rscope["body"]
            else:
                record = {f.name: self._field(f, rscope, rscope) for f in rule.fields}
            ctx.sink.emit(rule.emit, record if isinstance(record, dict) else {"value": record})

    def _field(self, spec: FieldSpec, data: Any, scope: dict[str, Any]) -> Any:
        if spec.expression is not None:
            return spec.expression.search(data)
        assert spec.template is not None
        return spec.template.render(scope)

    def _select(self, step: StepSpec, rscope: dict[str, Any], pager: Pagination) -> Page:
        """What `records` selects from an ok response (the next page may be requested before
        these are mapped)."""
        report = self.reports[step.id]
        report.ok_responses += 1
        if step.records is None:
            return NO_PAGE
        selected = step.records.search(rscope)
        if selected is None:
            return NO_PAGE
        report.ok_with_records += 1
        records = selected if isinstance(selected, list) else [selected]
        if step.paginate is not None and pager.repeats(records):
            return Page(0, None, rscope, repeated=True)
        return Page(len(records), records, rscope)

    def _deliver(self, step: StepSpec, ctx: Context, page: Page) -> None:
        """Filter, shape and emit a page's records; keep them for `steps.<id>.records`."""
        records = page.records
        if records is None:
            return
        if step.filter is not None:
            keep = step.filter.search
            records = [r for r in records if truthy(keep(r))]
        if step.shape is not None:
            records = [step.shape(record) for record in records]
        elif step.fields is not None:
            assert page.rscope is not None
            records = self._shape(step.fields, records, page.rscope)
        self.reports[step.id].records += len(records)
        if step.emit:
            if step.fields is None:
                records = [r if isinstance(r, dict) else {"value": r} for r in records]
            ctx.sink.emit_many(step.emit, records)
        if step.referenced:
            ctx.sink.step_records(step.id, records)
            local = ctx.steps.get(step.id)
            if local is not None and ctx.steps is not self.steps_scope:
                local["records"].extend(records)

    def _shape(
        self, fields: tuple[FieldSpec, ...], records: list[Any], rscope: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """Fields with templates: each record in a scope of its own (`record`)."""
        out = []
        for record in records:
            tscope = dict(rscope)
            tscope["record"] = record
            out.append({f.name: self._field(f, record, tscope) for f in fields})
        return out


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "an object", str: "a string", bool: "a boolean"}.get(
        type(value), f"a {type(value).__name__}"
    )


def _as_str(value: Any, what: str) -> str:
    if value is None:
        raise RenderError(f"{what} rendered to null")
    return value if isinstance(value, str) else str(value)


def _header_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _default_content_type(headers: dict[str, str], value: str) -> None:
    """Content-Type for the body, unless the flow's headers set one (in any letter case)."""
    if not any(name.lower() == "content-type" for name in headers):
        headers["Content-Type"] = value


def _header_values(headers: Any) -> dict[str, str]:
    if not isinstance(headers, Mapping):
        raise RenderError(f"headers rendered to {_type_name(headers)}, not an object")
    return {str(k): _header_value(v) for k, v in headers.items() if v is not None}


def _form_bytes(data: Any) -> bytes:
    from urllib.parse import urlencode

    if not isinstance(data, Mapping):
        raise RenderError(f"form rendered to {_type_name(data)}, not an object")
    return urlencode(encode_query(data)).encode("ascii")


def _set_body_path(body: Any, path: str, value: Any) -> Any:
    """Set `a.b.c` in a JSON body (for `paginate.in: body`), creating objects on the way."""
    root = dict(body) if isinstance(body, Mapping) else {}
    node = root
    parts = path.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        child = dict(child) if isinstance(child, Mapping) else {}
        node[part] = child
        node = child
    node[parts[-1]] = value
    return root


def _response_dict(response: Response) -> dict[str, Any]:
    return {
        "status": response.status,
        "reason": response.reason,
        "headers": response.headers,
        "body": response.data,
        "url": response.url,
    }
