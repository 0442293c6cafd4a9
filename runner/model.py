"""Frozen dataclasses of a compiled flow, and the readings of its plain settings (statuses,
retry, timeouts, response options). The compile pass (compiler.py) builds them."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .expressions import Expression
from .loader import Document
from .messages import DEFAULT_MAX_BODY_BYTES, DecodeOptions, RetryPolicy, Timeouts, TlsOptions
from .outputs import StreamSpec
from .templates import CompiledValue, Template

KeyPath = tuple[str | int, ...]

ACTIONS = ("ok", "skip", "stop", "retry", "fail", "goto", "end")
BODY_KEYS = ("json", "form", "multipart", "body", "body_file")
DEFAULT_MAX_VISITS = 100
# Records kept for `steps.<id>.records` when an expression reads them: they stay in memory
# for the run, so a step that pages without end must not hold them all. `null` lifts it.
DEFAULT_MAX_RECORDS = 100_000
# The inputs schema of a flow without `inputs`: any mapping (read-only, shared).
NO_INPUTS: Mapping[str, Any] = {"type": "object"}


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


# Pages a pagination fetches when the flow does not say: an API that always answers with a
# next cursor must not grow a file or the memory without bound. `max_pages: null` lifts it.
DEFAULT_MAX_PAGES = 10_000


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
    max_pages: int | None = None  # None: no cap, set deliberately (`max_pages: null`)
    stop_when: Expression | None = None
    max_pages_is_default: bool = False  # the cap is DEFAULT_MAX_PAGES: reaching it warns


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
    parallel: bool = False  # `steps` run at the same time, at most `concurrency` at once
    concurrency: int = 1
    max_items: int | None = None
    # Under --shard, a for_each with `shard: true` runs the items this shard owns, by the hash
    # of the item or of `shard_key` on it (runner/shard.py).
    shard: bool = False
    shard_key: Expression | None = None
    # Its records differ from shard to shard (it is, or is inside, a `shard: true` step, or it
    # reads one's steps.<id>): every shard writes them, not shard 0 alone.
    in_shard: bool = False
    max_visits: int = DEFAULT_MAX_VISITS
    max_records: int | None = DEFAULT_MAX_RECORDS  # kept for steps.<id>.records
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
    # After `fields`, in this order: add (or overwrite) keys, drop keys, rename keys.
    add_fields: tuple[FieldSpec, ...] | None = None
    drop_fields: tuple[str, ...] | None = None
    rename_keys: str | Mapping[str, str] | None = None
    emit: str | None = None
    set: tuple[SetSpec, ...] = ()
    # Some expression reads steps.<id>: only then are its records, response and vars kept
    # (the others stream straight to the writers, and memory stays flat).
    referenced: bool = False
    # `fields` as one compiled function when every field is JMESPath on the record.
    shape: Callable[[Any], dict[str, Any]] | None = None
    # `add_fields`, `drop_fields` and `rename_keys` as one function of a record and the
    # response's scope (compiled when the flow loads); None when the step has none of them.
    reshape: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]] | None = None

    def walk(self) -> Iterator[StepSpec]:
        yield self
        for inner in self.steps:
            yield from inner.walk()


@dataclass(frozen=True, slots=True, eq=False)
class AuthAlternative:
    """One entry of a list of auth alternatives: used when its `when` holds (or has none)."""

    when: Expression | Template | None
    auth: CompiledValue
    secrets: frozenset[str]  # the secrets its templates name: required only when chosen


@dataclass(frozen=True, slots=True, eq=False)
class ServiceSpec:
    """One entry of `services`, compiled: base URL, auth, headers and transport settings."""

    name: str
    base_url: Template | None = None
    auth: CompiledValue | None = None
    # `auth: [...]`: the alternatives, until the run chooses one into `auth`.
    auth_alternatives: tuple[AuthAlternative, ...] = ()
    # `auth: {use: S}`: S's auth, with S's token cache, refresh and rotated refresh token.
    auth_use: str | None = None
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
class Read:
    """A name a template reads that must exist before the first request: an environment
    variable read without a default (`| default`, `is defined`), or a secret. `where` is
    `file:line:col: key.path`."""

    name: str
    where: str
    path: str = ""  # the key path alone (`services.api.auth[1].username`)


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
    # Read by templates, checked before the first request, with where they are read.
    env_reads: tuple[Read, ...] = ()
    secret_reads: tuple[Read, ...] = ()
    # What `--shard` warns of: steps outside every `shard: true` step that send an unsafe
    # method (N times) or read a sharded step's values (validate warns of them too).
    shard_warnings: tuple[str, ...] = ()

    def auth_owner(self, service: str) -> str:
        """The service whose auth (token cache, refresh, stored refresh token) `service` uses."""
        spec = self.services.get(service)
        return spec.auth_use if spec is not None and spec.auth_use else service

    def all_steps(self) -> Iterator[StepSpec]:
        for step in self.steps:
            yield from step.walk()

    @property
    def streams(self) -> frozenset[str]:
        return self.emitted | frozenset(self.outputs)

    @property
    def sharded(self) -> bool:
        """Some for_each step has `shard: true`: `--shard` can split it."""
        return any(step.shard for step in self.all_steps())


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
        compression=data.get("compression", "auto"),
    )


def declared_inputs(schema: Any) -> tuple[str, ...] | None:
    """The input names an inputs schema declares, when it declares them as the complete list:
    `properties`, and no `additionalProperties` (or `false`) and no `patternProperties`.
    None when any name is welcome."""
    if not isinstance(schema, Mapping):
        return None
    properties = schema.get("properties")
    if not isinstance(properties, Mapping):
        return None
    if schema.get("additionalProperties", False) is not False or "patternProperties" in schema:
        return None
    return tuple(str(name) for name in properties)
