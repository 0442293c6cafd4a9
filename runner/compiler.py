"""The one compile pass of a flow: from a loaded document to the compiled Flow, or to every
located problem, schema and semantic together, sorted by position, each once.

The pass checks the document against the JSON Schema (schema.py), then walks it once: each
template and JMESPath expression is compiled once, the names it reads are checked against
the scope, the references across the flow (services, goto targets, `steps.<id>`, step ids,
streams) are resolved, and the model (model.py) is built from the same compiled objects.
Warnings come from the same walk. `runner validate` is this pass without running;
`load_flow` is this pass, then the run.

A document the schema found errors in is walked too, for its semantic problems: the walk
reads only the shapes it expects (a mapping where a mapping belongs, a string where an
expression belongs) and leaves the rest to the schema's problems. Plain settings (numbers,
durations, enums) are read in `_settle`, which on such a document skips a piece it cannot
read instead of failing.

Where a new flow key goes: its JSON Schema in schemas/flow.schema.json; its field in the
spec of model.py; its compiling, checks and reading in the method of its section here
(`_service`, `_step`, `_request`, `_paginate`, `_poll`, `_rule`, `_expect`, `_outputs`),
templates through `template`/`value`, expressions through `expression`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path as FilePath
from typing import Any, Final, TypeVar

from runner.errors import (
    ExpressionError,
    FlowError,
    Problem,
    UsageError,
    did_you_mean,
    format_path,
)
from runner.expressions import (
    Expression,
    compile_expression,
    compile_shape,
    parse_datetime,
    template_expression,
)
from runner.loader import Document, Path
from runner.messages import DecodeOptions, RetryPolicy, Timeouts, TlsOptions, is_loopback
from runner.model import (
    BODY_KEYS,
    DEFAULT_MAX_PAGES,
    DEFAULT_MAX_RECORDS,
    DEFAULT_MAX_VISITS,
    NO_INPUTS,
    AuthAlternative,
    AuthOverride,
    ExpectSpec,
    FieldSpec,
    Flow,
    PaginateSpec,
    PollSpec,
    Read,
    RequestSpec,
    RuleSpec,
    ServiceSpec,
    SetSpec,
    StepSpec,
    declared_inputs,
    decode_options,
    merge_retry,
    merge_timeouts,
    parse_statuses,
)
from runner.outputs import StreamSpec
from runner.rendering import Mode
from runner.reshape import RENAME_MODES, compile_reshape
from runner.reuse import Includes, expand, without_note
from runner.schema import schema_problems
from runner.templates import CompiledValue, Template, compile_template, compile_value, is_template
from runner.timeutil import parse_duration

__all__ = ["SCOPE_NAMES", "Compiled", "build_flow", "compile_document", "merge_services"]

_T = TypeVar("_T")

# Names a template or a root-level JMESPath expression may read (DESIGN, "The scope").
SCOPE_NAMES: Final = frozenset(
    {"inputs", "env", "secrets", "state", "steps", "auth", "run", "item", "item_index", "page",
     "status", "reason", "headers", "body", "url"}
)  # fmt: skip
_ITEM_NAMES: Final = frozenset({"item", "item_index"})
_AUTH_WHEN_NAMES: Final = frozenset({"inputs", "env"})
_BODY_HINT: Final = "the response body is 'body'"
_RESPONSE_HINT: Final = (
    "the response is 'status', 'reason', 'headers', 'body' and 'url' (an earlier step's: "
    "steps.<id>.response)"
)
# Names a newcomer reaches for, and where the scope keeps what they mean.
_SCOPE_HINTS: Final = {
    "json": _BODY_HINT,
    "data": _BODY_HINT,
    "payload": _BODY_HINT,
    "content": _BODY_HINT,
    "result": _BODY_HINT,
    "response": _RESPONSE_HINT,
    "resp": _RESPONSE_HINT,
    "res": _RESPONSE_HINT,
    "r": _RESPONSE_HINT,
    "header": "the response headers are 'headers' (names in lower case)",
    "status_code": "the response status is 'status'",
    "environ": "environment variables are 'env.NAME'",
    "environment": "environment variables are 'env.NAME'",
    "vars": "the values a step sets are 'steps.<id>.vars.<name>'",
    "variables": "the values a step sets are 'steps.<id>.vars.<name>'",
    "records": "a step's records are 'steps.<id>.records'",
    "record": "'record' is in the scope of a step's `fields` templates only",
}
# A for_each that calls now() gives each shard its own items, unless shard_key picks a part.
_CALLS_NOW: Final = re.compile(r"\bnow\s*\(")
# `headers.content-type` reads `headers.content` minus `type`: a dashed name needs quotes.
_DASHED_HEADER: Final = re.compile(r"\bheaders\.([A-Za-z0-9_]+(?:-[A-Za-z0-9_]+)+)")
# A setting of the wrong shape, in a document the schema already found errors in.
_SHAPE_ERRORS: Final = (TypeError, ValueError, KeyError, AttributeError, IndexError, UsageError)

_SECRET_REF: Final = re.compile(
    r"""secrets\s*(?:\.\s*([A-Za-z_][A-Za-z0-9_]*)|\[\s*(?:'([^']*)'|"([^"]*)")\s*\])"""
)


@dataclasses.dataclass(frozen=True, slots=True)
class Compiled:
    """What the pass gives: the Flow when there is no error, and every problem, sorted."""

    flow: Flow | None
    problems: tuple[Problem, ...]
    # The services of the flow with its includes, for the warnings of a `--services` file.
    service_names: tuple[str, ...] = ()

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity != "error"]


def compile_document(
    doc: Document, services: Mapping[str, Any] | None = None, includes: Includes | None = None
) -> Compiled:
    """The one pass over `doc`. Its includes, defaults and definitions are merged in first
    (reuse.py), each merged key keeping its place; `services` (a checked `--services` file)
    then replaces keys of the flow's services before they are compiled. `includes` shares the
    included files between the flows of one `validate` run."""
    expanded = expand(doc, includes)
    doc = expanded.doc
    found = [*expanded.problems, *schema_problems(doc)]
    data = doc.data
    if not isinstance(data, dict):
        return Compiled(None, tuple(found))
    trusted = not any(p.severity == "error" for p in found)
    for included in expanded.included:
        found.extend(_included_services(included))
    if services is not None:
        data = _merged(data, services)
    compiler = _Compiler(doc, data, trusted, found)
    flow = compiler.flow()
    problems = _once([*found, *compiler.problems], expanded.notes)
    if any(p.severity == "error" for p in problems):
        flow = None
    names = tuple(str(name) for name in _mapping(data.get("services")))
    return Compiled(flow, problems, names)


def _included_services(doc: Document) -> list[Problem]:
    """The problems of an included file's services on their own, whoever includes it."""
    compiler = _Compiler(doc, doc.data, False, [])
    for name, raw in _mapping(_mapping(doc.data).get("services")).items():
        compiler._service(str(name), raw)
    return compiler.problems


def _once(problems: list[Problem], notes: frozenset[str]) -> tuple[Problem, ...]:
    """Sorted, each once. A problem in a merged value is dropped when the same problem is
    found where the value is written (it does not depend on the step that uses it), and is
    kept once per flow otherwise, naming the first step that uses it."""
    if not notes:
        return tuple(sorted(dict.fromkeys(problems)))
    # Where the value is written was checked on its own (the flow's and included files'
    # schema): a problem found there is the one reported at that place.
    plain = {(p.file, p.line, p.column, p.path) for p in problems if without_note(p, notes) is None}
    seen: set[tuple[str, int, int, str, str]] = set()
    kept: dict[Problem, None] = {}
    for p in problems:  # in the walk's order: the first step that uses the value is named
        base = without_note(p, notes)
        if base is not None:
            key = (p.file, p.line, p.column, p.path, base)
            if key[:4] in plain or key in seen:
                continue
            seen.add(key)
        kept[p] = None
    return tuple(sorted(kept))


def build_flow(doc: Document, services: Mapping[str, Any] | None = None) -> Flow:
    """The compiled Flow of `doc`; FlowError with every error otherwise."""
    compiled = compile_document(doc, services)
    if compiled.flow is None:
        raise FlowError(compiled.errors)
    return compiled.flow


def merge_services(doc: Document, overrides: Any) -> Document:
    """The flow with each key given for one of its services replacing that whole key.

    Services that the flow does not declare are ignored (one file serves many flows). Merged
    keys keep the location of their service in the flow file.
    """
    if not isinstance(doc.data, dict):
        return doc
    return dataclasses.replace(doc, data=_merged(doc.data, overrides))


def _merged(data: dict[str, Any], overrides: Any) -> dict[str, Any]:
    declared = data.get("services")
    if not isinstance(declared, dict) or not isinstance(overrides, Mapping):
        return data
    services = {
        name: {**service, **overrides[name]}
        if isinstance(service, dict) and isinstance(overrides.get(name), dict)
        else service
        for name, service in declared.items()
    }
    return {**data, "services": services}


# -- the steps' places, before anything is compiled ------------------------------------------


@dataclasses.dataclass(slots=True)
class _StepInfo:
    """Where a step sits in the flow, for the checks across steps."""

    id: str
    path: Path
    order: int  # position in the flattened order of the flow
    siblings: tuple[str, ...]  # ids of the sequence it is in (goto targets)
    in_item: bool  # inside a for_each (the step itself or an enclosing block)
    plain_for_each: bool  # a for_each step without a block
    outer_for_each: str | None  # the id of the for_each block it is inside, if any
    # The parallel blocks it is inside, each as (the block's id, the index of its child that
    # holds this step): two steps in different children of one block run at the same time.
    lanes: tuple[tuple[str, int], ...] = ()
    parallel_child: bool = False  # a direct child of a parallel block


def _walk_steps(
    steps: Any,
    path: Path,
    in_item: bool,
    out: dict[Path, _StepInfo],
    lanes: tuple[tuple[str, int], ...] = (),
    parallel: str | None = None,
    outer: str | None = None,
) -> None:
    if not isinstance(steps, list):
        return
    siblings = tuple(_id(s) for s in steps if isinstance(s, dict))
    for i, step in enumerate(steps):
        if not isinstance(step, dict):
            continue
        spath = (*path, i)
        is_for_each = "for_each" in step
        own_lanes = (*lanes, (parallel, i)) if parallel is not None else lanes
        out[spath] = _StepInfo(
            id=_id(step),
            path=spath,
            order=len(out),
            siblings=siblings,
            in_item=in_item or is_for_each,
            plain_for_each=is_for_each and "steps" not in step,
            outer_for_each=outer,
            lanes=own_lanes,
            parallel_child=parallel is not None,
        )
        if step.get("parallel") is True and not is_for_each:
            _walk_steps(
                step.get("steps"),
                (*spath, "steps"),
                in_item,
                out,
                own_lanes,
                _id(step) or "?",
                outer,
            )
        else:
            inner_outer = (_id(step) or "?") if is_for_each else outer
            _walk_steps(
                step.get("steps"), (*spath, "steps"), True, out, own_lanes, None, inner_outer
            )


def _id(step: dict[str, Any]) -> str:
    value = step.get("id", "")
    return value if isinstance(value, str) else ""


def _leaves(path: Path, data: Any) -> Iterator[tuple[Path, Any]]:
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _leaves((*path, key), value)
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from _leaves((*path, i), value)
    else:
        yield path, data


def _header_hint(source: str, jinja: bool) -> str:
    """For `headers.content-type`: how a header name with a dash is written."""
    match = _DASHED_HEADER.search(source)
    if match is None:
        return ""
    name = match.group(1).lower()
    written = f"headers['{name}']" if jinja else f'headers."{name}"'
    return f" (a header name with '-' is written {written})"


def _literal_insecure(url: Any) -> str | None:
    """The host of a literal http:// URL to a host that is not loopback, else None."""
    from urllib.parse import urlsplit

    if not isinstance(url, str) or "{{" in url or "{%" in url:
        return None
    parts = urlsplit(url.strip())
    if parts.scheme.lower() != "http" or not parts.hostname:
        return None
    return None if is_loopback(parts.hostname) else parts.hostname


def _insecure_message(host: str) -> str:
    return (
        f"plain http:// to {host} is refused: use https, or set allow_insecure_http: true "
        "on the service"
    )


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


# -- the walk ---------------------------------------------------------------------------------


class _Compiler:
    """Compiles, checks and builds in one walk, collecting every problem with its place."""

    def __init__(
        self, doc: Document, data: dict[str, Any], trusted: bool, schema: list[Problem]
    ) -> None:
        self.doc = doc
        self.data = data
        # The schema found no error: every value has the shape it describes.
        self.trusted = trusted
        self.schema_paths = [p.path for p in schema if p.severity == "error"]
        self.problems: list[Problem] = []
        self.step_refs: set[str] = set()
        # The steps.<id> each step's own expressions and templates read, by the step's id.
        self.refs_of: dict[str, set[str]] = {}
        # The steps whose expressions or templates read `state`.
        self.reads_state: set[str] = set()
        self.secrets: set[str] = set()
        self.emitted: set[str] = set()
        self.infos: dict[Path, _StepInfo] = {}
        self.order: dict[str, int] = {}
        self.lanes: dict[str, tuple[tuple[str, int], ...]] = {}
        self.step: _StepInfo | None = None  # the step being compiled, for the scope checks
        self.env_reads: list[Read] = []
        self.secret_reads: list[Read] = []
        # The inputs a template may read, when the inputs schema declares the complete list.
        self.inputs = declared_inputs(data.get("inputs"))

    # -- problems -----------------------------------------------------------------------

    def at_key(self, path: Path, message: str, severity: str = "error") -> None:
        self.problems.append(self.doc.problem(path, message, severity))

    def at_value(
        self,
        path: Path,
        message: str,
        severity: str = "error",
        *,
        expression: str | None = None,
        offset: int | None = None,
    ) -> None:
        """A problem inside a template or expression, located at its text."""
        self.problems.append(self.doc.value_problem(path, message, severity, expression, offset))

    def _settle(self, read: Callable[[], _T]) -> _T | None:
        """Plain settings, which the schema has checked. In a document it found errors in, a
        piece of the wrong shape is left out: its problem is already among the schema's."""
        if self.trusted:
            return read()
        try:
            return read()
        except _SHAPE_ERRORS:
            return None

    def _schema_found(self, path: Path) -> bool:
        """Whether the schema reported an error at `path` or inside it."""
        where = format_path(path)
        return any(
            p == where or p.startswith((where + ".", where + "[")) for p in self.schema_paths
        )

    # -- the languages --------------------------------------------------------------------

    def _source(self, source: Any) -> str | None:
        if source is None or isinstance(source, str):
            return source
        # A number where the schema wants a string is its problem; a valid one is text.
        return str(source) if self.trusted else None

    def _compile(self, path: Path, build: Callable[[], _T], source: str, jinja: bool) -> _T | None:
        try:
            return build()
        except ExpressionError as exc:
            # The hint joins the first line: a caret line, if any, stays under the expression.
            first, newline, rest = exc.message.partition("\n")
            message = first + _header_hint(source, jinja) + newline + rest
            self.at_value(path, message, expression=exc.expression, offset=exc.offset)
            return None

    def _check(
        self,
        path: Path,
        source: str,
        compiled: Template | Expression,
        names: frozenset[str],
        *,
        record: bool = False,
    ) -> None:
        """What a template or expression reads, against the scope, the flow's steps and its
        declared inputs."""
        jinja = isinstance(compiled, Template)
        kind = "template" if jinja else "expression"
        allowed = SCOPE_NAMES | {"record"} if record else SCOPE_NAMES
        dashed = _header_hint(source, jinja)
        for name in sorted(names - allowed):
            choices = sorted(allowed)
            known = _SCOPE_HINTS.get(name)
            if dashed and f"-{name}" in source:
                hint = f"; {dashed.strip()[1:-1]}"  # the words inside the parentheses
            elif known is not None and not (name == "record" and record):
                hint = f"; {known}"
            else:
                hint = did_you_mean(name, choices) or f"; the scope has {', '.join(choices)}"
            self.at_value(path, f"unknown name '{name}' in {kind}{hint}")
        step = self.step
        if names & _ITEM_NAMES and not (step is not None and step.in_item):
            self.at_value(
                path, "'item' is used outside a for_each: it is undefined here", "warning"
            )
        if step is not None and compiled.step_refs:
            self.refs_of.setdefault(step.id, set()).update(compiled.step_refs)
        if step is not None and "state" in names:
            self.reads_state.add(step.id)
        for ref in sorted(compiled.step_refs):
            if ref not in self.order:
                hint = did_you_mean(ref, list(self.order))
                self.at_value(path, f"steps.{ref}: no step has the id '{ref}'{hint}")
            elif step is not None and self.order[ref] >= step.order:
                which = "itself" if ref == step.id else "a later step"
                self.at_value(
                    path,
                    f"steps.{ref} refers to {which}: it has no value when step '{step.id}' runs",
                )
            elif step is not None and (block := self._other_lane(step, ref)) is not None:
                self.at_value(
                    path,
                    f"steps.{ref} is in another branch of the parallel block '{block}': "
                    "they run at the same time, so it has no value yet",
                )
        if "inputs" not in names or self.inputs is None:
            return
        declared = self.inputs
        for root, key in sorted(compiled.reads):
            if root != "inputs" or key in declared:
                continue
            hint = did_you_mean(key, declared) or (
                f"; it declares {', '.join(declared)}" if declared else "; it declares none"
            )
            self.at_value(path, f"inputs.{key}: the flow's inputs declare no '{key}'{hint}")

    def _other_lane(self, step: _StepInfo, ref: str) -> str | None:
        """The parallel block in which `ref` runs beside `step` (not before it), if any."""
        other = self.lanes.get(ref)
        if not other or not step.lanes:
            return None
        mine = dict(step.lanes)
        for block, index in other:
            if block in mine and mine[block] != index:
                return block
        return None

    def template(
        self,
        path: Path,
        source: Any,
        mode: Mode = "value",
        *,
        record: bool = False,
        kept: bool = True,
    ) -> Template | None:
        """A template compiled and checked at `path`; `kept=False` for one the run reads as it
        is written (checked, nothing noted)."""
        text = self._source(source)
        if text is None:
            return None
        compiled: Template | None = self._compile(
            path, lambda: compile_template(text, mode), text, True
        )
        if compiled is None:
            return None
        self._check(path, text, compiled, compiled.names, record=record)
        if kept:
            self._note_template(path, text, compiled.step_refs)
            for root, key in sorted(compiled.reads - compiled.guarded_reads):
                if root == "env":
                    self.env_reads.append(Read(key, self._where(path), format_path(path)))
        return compiled

    def _where(self, path: Path) -> str:
        line, column = self.doc.value_mark(path)
        where = f"{self.doc.file}:{line}:{column}"
        return f"{where}: {format_path(path)}" if path else where

    def value(self, path: Path, data: Any, mode: Mode = "value") -> CompiledValue | None:
        """A structure whose string leaves are templates, each checked at its own key."""
        if data is None:
            return None
        leaves: dict[str, Template] = {}
        ok = True
        for leaf_path, leaf in _leaves(path, data):
            if isinstance(leaf, str) and is_template(leaf):
                template = self.template(leaf_path, leaf, mode)
                if template is None:
                    ok = False
                else:
                    leaves[leaf] = template
        if not ok:
            return None

        def compile_leaf(source: str, leaf_mode: Mode) -> Template:
            known = leaves.get(source)
            return known if known is not None else compile_template(source, leaf_mode)

        compiled: CompiledValue = compile_value(data, mode, compile_leaf)
        return compiled

    def check_leaves(self, path: Path, data: Any) -> None:
        """Templates in keys the run reads as they are: compiled and checked, not kept."""
        for leaf_path, leaf in _leaves(path, data):
            if isinstance(leaf, str) and is_template(leaf):
                self.template(leaf_path, leaf, kept=False)

    def expression(
        self, path: Path, source: Any, *, on_record: bool = False, jinja: str | None = None
    ) -> Expression | None:
        """JMESPath; with `jinja` ("condition" or "value"), a string holding `{{` is a Jinja
        template on the scope (plus `record` on a record) instead; a condition is exactly one
        `{{ expression }}`."""
        text = self._source(source)
        if text is None:
            return None
        if jinja is not None and is_template(text):
            return self._template_expression(path, text, on_record, jinja == "condition")
        compiled: Expression | None = self._compile(
            path, lambda: compile_expression(text), text, False
        )
        if compiled is not None:
            if compiled.negated_path is not None:
                head, _, rest = compiled.negated_path.partition(".")
                self.at_value(
                    path,
                    f"'!{head}.{rest}' parses as '(!{head}).{rest}', which is always null: "
                    f"write '!({head}.{rest})'",
                    "warning",
                )
            self.step_refs.update(compiled.step_refs)
            # On a record (filter, fields), a root name is a key of the record.
            names = frozenset() if on_record else compiled.root_names
            self._check(path, text, compiled, names)
        return compiled

    def _template_expression(
        self, path: Path, text: str, on_record: bool, condition: bool
    ) -> Expression | None:
        template = self.template(path, text, record=on_record)
        if template is None:
            return None
        if condition:
            from runner.sandbox import is_lone_expression

            if not is_lone_expression(text):
                self.at_value(
                    path,
                    "a Jinja condition is exactly one {{ expression }}, without text around it",
                )
                return None
        return template_expression(
            text, template.render, names=template.names, step_refs=template.step_refs
        )

    def _note_template(self, path: Path, text: str, step_refs: frozenset[str]) -> None:
        self.step_refs.update(step_refs)
        for match in _SECRET_REF.finditer(text):
            name = next(g for g in match.groups() if g is not None)
            self.secrets.add(name)
            self.secret_reads.append(Read(name, self._where(path), format_path(path)))

    # -- the flow ---------------------------------------------------------------------------

    def flow(self) -> Flow | None:
        data = self.data
        _walk_steps(data.get("steps"), ("steps",), False, self.infos)
        for info in self.infos.values():
            if not info.id:
                continue
            if info.id in self.order:
                first = next(i for i in self.infos.values() if i.id == info.id)
                line = self.doc.locate((*first.path, "id"))[0]
                self.at_key(
                    (*info.path, "id"), f"duplicate step id '{info.id}' (first at line {line})"
                )
            else:
                self.order[info.id] = info.order
                self.lanes[info.id] = info.lanes
        self._check_parallel_streams(data)
        services = {
            name: spec
            for name, raw in _mapping(data.get("services")).items()
            if (spec := self._service(str(name), raw)) is not None
        }
        self._check_auth_use(services)
        steps, shard_warnings = self._shards(self._steps(("steps",), data.get("steps"), services))
        outputs = self._outputs(data.get("outputs"))
        for name in _mapping(data.get("outputs")):
            if name not in self.emitted:
                self.at_key(
                    ("outputs", name),
                    f"no step emits the stream '{name}'"
                    + did_you_mean(str(name), sorted(self.emitted)),
                    "warning",
                )
        if any(p.severity == "error" for p in self.problems) or not self.trusted:
            return None
        assert outputs is not None
        referenced = self.step_refs
        doc = self.doc
        return Flow(
            file=doc.file,
            name=str(data.get("name") or FilePath(doc.file).stem),
            description=str(data.get("description") or ""),
            inputs_schema=data.get("inputs") or NO_INPUTS,
            services=services,
            steps=tuple(_finished(s, referenced) for s in steps),
            outputs=outputs,
            emitted=frozenset(self.emitted),
            secrets=frozenset(self.secrets),
            document=doc,
            env_reads=tuple(self.env_reads),
            secret_reads=tuple(self.secret_reads),
            shard_warnings=tuple(shard_warnings),
        )

    def _check_parallel_streams(self, data: dict[str, Any]) -> None:
        """Two branches of one parallel block may not emit to one stream: its records would
        interleave, in no order."""
        first: dict[tuple[str, str], tuple[int, str]] = {}
        for info in self.infos.values():
            if not info.lanes:
                continue
            step: Any = data
            for part in info.path:
                step = step[part]
            emits: list[tuple[Path, Any]] = [((*info.path, "emit"), step.get("emit"))]
            for i, rule in enumerate(_list(step.get("on_status"))):
                if isinstance(rule, dict):
                    emits.append(((*info.path, "on_status", i, "emit"), rule.get("emit")))
            for where, stream in emits:
                if not isinstance(stream, str):
                    continue
                for block, index in info.lanes:
                    seen = first.setdefault((block, stream), (index, info.id))
                    if seen[0] != index:
                        self.at_key(
                            where,
                            f"stream '{stream}' is also emitted by step '{seen[1]}', in another "
                            f"branch of the parallel block '{block}': each branch writes its "
                            "own streams",
                        )

    # -- services -----------------------------------------------------------------------

    def _check_auth_use(self, services: Mapping[str, ServiceSpec]) -> None:
        for name, spec in services.items():
            owner = spec.auth_use
            if owner is None:
                continue
            where: Path = ("services", name, "auth", "use")
            target = services.get(owner)
            if owner == name:
                self.at_key(where, "a service cannot use its own auth")
            elif target is None:
                self.at_key(
                    where, f"unknown service '{owner}'" + did_you_mean(owner, list(services))
                )
            elif target.auth_use is not None:
                self.at_key(
                    where,
                    f"service '{owner}' itself uses the auth of '{target.auth_use}': "
                    f"use '{target.auth_use}'",
                )
            elif target.auth is None and not target.auth_alternatives:
                self.at_key(where, f"service '{owner}' has no auth to share")

    def _service(self, name: str, raw: Any) -> ServiceSpec | None:
        path: Path = ("services", name)
        data = _mapping(raw)
        host = _literal_insecure(data.get("base_url"))
        if host and not data.get("allow_insecure_http"):
            self.at_key((*path, "base_url"), _insecure_message(host))
        base_url = self.template((*path, "base_url"), data.get("base_url"))
        raw_auth = data.get("auth")
        auth: CompiledValue | None = None
        alternatives: tuple[AuthAlternative, ...] = ()
        auth_use: str | None = None
        if isinstance(raw_auth, list):
            alternatives = self._auth_alternatives((*path, "auth"), raw_auth)
        elif isinstance(raw_auth, dict) and "use" in raw_auth:
            auth_use = raw_auth["use"] if isinstance(raw_auth["use"], str) else None
        else:
            if isinstance(raw_auth, dict) and "when" in raw_auth:
                self.at_key(
                    (*path, "auth", "when"),
                    "'when' belongs to an entry of a list of auth alternatives",
                )
            auth = self.value((*path, "auth"), raw_auth)
        headers = self.value((*path, "headers"), data.get("headers"))
        for key, value in data.items():
            if key not in ("base_url", "auth", "headers"):
                self.check_leaves((*path, key), value)

        def read() -> ServiceSpec:
            rate = data.get("rate_limit")
            tls = data.get("tls") or {}
            return ServiceSpec(
                name=name,
                base_url=base_url,
                auth=auth,
                auth_alternatives=alternatives,
                auth_use=auth_use,
                headers=headers,
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

        return self._settle(read)

    def _auth_alternatives(self, path: Path, raw: list[Any]) -> tuple[AuthAlternative, ...]:
        """Each alternative compiled and checked, with the secrets that only it names."""
        out = []
        for i, alternative in enumerate(raw):
            if not isinstance(alternative, dict):
                continue
            where = (*path, i)
            if "when" not in alternative and i < len(raw) - 1:
                self.at_key(
                    where,
                    "an alternative without 'when' is always chosen: it must be the last",
                )
            when = self._auth_when((*where, "when"), alternative.get("when"))
            outer, self.secrets = self.secrets, set()
            try:
                config = {k: v for k, v in alternative.items() if k != "when"}
                compiled = self.value(where, config)
                secrets = frozenset(self.secrets)
            finally:
                self.secrets = outer
            if compiled is not None:
                out.append(AuthAlternative(when, compiled, secrets))
        return tuple(out)

    def _auth_when(self, path: Path, raw: Any) -> Expression | Template | None:
        """An alternative's `when`: JMESPath or one Jinja `{{ }}`, reading inputs, env and
        has_secret('NAME') only (it is evaluated once, before the run)."""
        text = self._source(raw)
        if text is None:
            return None
        compiled: Expression | Template | None
        if is_template(text):
            compiled = self._compile(path, lambda: compile_template(text, "value"), text, True)
            names = compiled.names - {"has_secret"} if compiled is not None else frozenset()
        else:
            compiled = self._compile(path, lambda: compile_expression(text), text, False)
            names = compiled.root_names if compiled is not None else frozenset()
        for name in sorted(names - _AUTH_WHEN_NAMES):
            self.at_value(
                path,
                f"an auth alternative's when reads inputs, env and has_secret('NAME'), "
                f"not '{name}': it is evaluated once, before the first request",
            )
        return compiled

    # -- steps ----------------------------------------------------------------------------

    def _steps(
        self, path: Path, raw: Any, services: Mapping[str, ServiceSpec]
    ) -> tuple[StepSpec, ...]:
        out = []
        for i, data in enumerate(_list(raw)):
            info = self.infos.get((*path, i))
            if info is None:
                continue  # not a mapping: the schema says so
            step = self._step(info, data, services)
            if step is not None:
                out.append(step)
        return tuple(out)

    def _step(
        self, info: _StepInfo, data: dict[str, Any], services: Mapping[str, ServiceSpec]
    ) -> StepSpec | None:
        outer, self.step = self.step, info
        try:
            return self._step_in_context(info, data, services)
        finally:
            self.step = outer

    def _step_in_context(
        self, info: _StepInfo, data: dict[str, Any], services: Mapping[str, ServiceSpec]
    ) -> StepSpec | None:
        path = info.path
        raw_request = data.get("request")
        request = self._request((*path, "request"), raw_request) if raw_request else None
        auth: AuthOverride = "inherit"
        raw_auth = data.get("auth")
        if raw_auth == "none":
            auth = "none"
        elif isinstance(raw_auth, dict):
            compiled_auth = self.value((*path, "auth"), raw_auth)
            if compiled_auth is not None:
                auth = compiled_auth
        emit = data.get("emit")
        if isinstance(emit, str) and emit:
            self.emitted.add(emit)
        inner = self._steps((*path, "steps"), data.get("steps"), services)
        when = self.expression((*path, "when"), data.get("when"), jinja="condition")
        for_each = self.expression((*path, "for_each"), data.get("for_each"), jinja="value")
        shard_key = self.expression((*path, "shard_key"), data.get("shard_key"), on_record=True)
        if data.get("shard") is True and for_each is not None:
            self._check_shard(info, data, for_each, shard_key)
        elif shard_key is not None:
            self.at_key(
                (*path, "shard_key"), "shard_key has no effect without shard: true", "warning"
            )
        paginate = self._paginate((*path, "paginate"), data.get("paginate"))
        poll = self._poll((*path, "poll"), data.get("poll"))
        rules = tuple(
            rule
            for i, raw in enumerate(_list(data.get("on_status")))
            if (rule := self._rule(info, (*path, "on_status", i), raw)) is not None
        )
        expect = tuple(
            spec
            for i, raw in enumerate(_list(data.get("expect")))
            if (spec := self._expect((*path, "expect", i), raw)) is not None
        )
        records = self.expression((*path, "records"), data.get("records"))
        filter_ = self.expression(
            (*path, "filter"), data.get("filter"), on_record=True, jinja="condition"
        )
        fields = self._fields((*path, "fields"), data.get("fields"), on_record=True)
        add_fields = self._add_fields((*path, "add_fields"), data.get("add_fields"))
        drop_fields = self._drop_fields((*path, "drop_fields"), data.get("drop_fields"))
        rename_keys = self._rename_keys((*path, "rename_keys"), data.get("rename_keys"))
        sets = self._sets((*path, "set"), data.get("set"))
        response = self._response((*path, "response"), data.get("response"))

        parallel = data.get("parallel") is True and for_each is None

        def read() -> StepSpec:
            service = services.get(request.service) if request and request.service else None
            base_retry = service.retry if service is not None else RetryPolicy()
            base_timeout = service.timeout if service is not None else Timeouts()
            return StepSpec(
                id=data["id"],
                path=path,
                request=request,
                when=when,
                for_each=for_each,
                parallel=parallel,
                concurrency=int(data.get("concurrency", max(1, len(inner)) if parallel else 1)),
                max_items=data.get("max_items"),
                shard=data.get("shard") is True and for_each is not None,
                shard_key=shard_key,
                max_visits=int(data.get("max_visits", DEFAULT_MAX_VISITS)),
                max_records=data.get("max_records", DEFAULT_MAX_RECORDS),
                steps=inner,
                auth=auth,
                retry=merge_retry(base_retry, data.get("retry")),
                timeout=merge_timeouts(base_timeout, data.get("timeout")),
                retry_unsafe=bool(data.get("retry_unsafe", False)),
                paginate=paginate,
                poll=poll,
                response=response,
                on_status=rules,
                expect=expect,
                records=records,
                filter=filter_,
                fields=fields,
                add_fields=add_fields,
                drop_fields=drop_fields,
                rename_keys=rename_keys,
                emit=emit,
                set=sets,
            )

        return self._settle(read)

    def _check_shard(
        self,
        info: _StepInfo,
        data: dict[str, Any],
        for_each: Expression,
        shard_key: Expression | None,
    ) -> None:
        """Every shard must compute the same item list, and split it once."""
        path = info.path
        if info.outer_for_each is not None:
            self.at_key(
                (*path, "shard"),
                f"shard: true inside the for_each of step '{info.outer_for_each}': only a "
                "for_each that is not inside another can be sharded (shard the outer one)",
            )
        if "state" in for_each.root_names:
            self.at_value(
                (*path, "for_each"),
                "a sharded for_each cannot read state: each shard keeps its own state, so "
                "the shards would split different item lists",
            )
        elif (source := self._state_source(for_each.step_refs)) is not None:
            self.at_value(
                (*path, "for_each"),
                f"a sharded for_each cannot read state, nor a step that does: its items come "
                f"from step '{source}', which reads state, and each shard keeps its own state "
                "(shard 0 alone moves the cursors of the steps outside the sharded one), so "
                "the shards would split different item lists; fetch the list without state",
            )
        reads_time = _CALLS_NOW.search(for_each.source) or "run" in for_each.root_names
        if reads_time and shard_key is None:
            self.at_key(
                (*path, "shard"),
                "the for_each reads the time (now() or run), which each shard reads for itself, "
                "so their items differ: give shard_key the part of an item that is the same "
                "in every shard (for windows(): shard_key: start)",
            )

    def _state_source(self, refs: Collection[str]) -> str | None:
        """The first step among `refs`, and the steps they read, that reads state."""
        seen: set[str] = set()
        todo = sorted(refs)
        while todo:
            ref = todo.pop(0)
            if ref in seen:
                continue
            seen.add(ref)
            if ref in self.reads_state:
                return ref
            todo += sorted(self.refs_of.get(ref, ()))
        return None

    def _shards(self, steps: tuple[StepSpec, ...]) -> tuple[tuple[StepSpec, ...], list[str]]:
        """Marks the steps whose records differ from shard to shard (`in_shard`), and warns
        of what `--shard` repeats in every shard. Nothing to do without a `shard: true` step."""
        sharded = {
            inner.id for s in steps for step in s.walk() if step.shard for inner in step.walk()
        }
        if not sharded:
            return steps, []
        warnings: list[str] = []
        varying = set(sharded)
        by_id = {info.id: info for info in self.infos.values()}

        def mark(step: StepSpec, inherited: bool) -> StepSpec:
            reads = self.refs_of.get(step.id, set()) & varying
            in_shard = inherited or step.id in sharded or bool(reads)
            info = by_id.get(step.id)
            if in_shard:
                varying.add(step.id)
            if reads and not inherited and step.id not in sharded and info is not None:
                message = (
                    f"step '{step.id}' reads steps.{sorted(reads)[0]}, which differs from "
                    "shard to shard: under --shard it sees this shard's part, and every shard "
                    "writes its records"
                )
                self.at_key(info.path, message, "warning")
                warnings.append(message)
            if not in_shard and step.request is not None:
                method = step.request.method
                if method not in ("GET", "HEAD") and info is not None:
                    message = (
                        f"step '{step.id}' sends {method} outside every shard: true step: "
                        "under --shard each shard sends it (N times)"
                    )
                    self.at_key((*info.path, "request"), message, "warning")
                    warnings.append(message)
            inner = tuple(mark(s, in_shard) for s in step.steps)
            return dataclasses.replace(step, steps=inner, in_shard=in_shard)

        return tuple(mark(s, False) for s in steps), warnings

    def _request(self, path: Path, raw: Any) -> RequestSpec | None:
        data = _mapping(raw)
        services = _mapping(self.data.get("services"))
        service_name = data.get("service")
        if isinstance(service_name, str) and service_name not in services:
            self.at_key(
                (*path, "service"),
                f"unknown service '{service_name}'" + did_you_mean(service_name, list(services)),
            )
        service = _mapping(services.get(service_name)) if isinstance(service_name, str) else {}
        host = _literal_insecure(data.get("url"))
        if host and not service.get("allow_insecure_http"):
            self.at_key((*path, "url"), _insecure_message(host))
        body_kind = next((k for k in BODY_KEYS if k in data), None)
        body: CompiledValue | None = None
        body_file: str | None = None
        body_template: Template | None = None
        if body_kind == "body_file":
            self.check_leaves((*path, "body_file"), data["body_file"])
            if isinstance(data["body_file"], str) or self.trusted:
                body_file = str(data["body_file"])
                body_template = self._body_file((*path, "body_file"), body_file)
        elif body_kind == "body":
            body = self.value((*path, "body"), data["body"], "text")
        elif body_kind is not None:
            body = self.value((*path, body_kind), data[body_kind])
            if body_kind == "multipart":
                self._check_upload_sources((*path, "multipart"), data["multipart"])
        for key in ("method", "service"):
            self.check_leaves((*path, key), data.get(key))
        url_path = self.template((*path, "path"), data.get("path"), "path")
        url = self.template((*path, "url"), data.get("url"))
        query = self.value((*path, "query"), data.get("query"))
        headers = self.value((*path, "headers"), data.get("headers"))
        content_type = self.template((*path, "content_type"), data.get("content_type"), "text")
        return self._settle(
            lambda: RequestSpec(
                method=str(data.get("method", "GET")).upper(),
                service=data.get("service"),
                path=url_path,
                url=url,
                query=query,
                headers=headers,
                body_kind=body_kind,
                body=body,
                content_type=content_type,
                body_file=body_file,
                body_template=body_template,
            )
        )

    def _check_upload_sources(self, path: Path, parts: Any) -> None:
        """A multipart `file:` is literal or comes from `inputs`: a path read from a response
        would let a server choose which local file is uploaded."""
        for name, part in _mapping(parts).items():
            source = part.get("file") if isinstance(part, dict) else None
            if not isinstance(source, str) or not is_template(source):
                continue
            try:
                names = compile_template(source).names
            except ExpressionError:
                continue  # reported where the body is compiled
            if not names <= {"inputs"}:
                self.at_value(
                    (*path, name, "file"),
                    "a multipart file is a path written in the flow or taken from inputs, "
                    f"not from {', '.join(sorted(names - {'inputs'}))}",
                )

    def _body_file(self, path: Path, name: str) -> Template | None:
        file = FilePath(self.doc.file).parent / name
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            self.at_key(path, f"cannot read body_file {name!r}: {exc}")
            return None
        autoescape = file.suffix.lower() in (".xml", ".html", ".htm")
        try:
            template = compile_template(text, "text", autoescape)
        except ExpressionError as exc:
            self.at_key(path, f"in {name}: {exc.message}")
            return None
        self._note_template(path, text, template.step_refs)
        return template

    def _paginate(self, path: Path, raw: Any) -> PaginateSpec | None:
        if not isinstance(raw, dict):
            return None
        data = raw
        found = {
            key: self.expression(
                (*path, key), data.get(key), jinja="condition" if key == "stop_when" else None
            )
            for key in ("total_pages", "total", "cursor", "next_url", "stop_when")
        }

        def read() -> PaginateSpec:
            kind = data["type"]
            default_param = {"page_number": "page", "offset": "offset", "cursor": "cursor"}
            return PaginateSpec(
                type=kind,
                param=str(data.get("param", default_param.get(kind, ""))),
                location=data.get("in", "query"),
                start=int(data.get("start", 1)),
                size_param=data.get("size_param"),
                size=data.get("size"),
                limit_param=data.get("limit_param", "limit" if kind == "offset" else None),
                limit=data.get("limit"),
                max_pages=data.get("max_pages", DEFAULT_MAX_PAGES),
                max_pages_is_default="max_pages" not in data,
                **found,
            )

        return self._settle(read)

    def _poll(self, path: Path, raw: Any) -> PollSpec | None:
        if not isinstance(raw, dict):
            return None
        data = raw
        until = self.expression((*path, "until"), data.get("until"), jinja="condition")
        fail_when = self.expression((*path, "fail_when"), data.get("fail_when"), jinja="condition")
        message = self.template((*path, "message"), data.get("message"), "text")
        if until is None:
            return None
        return self._settle(
            lambda: PollSpec(
                until=until,
                fail_when=fail_when,
                interval=float(data.get("interval", 5)),
                timeout=float(data.get("timeout", 600)),
                message=message,
            )
        )

    def _rule(self, step: _StepInfo, path: Path, raw: Any) -> RuleSpec | None:
        if not isinstance(raw, dict):
            return None
        data = raw
        target = data.get("goto")
        if data.get("action") == "goto" and target is not None:
            if step.plain_for_each:
                self.at_key(
                    (*path, "goto"),
                    "goto is not allowed in a for_each step; use a block (for_each + steps)",
                )
            elif step.parallel_child and target != step.id:
                self.at_key(
                    (*path, "goto"),
                    "goto between the steps of a parallel block is not allowed: they run at "
                    "the same time",
                )
            elif target not in step.siblings:
                known = [s for s in step.siblings if s]
                scope = "this block" if len(step.path) > 2 else "the flow's steps"
                self.at_key(
                    (*path, "goto"),
                    f"goto target '{target}' is not a step of {scope}"
                    + did_you_mean(str(target), known),
                )
        emit = data.get("emit")
        if isinstance(emit, str) and emit:
            self.emitted.add(emit)
        raw_delay = data.get("delay")
        delay: Expression | float | None = None
        if isinstance(raw_delay, int | float) and not isinstance(raw_delay, bool):
            delay = float(raw_delay)
        elif raw_delay is not None:
            delay = self.expression((*path, "delay"), raw_delay)
        when = self.expression((*path, "when"), data.get("when"), jinja="condition")
        message = self.template((*path, "message"), data.get("message"), "text")
        sets = self._sets((*path, "set"), data.get("set"))
        fields = self._fields((*path, "fields"), data.get("fields"), on_record=False)
        return self._settle(
            lambda: RuleSpec(
                statuses=parse_statuses(data.get("status")),
                action=data.get("action", "ok"),
                when=when,
                goto=target,
                message=message,
                kind=data.get("kind"),
                delay=delay,
                set=sets,
                emit=emit,
                fields=fields,
                path=path,
            )
        )

    def _expect(self, path: Path, raw: Any) -> ExpectSpec | None:
        if not isinstance(raw, dict):
            return None
        that = self.expression((*path, "that"), raw.get("that"), jinja="condition")
        message = self.template((*path, "message"), raw.get("message"), "text")
        return ExpectSpec(that=that, message=message) if that is not None else None

    def _fields(self, path: Path, raw: Any, *, on_record: bool) -> tuple[FieldSpec, ...] | None:
        """`fields`: JMESPath, or a template (which reads `record` on a step's records)."""
        if raw is None:
            return None
        out = []
        for name, source in _mapping(raw).items():
            fpath = (*path, name)
            text = self._source(source)
            if text is None:
                continue
            if is_template(text):
                out.append(FieldSpec(name, template=self.template(fpath, text, record=on_record)))
            else:
                expression = self.expression(fpath, text, on_record=on_record)
                out.append(FieldSpec(name, expression=expression))
        return tuple(out)

    def _add_fields(self, path: Path, raw: Any) -> tuple[FieldSpec, ...] | None:
        """`add_fields`: JMESPath on the record, or Jinja with `record` and the scope."""
        if raw is None:
            return None
        out = []
        for name, source in _mapping(raw).items():
            expression = self.expression((*path, name), source, on_record=True, jinja="value")
            if expression is not None:
                out.append(FieldSpec(str(name), expression=expression))
        return tuple(out)

    def _drop_fields(self, path: Path, raw: Any) -> tuple[str, ...] | None:
        if raw is None:
            return None
        return tuple(str(p) for p in _list(raw) if isinstance(p, str))

    def _rename_keys(self, path: Path, raw: Any) -> str | dict[str, str] | None:
        if raw is None:
            return None
        if isinstance(raw, str):
            if raw not in RENAME_MODES and not self._schema_found(path):
                self.at_key(
                    path,
                    f"unknown rename_keys mode {raw!r}: lower, snake, or a mapping {{old: new}}"
                    + did_you_mean(raw, list(RENAME_MODES)),
                )
            return raw if raw in RENAME_MODES else None
        if isinstance(raw, dict):
            targets: dict[str, str] = {}
            for old, new in raw.items():
                if isinstance(new, str) and new in targets:
                    self.at_key(
                        (*path, old),
                        f"'{targets[new]}' and '{old}' are both renamed to '{new}'",
                    )
                elif isinstance(new, str):
                    targets[new] = str(old)
            return {str(k): v for k, v in raw.items() if isinstance(v, str)}
        return None

    def _sets(self, path: Path, raw: Any) -> tuple[SetSpec, ...]:
        out = []
        for name, spec in _mapping(raw).items():
            if isinstance(spec, dict):
                expression = self.expression((*path, name, "value"), spec.get("value"))
                secret = bool(spec.get("secret", False))
            else:
                expression = self.expression((*path, name), spec)
                secret = False
            if expression is not None:
                out.append(SetSpec(name, expression, secret))
        return tuple(out)

    def _response(self, path: Path, raw: Any) -> DecodeOptions:
        try:
            return decode_options(raw)
        except ValueError as exc:
            # What the schema cannot say (an encoding Python does not know), said here once.
            if not self._schema_found(path):
                self.at_key(path, str(exc))
        except _SHAPE_ERRORS:
            if self.trusted:
                raise
        return DecodeOptions()

    # -- outputs ----------------------------------------------------------------------------

    def _outputs(self, raw: Any) -> dict[str, StreamSpec] | None:
        for name, spec in _mapping(raw).items():
            self._cursor(("outputs", name), _mapping(spec))

        def read() -> dict[str, StreamSpec]:
            out = {}
            for name, spec in (raw or {}).items():
                spec = spec or {}
                cursor = spec.get("cursor")
                settings = cursor if isinstance(cursor, dict) else {}
                lookback = settings.get("lookback")
                out[name] = StreamSpec(
                    name=name,
                    primary_key=tuple(spec.get("primary_key") or ()),
                    cursor_field=cursor.get("field") if isinstance(cursor, dict) else cursor,
                    cursor_type=cursor.get("type") if isinstance(cursor, dict) else None,
                    schema=spec.get("schema"),
                    on_invalid=spec.get("on_invalid", "fail"),
                    write=spec.get("write"),
                    cursor_start=settings.get("start"),
                    cursor_lookback=lookback,
                    skip_seen=bool(settings.get("skip_seen", False)),
                )
            return out

        return self._settle(read)

    def _cursor(self, path: Path, spec: dict[str, Any]) -> None:
        """The checks of `cursor.start`, `lookback` and `skip_seen` the schema cannot make."""
        cursor = spec.get("cursor")
        if not isinstance(cursor, dict):
            return
        cpath = (*path, "cursor")
        lookback = cursor.get("lookback")
        if isinstance(lookback, str):
            try:
                parse_duration(lookback)
            except ValueError as exc:
                self.at_key((*cpath, "lookback"), str(exc))
        if cursor.get("skip_seen") is True:
            if not spec.get("primary_key"):
                self.at_key(
                    (*cpath, "skip_seen"),
                    "skip_seen needs the stream's primary_key: the keys already emitted at the "
                    "stored cursor are how it knows a record again",
                )
            if lookback is not None:
                self.at_key(
                    (*cpath, "lookback"),
                    "lookback and skip_seen do not go together: skip_seen would drop what "
                    "lookback fetches again",
                )
        start = cursor.get("start")
        kind = cursor.get("type")
        if isinstance(start, str) and kind == "datetime":
            try:
                parse_datetime(start)
            except ValueError:
                self.at_key((*cpath, "start"), f"start {start!r} is not an ISO 8601 datetime")
        elif start is not None and kind in ("number", "string"):
            wanted = str if kind == "string" else (int, float)
            if not isinstance(start, wanted) or isinstance(start, bool):
                self.at_key((*cpath, "start"), f"start {start!r} is not a {kind}")


def _finished(step: StepSpec, referenced: set[str]) -> StepSpec:
    """The step with what only the whole flow tells: whether a later expression reads it, and
    its fields as one compiled function when every field is JMESPath on the record."""
    inner = tuple(_finished(s, referenced) for s in step.steps)
    shape = None
    if step.fields is not None and all(f.expression is not None for f in step.fields):
        shape = compile_shape(tuple((f.name, f.expression) for f in step.fields if f.expression))
    add = None
    if step.add_fields:
        add = tuple(
            (f.name, f.expression.search, f.expression.is_template)
            for f in step.add_fields
            if f.expression is not None
        )
    reshape = compile_reshape(add, step.drop_fields, step.rename_keys)
    return dataclasses.replace(
        step, steps=inner, referenced=step.id in referenced, shape=shape, reshape=reshape
    )
