"""Frozen dataclasses of a flow, built from a validated document; every template and JMESPath
expression is compiled here, once, and every compile error is reported at its line and column."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import ExpressionError, FlowError, Problem
from .expressions import Expression, compile_expression, compile_shape
from .loader import Document
from .messages import DEFAULT_MAX_BODY_BYTES, DecodeOptions, RetryPolicy, Timeouts, TlsOptions
from .outputs import StreamSpec
from .templates import CompiledValue, Template, compile_template, compile_value, is_template

KeyPath = tuple[str | int, ...]

# Names a template or a root-level JMESPath expression may read (DESIGN, "The scope").
BASE_SCOPE = frozenset({"inputs", "env", "secrets", "state", "steps", "auth", "run"})
ITEM_SCOPE = frozenset({"item", "item_index"})
PAGE_SCOPE = frozenset({"page"})
RESPONSE_SCOPE = frozenset({"status", "reason", "headers", "body", "url"})
ALL_SCOPE = BASE_SCOPE | ITEM_SCOPE | PAGE_SCOPE | RESPONSE_SCOPE | {"record"}

ACTIONS = ("ok", "skip", "stop", "retry", "fail", "goto", "end")
BODY_KEYS = ("json", "form", "multipart", "body", "body_file")
DEFAULT_MAX_VISITS = 100
# The inputs schema of a flow without `inputs`: any mapping (read-only, shared).
NO_INPUTS: Mapping[str, Any] = {"type": "object"}

_SECRET_REF = re.compile(
    r"""secrets\s*(?:\.\s*([A-Za-z_][A-Za-z0-9_]*)|\[\s*(?:'([^']*)'|"([^"]*)")\s*\])"""
)


# The specs compare by identity (eq=False): a compiled spec is equal only to itself, as its
# Expressions already are. A value `__eq__` and `__hash__` would be two more methods for
# Python 3.11 to compile at every start, for nothing.
@dataclass(frozen=True, slots=True, eq=False)
class StatusMatch:
    """One `status` pattern of a rule: an inclusive range of codes, or `error` (no response)."""

    low: int = 0
    high: int = 0
    error: bool = False

    def matches(self, status: int | None) -> bool:
        if status is None:
            return self.error
        return not self.error and self.low <= status <= self.high


@dataclass(frozen=True, slots=True, eq=False)
class FieldSpec:
    """One output field: JMESPath on the record, or a template with the scope and `record`."""

    name: str
    expression: Expression | None = None
    template: Template | None = None


@dataclass(frozen=True, slots=True, eq=False)
class SetSpec:
    """One `set` entry: a variable from an expression, optionally a secret."""

    name: str
    expression: Expression
    secret: bool = False


@dataclass(frozen=True, slots=True, eq=False)
class RuleSpec:
    """One `on_status` rule: the statuses and condition it matches, its action and effects."""

    statuses: tuple[StatusMatch, ...]
    action: str
    when: Expression | None = None
    goto: str | None = None
    message: Template | None = None
    kind: str | None = None
    delay: Expression | float | None = None
    set: tuple[SetSpec, ...] = ()
    emit: str | None = None
    fields: tuple[FieldSpec, ...] | None = None
    path: KeyPath = ()

    def matches_status(self, status: int | None) -> bool:
        return any(m.matches(status) for m in self.statuses)


@dataclass(frozen=True, slots=True, eq=False)
class ExpectSpec:
    """One `expect` entry: a condition the response must meet, and its message."""

    that: Expression
    message: Template | None = None


@dataclass(frozen=True, slots=True, eq=False)
class PollSpec:
    """A step's `poll`: resend until `until` holds, fail on `fail_when` or the timeout."""

    until: Expression
    fail_when: Expression | None = None
    interval: float = 5.0
    timeout: float = 600.0
    message: Template | None = None


@dataclass(frozen=True, slots=True, eq=False)
class PaginateSpec:
    """A step's `paginate`: the pagination type, where the token goes, and when it ends."""

    type: str
    param: str
    location: str = "query"  # query | header | body | none
    start: int = 1
    size_param: str | None = None
    size: int | None = None
    limit_param: str | None = None
    limit: int | None = None
    total_pages: Expression | None = None
    total: Expression | None = None
    cursor: Expression | None = None
    next_url: Expression | None = None
    max_pages: int | None = None
    stop_when: Expression | None = None


@dataclass(frozen=True, slots=True, eq=False)
class RequestSpec:
    """A step's `request`, compiled: method, service, URL or path, query, headers, body."""

    method: str = "GET"
    service: str | None = None
    path: Template | None = None
    url: Template | None = None
    query: CompiledValue | None = None
    headers: CompiledValue | None = None
    body_kind: str | None = None  # one of BODY_KEYS
    body: CompiledValue | None = None
    content_type: Template | None = None
    body_file: str | None = None
    body_template: Template | None = None  # the compiled body_file


AuthOverride = Literal["inherit", "none"] | CompiledValue


@dataclass(frozen=True, slots=True, eq=False)
class StepSpec:
    """One step, compiled: its request, iteration, rules, mapping and output."""

    id: str
    path: KeyPath
    request: RequestSpec | None = None
    when: Expression | None = None
    for_each: Expression | None = None
    concurrency: int = 1
    max_items: int | None = None
    max_visits: int = DEFAULT_MAX_VISITS
    steps: tuple[StepSpec, ...] = ()
    auth: AuthOverride = "inherit"
    retry: RetryPolicy = RetryPolicy()
    timeout: Timeouts = Timeouts()
    retry_unsafe: bool = False
    paginate: PaginateSpec | None = None
    poll: PollSpec | None = None
    response: DecodeOptions = DecodeOptions()
    on_status: tuple[RuleSpec, ...] = ()
    expect: tuple[ExpectSpec, ...] = ()
    records: Expression | None = None
    filter: Expression | None = None
    fields: tuple[FieldSpec, ...] | None = None
    emit: str | None = None
    set: tuple[SetSpec, ...] = ()
    # Some expression reads steps.<id>: only then are its records, response and vars kept
    # (the others stream straight to the writers, and memory stays flat).
    referenced: bool = False
    # `fields` as one compiled function when every field is JMESPath on the record.
    shape: Callable[[Any], dict[str, Any]] | None = None

    def walk(self) -> Iterator[StepSpec]:
        yield self
        for inner in self.steps:
            yield from inner.walk()


@dataclass(frozen=True, slots=True, eq=False)
class ServiceSpec:
    """One entry of `services`, compiled: base URL, auth, headers and transport settings."""

    name: str
    base_url: Template | None = None
    auth: CompiledValue | None = None
    headers: CompiledValue | None = None
    timeout: Timeouts = Timeouts()
    retry: RetryPolicy = RetryPolicy()
    rate_limit: tuple[int, float] | None = None
    max_concurrency: int | None = None
    tls: TlsOptions = TlsOptions()
    cookies: bool = False
    allow_insecure_http: bool = False
    allow_cross_host: bool = False


@dataclass(frozen=True, slots=True, eq=False)
class Flow:
    """A validated flow file, compiled: ready to run."""

    file: str
    name: str
    description: str
    inputs_schema: Mapping[str, Any]
    services: Mapping[str, ServiceSpec]
    steps: tuple[StepSpec, ...]
    outputs: Mapping[str, StreamSpec]
    emitted: frozenset[str]  # every stream some emit names
    secrets: frozenset[str]  # secret names read statically, resolved before the first request
    document: Document = field(repr=False)

    def all_steps(self) -> Iterator[StepSpec]:
        for step in self.steps:
            yield from step.walk()

    @property
    def streams(self) -> frozenset[str]:
        return self.emitted | frozenset(self.outputs)


class _Builder:
    """Builds the model, collecting every compile problem with its location."""

    def __init__(self, doc: Document) -> None:
        self.doc = doc
        self.problems: list[Problem] = []
        self.step_refs: set[str] = set()
        self.secrets: set[str] = set()
        self.emitted: set[str] = set()

    # -- compiling, with locations ------------------------------------------------------

    def _compile(self, path: KeyPath, build: Callable[[], Any]) -> Any:
        try:
            return build()
        except ExpressionError as exc:
            line, column = self.doc.value_mark(path)
            self.problems.append(Problem(self.doc.file, line, column, _format(path), exc.message))
            return None

    def template(self, path: KeyPath, source: Any, mode: str = "value") -> Template | None:
        if source is None:
            return None
        text = source if isinstance(source, str) else str(source)
        compiled: Template | None = self._compile(path, lambda: compile_template(text, mode))  # type: ignore[arg-type]
        if compiled is not None:
            self._note_template(text, compiled.step_refs)
        return compiled

    def value(self, path: KeyPath, data: Any, mode: str = "value") -> CompiledValue | None:
        if data is None:
            return None
        # Compile leaf by leaf first, so that an error names the exact key.
        ok = True
        for leaf_path, leaf in _leaves(path, data):
            if isinstance(leaf, str) and is_template(leaf):
                ok = self.template(leaf_path, leaf, mode) is not None and ok
        if not ok:
            return None
        compiled: CompiledValue = compile_value(data, mode)  # type: ignore[arg-type]
        return compiled

    def expression(self, path: KeyPath, source: Any) -> Expression | None:
        if source is None:
            return None
        text = source if isinstance(source, str) else str(source)
        compiled: Expression | None = self._compile(path, lambda: compile_expression(text))
        if compiled is not None:
            self.step_refs.update(compiled.step_refs)
        return compiled

    def _note_template(self, text: str, step_refs: frozenset[str]) -> None:
        self.step_refs.update(step_refs)
        for match in _SECRET_REF.finditer(text):
            self.secrets.add(next(g for g in match.groups() if g is not None))

    # -- pieces -------------------------------------------------------------------------

    def fields(self, path: KeyPath, data: Any) -> tuple[FieldSpec, ...] | None:
        if data is None:
            return None
        out = []
        for name, source in data.items():
            fpath = (*path, name)
            text = source if isinstance(source, str) else str(source)
            if is_template(text):
                out.append(FieldSpec(name, template=self.template(fpath, text)))
            else:
                out.append(FieldSpec(name, expression=self.expression(fpath, text)))
        return tuple(out)

    def sets(self, path: KeyPath, data: Any) -> tuple[SetSpec, ...]:
        out = []
        for name, spec in (data or {}).items():
            if isinstance(spec, dict):
                expr = self.expression((*path, name, "value"), spec.get("value"))
                secret = bool(spec.get("secret", False))
            else:
                expr = self.expression((*path, name), spec)
                secret = False
            if expr is not None:
                out.append(SetSpec(name, expr, secret))
        return tuple(out)

    def rule(self, path: KeyPath, data: Mapping[str, Any]) -> RuleSpec:
        delay: Expression | float | None = None
        raw_delay = data.get("delay")
        if isinstance(raw_delay, int | float) and not isinstance(raw_delay, bool):
            delay = float(raw_delay)
        elif raw_delay is not None:
            delay = self.expression((*path, "delay"), raw_delay)
        if data.get("emit"):
            self.emitted.add(data["emit"])
        return RuleSpec(
            statuses=parse_statuses(data.get("status")),
            action=data.get("action", "ok"),
            when=self.expression((*path, "when"), data.get("when")),
            goto=data.get("goto"),
            message=self.template((*path, "message"), data.get("message"), "text"),
            kind=data.get("kind"),
            delay=delay,
            set=self.sets((*path, "set"), data.get("set")),
            emit=data.get("emit"),
            fields=self.fields((*path, "fields"), data.get("fields")),
            path=path,
        )

    def request(self, path: KeyPath, data: Mapping[str, Any]) -> RequestSpec:
        body_kind = next((k for k in BODY_KEYS if k in data), None)
        body: CompiledValue | None = None
        body_file: str | None = None
        body_template: Template | None = None
        if body_kind == "body_file":
            body_file = str(data["body_file"])
            body_template = self._body_file((*path, "body_file"), body_file)
        elif body_kind == "body":
            body = self.value((*path, "body"), data["body"], "text")
        elif body_kind is not None:
            body = self.value((*path, body_kind), data[body_kind])
        return RequestSpec(
            method=str(data.get("method", "GET")).upper(),
            service=data.get("service"),
            path=self.template((*path, "path"), data.get("path"), "path"),
            url=self.template((*path, "url"), data.get("url")),
            query=self.value((*path, "query"), data.get("query")),
            headers=self.value((*path, "headers"), data.get("headers")),
            body_kind=body_kind,
            body=body,
            content_type=self.template((*path, "content_type"), data.get("content_type"), "text"),
            body_file=body_file,
            body_template=body_template,
        )

    def _body_file(self, path: KeyPath, name: str) -> Template | None:
        base = Path(self.doc.file).parent
        file = base / name
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            self.problems.append(self.doc.problem(path, f"cannot read body_file {name!r}: {exc}"))
            return None
        autoescape = file.suffix.lower() in (".xml", ".html", ".htm")
        try:
            template = compile_template(text, "text", autoescape)
        except ExpressionError as exc:
            self.problems.append(self.doc.problem(path, f"in {name}: {exc.message}"))
            return None
        self._note_template(text, template.step_refs)
        return template

    def paginate(self, path: KeyPath, data: Mapping[str, Any] | None) -> PaginateSpec | None:
        if data is None:
            return None
        kind = data["type"]
        default_param = {"page_number": "page", "offset": "offset", "cursor": "cursor"}.get(
            kind, ""
        )
        return PaginateSpec(
            type=kind,
            param=str(data.get("param", default_param)),
            location=data.get("in", "query"),
            start=int(data.get("start", 1)),
            size_param=data.get("size_param"),
            size=data.get("size"),
            limit_param=data.get("limit_param", "limit" if kind == "offset" else None),
            limit=data.get("limit"),
            total_pages=self.expression((*path, "total_pages"), data.get("total_pages")),
            total=self.expression((*path, "total"), data.get("total")),
            cursor=self.expression((*path, "cursor"), data.get("cursor")),
            next_url=self.expression((*path, "next_url"), data.get("next_url")),
            max_pages=data.get("max_pages"),
            stop_when=self.expression((*path, "stop_when"), data.get("stop_when")),
        )

    def poll(self, path: KeyPath, data: Mapping[str, Any] | None) -> PollSpec | None:
        if data is None:
            return None
        until = self.expression((*path, "until"), data.get("until"))
        if until is None:
            return None
        return PollSpec(
            until=until,
            fail_when=self.expression((*path, "fail_when"), data.get("fail_when")),
            interval=float(data.get("interval", 5)),
            timeout=float(data.get("timeout", 600)),
            message=self.template((*path, "message"), data.get("message"), "text"),
        )

    def step(self, path: KeyPath, data: Mapping[str, Any], services: Mapping[str, Any]) -> StepSpec:
        request_data = data.get("request")
        request = self.request((*path, "request"), request_data) if request_data else None
        service = services.get(request.service) if request and request.service else None
        base_retry = service.retry if isinstance(service, ServiceSpec) else RetryPolicy()
        base_timeout = service.timeout if isinstance(service, ServiceSpec) else Timeouts()
        auth: AuthOverride = "inherit"
        if data.get("auth") == "none":
            auth = "none"
        elif isinstance(data.get("auth"), dict):
            compiled_auth = self.value((*path, "auth"), data["auth"])
            if compiled_auth is not None:
                auth = compiled_auth
        if data.get("emit"):
            self.emitted.add(data["emit"])
        inner = tuple(
            self.step((*path, "steps", i), s, services)
            for i, s in enumerate(data.get("steps") or [])
        )
        return StepSpec(
            id=data["id"],
            path=path,
            request=request,
            when=self.expression((*path, "when"), data.get("when")),
            for_each=self.expression((*path, "for_each"), data.get("for_each")),
            concurrency=int(data.get("concurrency", 1)),
            max_items=data.get("max_items"),
            max_visits=int(data.get("max_visits", DEFAULT_MAX_VISITS)),
            steps=inner,
            auth=auth,
            retry=merge_retry(base_retry, data.get("retry")),
            timeout=merge_timeouts(base_timeout, data.get("timeout")),
            retry_unsafe=bool(data.get("retry_unsafe", False)),
            paginate=self.paginate((*path, "paginate"), data.get("paginate")),
            poll=self.poll((*path, "poll"), data.get("poll")),
            response=decode_options(data.get("response")),
            on_status=tuple(
                self.rule((*path, "on_status", i), r)
                for i, r in enumerate(data.get("on_status") or [])
            ),
            expect=tuple(
                ExpectSpec(
                    that=e,
                    message=self.template(
                        (*path, "expect", i, "message"), x.get("message"), "text"
                    ),
                )
                for i, x in enumerate(data.get("expect") or [])
                if (e := self.expression((*path, "expect", i, "that"), x.get("that"))) is not None
            ),
            records=self.expression((*path, "records"), data.get("records")),
            filter=self.expression((*path, "filter"), data.get("filter")),
            fields=self.fields((*path, "fields"), data.get("fields")),
            emit=data.get("emit"),
            set=self.sets((*path, "set"), data.get("set")),
        )

    def service(self, name: str, data: Mapping[str, Any]) -> ServiceSpec:
        path: KeyPath = ("services", name)
        rate = data.get("rate_limit")
        tls = data.get("tls") or {}
        return ServiceSpec(
            name=name,
            base_url=self.template((*path, "base_url"), data.get("base_url")),
            auth=self.value((*path, "auth"), data.get("auth")),
            headers=self.value((*path, "headers"), data.get("headers")),
            timeout=merge_timeouts(Timeouts(), data.get("timeout")),
            retry=merge_retry(RetryPolicy(), data.get("retry")),
            rate_limit=(int(rate["requests"]), float(rate["per_seconds"])) if rate else None,
            max_concurrency=data.get("max_concurrency"),
            tls=TlsOptions(
                verify=bool(tls.get("verify", True)),
                ca_file=tls.get("ca_file"),
                client_cert=tls.get("client_cert"),
                client_key=tls.get("client_key"),
            ),
            cookies=bool(data.get("cookies", False)),
            allow_insecure_http=bool(data.get("allow_insecure_http", False)),
            allow_cross_host=bool(data.get("allow_cross_host", False)),
        )

    def outputs(self, data: Mapping[str, Any]) -> dict[str, StreamSpec]:
        out = {}
        for name, spec in data.items():
            spec = spec or {}
            cursor = spec.get("cursor")
            cursor_field = cursor.get("field") if isinstance(cursor, dict) else cursor
            cursor_type = cursor.get("type") if isinstance(cursor, dict) else None
            out[name] = StreamSpec(
                name=name,
                primary_key=tuple(spec.get("primary_key") or ()),
                cursor_field=cursor_field,
                cursor_type=cursor_type,
                schema=spec.get("schema"),
                on_invalid=spec.get("on_invalid", "fail"),
                write=spec.get("write"),
            )
        return out


def _format(path: KeyPath) -> str:
    from .errors import format_path

    return format_path(path)


def _leaves(path: KeyPath, data: Any) -> Iterator[tuple[KeyPath, Any]]:
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _leaves((*path, key), value)
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from _leaves((*path, i), value)
    else:
        yield path, data


_STATUS_RANGE = re.compile(r"^\s*(\d{3})\s*-\s*(\d{3})\s*$")
_STATUS_CLASS = re.compile(r"^\s*([1-5])[xX][xX]\s*$")


def parse_statuses(raw: Any) -> tuple[StatusMatch, ...]:
    """`404`, `"4xx"`, `"500-599"`, `error`, or a list of these."""
    if raw is None:
        return (StatusMatch(100, 599),)
    items = raw if isinstance(raw, list) else [raw]
    out = []
    for item in items:
        if isinstance(item, int):
            out.append(StatusMatch(item, item))
            continue
        text = str(item).strip()
        if text == "error":
            out.append(StatusMatch(error=True))
        elif text.isdigit():
            out.append(StatusMatch(int(text), int(text)))
        elif m := _STATUS_CLASS.match(text):
            base = int(m.group(1)) * 100
            out.append(StatusMatch(base, base + 99))
        elif m := _STATUS_RANGE.match(text):
            out.append(StatusMatch(int(m.group(1)), int(m.group(2))))
        else:
            raise ValueError(f"not a status pattern: {item!r}")
    return tuple(out)


def status_pattern_error(raw: Any) -> str | None:
    try:
        parse_statuses(raw)
    except ValueError as exc:
        return str(exc)
    return None


def merge_retry(base: RetryPolicy, override: Mapping[str, Any] | None) -> RetryPolicy:
    """Step-level retry merges field by field over the service's."""
    if not override:
        return base
    return RetryPolicy(
        max_attempts=int(override.get("max_attempts", base.max_attempts)),
        initial_delay=float(override.get("initial_delay", base.initial_delay)),
        multiplier=float(override.get("multiplier", base.multiplier)),
        max_delay=float(override.get("max_delay", base.max_delay)),
        max_retry_after=float(override.get("max_retry_after", base.max_retry_after)),
    )


def merge_timeouts(base: Timeouts, override: Mapping[str, Any] | None) -> Timeouts:
    if not override:
        return base
    return Timeouts(
        connect=float(override.get("connect", base.connect)),
        read=float(override.get("read", base.read)),
        total=float(override.get("total", base.total)),
    )


def decode_options(data: Mapping[str, Any] | None) -> DecodeOptions:
    if not data:
        return DecodeOptions()
    xml = data.get("xml") or {}
    csv = data.get("csv") or {}
    force_list = xml.get("force_list") or ()
    if isinstance(force_list, str):
        force_list = (force_list,)
    return DecodeOptions(
        format=data.get("format", "auto"),
        max_body_bytes=int(data.get("max_body_bytes", DEFAULT_MAX_BODY_BYTES)),
        xml_force_list=tuple(force_list),
        xml_namespaces=xml.get("namespaces", "strip"),
        xml_attr_prefix=xml.get("attr_prefix", "@"),
        xml_text_key=xml.get("text_key", "#text"),
        csv_delimiter=csv.get("delimiter", ","),
        csv_encoding=csv.get("encoding"),
    )


def build_flow(doc: Document) -> Flow:
    """The model of a schema-valid document; FlowError with every compile problem otherwise."""
    data: Mapping[str, Any] = doc.data
    builder = _Builder(doc)
    services = {
        name: builder.service(name, spec or {})
        for name, spec in (data.get("services") or {}).items()
    }
    steps = tuple(builder.step(("steps", i), s, services) for i, s in enumerate(data["steps"]))
    outputs = builder.outputs(data.get("outputs") or {})
    if builder.problems:
        raise FlowError(builder.problems)
    referenced = builder.step_refs
    steps = tuple(_mark_kept(s, referenced) for s in steps)
    return Flow(
        file=doc.file,
        name=str(data.get("name") or Path(doc.file).stem),
        description=str(data.get("description") or ""),
        inputs_schema=data.get("inputs") or NO_INPUTS,
        services=services,
        steps=steps,
        outputs=outputs,
        emitted=frozenset(builder.emitted),
        secrets=frozenset(builder.secrets),
        document=doc,
    )


def _mark_kept(step: StepSpec, referenced: set[str]) -> StepSpec:
    from dataclasses import replace

    inner = tuple(_mark_kept(s, referenced) for s in step.steps)
    shape = None
    if step.fields is not None and all(f.expression is not None for f in step.fields):
        shape = compile_shape(tuple((f.name, f.expression) for f in step.fields if f.expression))
    return replace(step, steps=inner, referenced=step.id in referenced, shape=shape)
