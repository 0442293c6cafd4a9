"""Checks flows offline: the JSON Schema of the flow format, then semantic checks, as located
problems; also finds flow files in folders and formats problems for people and CI.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import json
import os
import pkgutil
import re
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Final

from runner.errors import FlowError, Problem, RunnerError, UsageError
from runner.loader import Document, Path, load_document

if TYPE_CHECKING:
    from jsonschema import Draft202012Validator, ValidationError

__all__ = [
    "apply_services_override",
    "find_flow_files",
    "flow_schema",
    "format_problems",
    "load_services_override",
    "merge_services",
    "schema_problems",
    "semantic_problems",
    "services_problems",
    "validate_document",
    "validate_paths",
]

SCHEMA_RESOURCE: Final = "flow.schema.json"
FORMATS: Final = ("text", "json", "github")

NOT_A_FLOW: Final = (
    "a flow is a mapping with version, steps and optionally services, inputs, outputs"
)
NOT_A_SERVICES_FILE: Final = (
    "a services file is a mapping of service names to service keys (base_url, auth, ...)"
)

# A top-level `steps` key starts a line in block style; nested ones are indented.
_STEPS_KEY: Final = re.compile(rb"""^(?:steps|'steps'|"steps")[ \t]*:""", re.MULTILINE)
_FLOW_SUFFIXES: Final = (".yaml", ".yml")

_TYPE_NAMES: Final = {
    "integer": "an integer",
    "number": "a number",
    "string": "a string",
    "boolean": "a boolean (true or false)",
    "object": "a mapping",
    "array": "a list",
    "null": "null",
}
# Keywords about one value, whose custom message is followed by the value that was found.
_VALUE_KEYWORDS: Final = frozenset(
    {"type", "const", "enum", "pattern", "minimum", "maximum", "exclusiveMinimum",
     "exclusiveMaximum", "minLength", "maxLength"}
)  # fmt: skip


# --------------------------------------------------------------------------- the schema


@functools.cache
def flow_schema() -> dict[str, Any]:
    """The flow format's JSON Schema, shipped as package data. Shared: do not mutate it."""
    try:
        # pkgutil reads it through the package's loader, as importlib.resources would, without
        # the ~2 ms of importing importlib.resources on every start.
        data = pkgutil.get_data("runner.schemas", SCHEMA_RESOURCE)
        if data is None:
            raise OSError(f"no {SCHEMA_RESOURCE} in runner.schemas")
        schema: dict[str, Any] = json.loads(data)
    except (OSError, ImportError, ValueError) as exc:
        raise RunnerError(f"the flow schema cannot be read from the installation: {exc}") from exc
    return schema


def _services_schema() -> dict[str, Any]:
    # The override file is the flow's `services` mapping on its own, with the same definitions.
    schema = flow_schema()
    return {
        "$schema": schema["$schema"],
        **schema["properties"]["services"],
        "$defs": schema["$defs"],
    }


@functools.cache
def _flow_validator() -> Draft202012Validator:
    from jsonschema import Draft202012Validator

    return Draft202012Validator(flow_schema())


@functools.cache
def _services_validator() -> Draft202012Validator:
    from jsonschema import Draft202012Validator

    return Draft202012Validator(_services_schema())


# jsonschema-rs (the `fast` extra) answers "valid?" in microseconds and imports in a few
# milliseconds; jsonschema (~30 ms to import) is then needed only to word the problems of a
# flow that has some. Both implement draft 2020-12; tests hold them to the same verdicts.
@functools.cache
def _fast_check(which: str) -> Callable[[Any], bool] | None:
    try:
        import jsonschema_rs
    except ImportError:
        return None
    schema = flow_schema() if which == "flow" else _services_schema()
    check: Callable[[Any], bool] = jsonschema_rs.validator_for(schema).is_valid
    return check


def _surely_valid(which: str, data: Any) -> bool:
    """True when jsonschema-rs is there and finds `data` valid; jsonschema decides the rest."""
    check = _fast_check(which)
    try:
        return check is not None and check(data)
    except Exception:  # a value it cannot convert, say: jsonschema words the verdict
        return False


# --------------------------------------------------------------------------- messages


def _show(value: Any) -> str:
    """A value as a flow author wrote it in YAML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return f"'{value}'" if len(value) <= 60 else f"'{value[:57]}...'"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return str(value)


def _got(value: Any) -> str:
    """A value with its type, for type errors: `string '5'`, `integer 5`, `a list`."""
    if isinstance(value, bool):
        return f"boolean {_show(value)}"
    if isinstance(value, str):
        return f"string {_show(value)}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"number {value}"
    return _show(value)


def _type_message(expected: str | list[str], value: Any) -> str:
    names = [expected] if isinstance(expected, str) else list(expected)
    wanted = " or ".join(_TYPE_NAMES.get(name, name) for name in names)
    return f"expected {wanted}, got {_got(value)}"


def _closest(word: str, choices: Sequence[str]) -> list[str]:
    """The one closest choice, if any is close enough: for "did you mean"."""
    import difflib  # only a flow with a mistake needs it

    return difflib.get_close_matches(word, list(choices), n=1)


def _unknown_key_message(key: str, allowed: Sequence[str]) -> str:
    close = _closest(key, allowed)
    if close:
        return f"unknown key '{key}' (did you mean '{close[0]}'?)"
    return f"unknown key '{key}'; expected one of: {', '.join(allowed)}"


def _value_message(error: ValidationError) -> str:
    """The default message of a keyword that failed on one value."""
    keyword, value = error.validator, error.instance
    expected: Any = error.validator_value
    if keyword == "type":
        return _type_message(expected, value)
    if keyword == "enum":
        return f"{_show(value)} is not one of {', '.join(str(_show_bare(v)) for v in expected)}"
    if keyword == "const":
        return f"expected {_show(expected)}, got {_show(value)}"
    if keyword == "pattern":
        return f"{_show(value)} does not match {expected}"
    if keyword == "minimum":
        return f"expected at least {expected}, got {_show(value)}"
    if keyword == "maximum":
        return f"expected at most {expected}, got {_show(value)}"
    if keyword == "exclusiveMinimum":
        return f"expected more than {expected}, got {_show(value)}"
    if keyword == "exclusiveMaximum":
        return f"expected less than {expected}, got {_show(value)}"
    if keyword == "minLength":
        if expected == 1:
            return "expected a non-empty string"
        return f"expected at least {expected} characters, got {_show(value)}"
    if keyword == "maxLength":
        unit = "character" if expected == 1 else "characters"
        return f"expected at most {expected} {unit}, got {_show(value)}"
    return str(error.message)


def _show_bare(value: Any) -> str:
    return value if isinstance(value, str) else _show(value)


class _Finding:
    """One message at one path; `missing` names the keys whose absence it reports."""

    __slots__ = ("message", "missing", "path", "suggestion")

    def __init__(
        self,
        path: Path,
        message: str,
        missing: frozenset[str] = frozenset(),
        suggestion: str | None = None,
    ) -> None:
        self.path = path
        self.message = message
        self.missing = missing
        self.suggestion = suggestion


def _required_keys(schemas: Any) -> frozenset[str]:
    keys: set[str] = set()
    for branch in schemas if isinstance(schemas, list) else ():
        if isinstance(branch, dict):
            keys.update(branch.get("required", ()))
    return frozenset(keys)


def _findings(error: ValidationError) -> Iterator[_Finding]:
    """Readable findings for one jsonschema error (several for additionalProperties)."""
    path: Path = tuple(error.absolute_path)
    schema = error.schema if isinstance(error.schema, dict) else {}
    custom: str | None = schema.get("errorMessage")
    keyword = error.validator
    value: Any = error.instance
    expected: Any = error.validator_value  # typed with jsonschema's Unset sentinel

    if "propertyNames" in error.absolute_schema_path and isinstance(value, str):
        # The failing instance is a key of the mapping at `path`: report it at the key.
        message = custom if custom else _value_message(error)
        yield _Finding((*path, value), f"{message} (got {_show(value)})" if custom else message)
        return
    if keyword == "additionalProperties" and expected is False:
        allowed = list(schema.get("properties", {}))
        patterns = [re.compile(p) for p in schema.get("patternProperties", {})]
        for key in value:
            if key in allowed or any(p.search(key) for p in patterns):
                continue
            close = _closest(key, allowed)
            yield _Finding(
                (*path, key),
                _unknown_key_message(key, allowed),
                suggestion=close[0] if close else None,
            )
        return
    if keyword == "required":
        for key in expected:
            if isinstance(value, dict) and key not in value:
                message = custom or f"missing required key '{key}'"
                yield _Finding(path, message, missing=frozenset({key}))
        return
    if keyword == "dependentRequired":
        needed_by: dict[str, list[str]] = {}
        for key, needs in expected.items():
            if isinstance(value, dict) and key in value:
                for need in needs:
                    if need not in value:
                        needed_by.setdefault(need, []).append(f"'{key}'")
        for need, keys in needed_by.items():
            message = custom or f"missing required key '{need}' (needed by {', '.join(keys)})"
            yield _Finding(path, message, missing=frozenset({need}))
        return
    if keyword in ("anyOf", "oneOf") and not custom and error.context:
        from jsonschema.exceptions import best_match

        best = best_match(error.context)
        if best is not None:
            yield from _findings(best)
            return
    if custom:
        if keyword in _VALUE_KEYWORDS:
            shown = _got(value) if keyword == "type" else _show(value)
            yield _Finding(path, f"{custom} (got {shown})")
        else:
            missing = _required_keys(expected) if keyword == "anyOf" else frozenset()
            yield _Finding(path, custom, missing=missing)
        return
    if keyword in _VALUE_KEYWORDS:
        yield _Finding(path, _value_message(error))
    elif keyword == "minItems":
        if expected == 1:
            yield _Finding(path, "expected a non-empty list")
        else:
            count = len(value) if isinstance(value, list) else 0
            yield _Finding(path, f"expected at least {expected} items, got {count}")
    elif keyword == "uniqueItems":
        yield _Finding(path, "the list has duplicate items")
    elif keyword in ("not", None):
        yield _Finding(path, "this key is not allowed here")
    else:
        yield _Finding(path, str(error.message))


def _problems(doc: Document, validator: Draft202012Validator, data: Any) -> list[Problem]:
    findings = [f for error in validator.iter_errors(data) for f in _findings(error)]
    # A misspelt key also makes its correct spelling missing: report the spelling only.
    suggested: dict[Path, set[str]] = {}
    for finding in findings:
        if finding.suggestion is not None:
            suggested.setdefault(finding.path[:-1], set()).add(finding.suggestion)
    problems: dict[Problem, None] = {}
    for finding in findings:
        if finding.missing and finding.missing & suggested.get(finding.path, set()):
            continue
        problems[doc.problem(finding.path, finding.message)] = None
    return sorted(problems)


# --------------------------------------------------------------------------- documents


def schema_problems(doc: Document) -> list[Problem]:
    """Every way the document breaks the flow schema, located in its file."""
    if not isinstance(doc.data, dict):
        return [Problem(doc.file, 1, 1, "", NOT_A_FLOW)]
    if _surely_valid("flow", doc.data):
        return []
    return _problems(doc, _flow_validator(), doc.data)


# ============================================================================ SEMANTIC CHECKS

# Names a template or a root-level JMESPath expression may read (DESIGN, "The scope").
_SCOPE_NAMES: Final = (
    "inputs",
    "env",
    "secrets",
    "state",
    "steps",
    "auth",
    "run",
    "item",
    "item_index",
    "page",
    "status",
    "reason",
    "headers",
    "body",
    "url",
)
_ITEM_NAMES: Final = frozenset({"item", "item_index"})


@dataclasses.dataclass(frozen=True, slots=True)
class _Expr:
    """One expression of a flow, where it stands and how it is evaluated."""

    path: Path
    source: str
    language: str  # "jinja" | "jmespath"
    on_record: bool = False  # evaluated against each record (filter, fields): no root names
    with_record: bool = False  # a fields template: `record` is in the scope too


def _jinja_leaves(path: Path, value: Any) -> Iterator[_Expr]:
    if isinstance(value, str):
        if "{{" in value or "{%" in value or "{#" in value:
            yield _Expr(path, value, "jinja")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _jinja_leaves((*path, key), item)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _jinja_leaves((*path, i), item)


def _jmes(path: Path, value: Any, on_record: bool = False) -> Iterator[_Expr]:
    if isinstance(value, str):
        yield _Expr(path, value, "jmespath", on_record=on_record)


def _fields(path: Path, value: Any, on_record: bool) -> Iterator[_Expr]:
    for name, source in (value or {}).items():
        if not isinstance(source, str):
            continue
        if "{{" in source or "{%" in source:
            yield _Expr((*path, name), source, "jinja", with_record=on_record)
        else:
            yield _Expr((*path, name), source, "jmespath", on_record=on_record)


def _sets(path: Path, value: Any) -> Iterator[_Expr]:
    for name, spec in (value or {}).items():
        if isinstance(spec, dict):
            yield from _jmes((*path, name, "value"), spec.get("value"))
        else:
            yield from _jmes((*path, name), spec)


def _step_expressions(path: Path, step: dict[str, Any]) -> Iterator[_Expr]:
    """Every expression of one step (not of its block's steps), with its language."""
    yield from _jmes((*path, "when"), step.get("when"))
    yield from _jmes((*path, "for_each"), step.get("for_each"))
    if isinstance(step.get("request"), dict):
        yield from _jinja_leaves((*path, "request"), step["request"])
    if isinstance(step.get("auth"), dict):
        yield from _jinja_leaves((*path, "auth"), step["auth"])
    for key in ("cursor", "next_url", "total_pages", "total", "stop_when"):
        yield from _jmes((*path, "paginate", key), (step.get("paginate") or {}).get(key))
    poll = step.get("poll") or {}
    yield from _jmes((*path, "poll", "until"), poll.get("until"))
    yield from _jmes((*path, "poll", "fail_when"), poll.get("fail_when"))
    yield from _jinja_leaves((*path, "poll", "message"), poll.get("message"))
    for i, rule in enumerate(step.get("on_status") or []):
        rpath = (*path, "on_status", i)
        yield from _jmes((*rpath, "when"), rule.get("when"))
        yield from _jmes((*rpath, "delay"), rule.get("delay"))
        yield from _jinja_leaves((*rpath, "message"), rule.get("message"))
        yield from _sets((*rpath, "set"), rule.get("set"))
        yield from _fields((*rpath, "fields"), rule.get("fields"), on_record=False)
    for i, expect in enumerate(step.get("expect") or []):
        yield from _jmes((*path, "expect", i, "that"), expect.get("that"))
        yield from _jinja_leaves((*path, "expect", i, "message"), expect.get("message"))
    yield from _jmes((*path, "records"), step.get("records"))
    yield from _jmes((*path, "filter"), step.get("filter"), on_record=True)
    yield from _fields((*path, "fields"), step.get("fields"), on_record=True)
    yield from _sets((*path, "set"), step.get("set"))


@dataclasses.dataclass(slots=True)
class _StepInfo:
    """Where a step sits in the flow, for the checks across steps."""

    id: str
    path: Path
    order: int  # position in the flattened order of the flow
    siblings: tuple[str, ...]  # ids of the sequence it is in (goto targets)
    in_item: bool  # inside a for_each (the step itself or an enclosing block)
    plain_for_each: bool  # a for_each step without a block


def _walk_steps(
    steps: list[Any], path: Path, in_item: bool, out: list[tuple[_StepInfo, dict[str, Any]]]
) -> None:
    siblings = tuple(s.get("id", "") for s in steps if isinstance(s, dict))
    for i, step in enumerate(steps):
        spath = (*path, i)
        is_for_each = "for_each" in step
        info = _StepInfo(
            id=step.get("id", ""),
            path=spath,
            order=len(out),
            siblings=siblings,
            in_item=in_item or is_for_each,
            plain_for_each=is_for_each and "steps" not in step,
        )
        out.append((info, step))
        if isinstance(step.get("steps"), list):
            _walk_steps(step["steps"], (*spath, "steps"), True, out)


def _did_you_mean(name: str, choices: Sequence[str]) -> str:
    close = _closest(name, choices)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _literal_insecure(url: Any) -> str | None:
    """The host of a literal http:// URL to a host that is not loopback, else None."""
    from urllib.parse import urlsplit

    from runner.messages import is_loopback

    if not isinstance(url, str) or "{{" in url or "{%" in url:
        return None
    parts = urlsplit(url.strip())
    if parts.scheme.lower() != "http" or not parts.hostname:
        return None
    return None if is_loopback(parts.hostname) else parts.hostname


def _compile_problem(doc: Document, expr: _Expr) -> tuple[Problem | None, Any]:
    from runner.errors import ExpressionError
    from runner.expressions import compile_expression
    from runner.templates import compile_template

    try:
        if expr.language == "jinja":
            return None, compile_template(expr.source)
        return None, compile_expression(expr.source)
    except ExpressionError as exc:
        line, column = doc.value_mark(expr.path)
        return Problem(doc.file, line, column, _fmt(expr.path), exc.message), None


def _fmt(path: Path) -> str:
    from runner.errors import format_path

    return format_path(path)


def semantic_problems(doc: Document) -> list[Problem]:
    """Checks beyond the schema: every template and JMESPath expression compiles and reads
    only names of the scope; services, goto targets and `steps.<id>` references resolve;
    step ids are unique; literal http:// URLs; outputs no step emits.

    Called only for a document that the schema found no error in, so `doc.data` has the
    shape the schema describes.
    """
    data: dict[str, Any] = doc.data
    problems: list[Problem] = []
    services: dict[str, Any] = data.get("services") or {}
    steps: list[tuple[_StepInfo, dict[str, Any]]] = []
    _walk_steps(data.get("steps") or [], ("steps",), False, steps)
    order: dict[str, int] = {}
    for info, _ in steps:
        if info.id in order:
            first = steps[order[info.id]][0]
            line = doc.locate((*first.path, "id"))[0]
            problems.append(
                doc.problem(
                    (*info.path, "id"), f"duplicate step id '{info.id}' (first at line {line})"
                )
            )
        else:
            order[info.id] = info.order
    emitted: set[str] = set()

    for name, service in services.items():
        spath: Path = ("services", name)
        host = _literal_insecure((service or {}).get("base_url"))
        if host and not (service or {}).get("allow_insecure_http"):
            problems.append(
                doc.problem(
                    (*spath, "base_url"),
                    f"plain http:// to {host} is refused: use https, or set "
                    "allow_insecure_http: true on the service",
                )
            )
        for expr in _jinja_leaves(spath, {k: v for k, v in (service or {}).items()}):
            problems.extend(_check_expr(doc, expr, None, order, steps_in_item=False))

    for info, step in steps:
        if step.get("emit"):
            emitted.add(step["emit"])
        for rule in step.get("on_status") or []:
            if rule.get("emit"):
                emitted.add(rule["emit"])
        request = step.get("request")
        if isinstance(request, dict):
            service_name = request.get("service")
            if service_name is not None and service_name not in services:
                problems.append(
                    doc.problem(
                        (*info.path, "request", "service"),
                        f"unknown service '{service_name}'"
                        + _did_you_mean(service_name, list(services)),
                    )
                )
            service = (services.get(service_name) if service_name else None) or {}
            host = _literal_insecure(request.get("url"))
            if host and not service.get("allow_insecure_http"):
                problems.append(
                    doc.problem(
                        (*info.path, "request", "url"),
                        f"plain http:// to {host} is refused: use https, or set "
                        "allow_insecure_http: true on the service",
                    )
                )
        for i, rule in enumerate(step.get("on_status") or []):
            target = rule.get("goto")
            if rule.get("action") != "goto" or target is None:
                continue
            where = (*info.path, "on_status", i, "goto")
            if info.plain_for_each:
                problems.append(
                    doc.problem(
                        where,
                        "goto is not allowed in a for_each step; use a block (for_each + steps)",
                    )
                )
            elif target not in info.siblings:
                known = [s for s in info.siblings if s]
                scope = "this block" if len(info.path) > 2 else "the flow's steps"
                problems.append(
                    doc.problem(
                        where,
                        f"goto target '{target}' is not a step of {scope}"
                        + _did_you_mean(target, known),
                    )
                )
        for expr in _step_expressions(info.path, step):
            problems.extend(_check_expr(doc, expr, info, order, steps_in_item=info.in_item))

    for name in data.get("outputs") or {}:
        if name not in emitted:
            problems.append(
                doc.problem(
                    ("outputs", name),
                    f"no step emits the stream '{name}'" + _did_you_mean(name, sorted(emitted)),
                    severity="warning",
                )
            )
    if not any(p.severity == "error" for p in problems):
        # What only the model finds (a body_file that cannot be read or compiled).
        from runner.model import build_flow

        try:
            build_flow(doc)
        except FlowError as exc:
            problems.extend(exc.problems)
    return problems


def _check_expr(
    doc: Document,
    expr: _Expr,
    info: _StepInfo | None,
    order: dict[str, int],
    *,
    steps_in_item: bool,
) -> list[Problem]:
    problem, compiled = _compile_problem(doc, expr)
    if problem is not None:
        return [problem]
    out: list[Problem] = []
    if expr.language == "jinja":
        names = set(compiled.names)
    elif expr.on_record:
        names = set()
    else:
        names = set(compiled.root_names)
    allowed = set(_SCOPE_NAMES) | ({"record"} if expr.with_record else set())
    for name in sorted(names - allowed):
        kind = "template" if expr.language == "jinja" else "expression"
        out.append(
            _at_value(
                doc,
                expr.path,
                f"unknown name '{name}' in {kind}"
                + (
                    _did_you_mean(name, sorted(allowed))
                    or f"; the scope has {', '.join(sorted(allowed))}"
                ),
            )
        )
    if names & _ITEM_NAMES and not steps_in_item:
        out.append(
            _at_value(
                doc,
                expr.path,
                "'item' is used outside a for_each: it is undefined here",
                severity="warning",
            )
        )
    for ref in sorted(compiled.step_refs):
        if ref not in order:
            out.append(
                _at_value(
                    doc,
                    expr.path,
                    f"steps.{ref}: no step has the id '{ref}'" + _did_you_mean(ref, list(order)),
                )
            )
        elif info is not None and order[ref] >= info.order:
            which = "itself" if ref == info.id else "a later step"
            out.append(
                _at_value(
                    doc,
                    expr.path,
                    f"steps.{ref} refers to {which}: it has no value when step '{info.id}' runs",
                )
            )
    return out


def _at_value(doc: Document, path: Path, message: str, severity: str = "error") -> Problem:
    """A problem inside an expression, located at the expression's text."""
    line, column = doc.value_mark(path)
    return Problem(doc.file, line, column, _fmt(path), message, severity)


# ============================================================================ END SEMANTIC


def validate_document(doc: Document) -> list[Problem]:
    """Schema problems; if there are none, semantic problems."""
    problems = schema_problems(doc)
    if any(p.severity == "error" for p in problems):
        return problems
    return sorted([*problems, *semantic_problems(doc)])


def services_problems(doc: Document, known: Sequence[str] | None = None) -> list[Problem]:
    """Problems of a `--services` override file; `known` names the services of the flows.

    A name that no flow declares is a warning, not an error: one override file per
    environment is shared by many flows, and each flow uses only some of its services.
    """
    if not isinstance(doc.data, dict):
        return [Problem(doc.file, 1, 1, "", NOT_A_SERVICES_FILE)]
    valid = _surely_valid("services", doc.data)
    problems = [] if valid else _problems(doc, _services_validator(), doc.data)
    if known is not None:
        known_list = sorted(set(known))
        for name in doc.data:
            if name in known_list:
                continue
            close = _closest(str(name), known_list)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            message = f"service '{name}' is not declared by any flow validated{hint}"
            problems.append(doc.problem((name,), message, severity="warning"))
    return sorted(problems)


# --------------------------------------------------------------------------- files


def _excluded(path: str, exclude: Sequence[str]) -> bool:
    normal = os.path.normpath(path)
    name = os.path.basename(normal)
    return any(fnmatch.fnmatch(normal, g) or fnmatch.fnmatch(name, g) for g in exclude)


def _is_flow_file(path: str) -> bool:
    try:
        with open(path, "rb") as stream:
            return _STEPS_KEY.search(stream.read()) is not None
    except OSError:
        # An unreadable file in a folder is not known to be a flow: leave it out.
        return False


def find_flow_files(paths: Sequence[str], exclude: Sequence[str] = ()) -> list[str]:
    """The flow files named by `paths`: files as given; folders searched recursively.

    In a folder, a flow is a `*.yaml` or `*.yml` file with a top-level `steps` key (found by
    a line starting with `steps:`); hidden folders are skipped. `exclude` globs match the
    path or the file (or folder) name.
    """
    found: dict[str, None] = {}
    for given in paths:
        if os.path.isdir(given):
            in_folder = _flows_in_folder(given, exclude)
            if not in_folder:
                after = " (after --exclude)" if exclude else ""
                raise UsageError(f"no flow files in folder '{given}'{after}")
            found.update(dict.fromkeys(in_folder))
        elif os.path.exists(given):
            if not _excluded(given, exclude):
                found[given] = None
        else:
            raise UsageError(f"no such file or folder: '{given}'")
    if not found:
        raise UsageError("no flow files to validate (all excluded)")
    return list(found)


def _flows_in_folder(folder: str, exclude: Sequence[str]) -> list[str]:
    flows: list[str] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(
            d
            for d in dirs
            if not d.startswith(".") and not _excluded(os.path.join(root, d), exclude)
        )
        for name in sorted(files):
            if not name.endswith(_FLOW_SUFFIXES):
                continue
            path = os.path.join(root, name)
            if not _excluded(path, exclude) and _is_flow_file(path):
                flows.append(path)
    return flows


def validate_paths(
    paths: Sequence[str], exclude: Sequence[str] = (), services_file: str | None = None
) -> list[Problem]:
    """All problems of all flow files under `paths` (and of the override file), sorted.

    A valid override is applied before the semantic checks, as `runner run` would apply it.
    """
    problems: list[Problem] = []
    overrides: Document | None = None
    if services_file is not None:
        _check_exists(services_file)
        try:
            overrides = load_document(services_file)
        except FlowError as exc:
            problems.extend(exc.problems)
    override_problems = services_problems(overrides) if overrides is not None else []
    usable = overrides if not any(p.severity == "error" for p in override_problems) else None

    services: list[str] = []
    for file in find_flow_files(paths, exclude):
        try:
            doc = load_document(file)
        except FlowError as exc:
            problems.extend(exc.problems)
            continue
        found = schema_problems(doc)
        problems.extend(found)
        if not any(p.severity == "error" for p in found):
            merged = merge_services(doc, usable.data) if usable is not None else doc
            problems.extend(semantic_problems(merged))
        if isinstance(doc.data, dict) and isinstance(doc.data.get("services"), dict):
            services.extend(str(name) for name in doc.data["services"])
    if overrides is not None:
        problems.extend(services_problems(overrides, services))
    return sorted(problems)


def _check_exists(services_file: str) -> None:
    if not os.path.exists(services_file):
        raise UsageError(f"no such services file: '{services_file}'")


def load_services_override(services_file: str) -> Document:
    """Load and check a `--services` file; FlowError with its problems, located in it."""
    _check_exists(services_file)
    doc = load_document(services_file)
    errors = [p for p in services_problems(doc) if p.severity == "error"]
    if errors:
        raise FlowError(errors)
    return doc


def merge_services(doc: Document, overrides: Any) -> Document:
    """The flow with each key given for one of its services replacing that whole key.

    Services that the flow does not declare are ignored (one file serves many flows). Merged
    keys keep the location of their service in the flow file.
    """
    data = doc.data
    if not isinstance(data, dict) or not isinstance(overrides, dict):
        return doc
    declared = data.get("services")
    if not isinstance(declared, dict):
        return doc
    services = {
        name: {**service, **overrides[name]}
        if isinstance(service, dict) and isinstance(overrides.get(name), dict)
        else service
        for name, service in declared.items()
    }
    return dataclasses.replace(doc, data={**data, "services": services})


def apply_services_override(doc: Document, services_file: str) -> Document:
    """`merge_services` with a checked `--services` file (FlowError if it is invalid)."""
    return merge_services(doc, load_services_override(services_file).data)


# --------------------------------------------------------------------------- output


def _escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def format_problems(problems: list[Problem], fmt: str) -> str:
    """Problems as `text` (one a line), `json` (one array) or `github` (workflow commands)."""
    if fmt == "text":
        return "\n".join(str(p) for p in problems)
    if fmt == "json":
        return json.dumps([p.as_dict() for p in problems], indent=2, ensure_ascii=False)
    if fmt == "github":
        lines = []
        for p in problems:
            command = "warning" if p.severity == "warning" else "error"
            where = f"file={_escape_property(p.file)},line={p.line},col={p.column}"
            message = f"{p.path}: {p.message}" if p.path else p.message
            lines.append(f"::{command} {where}::{_escape_data(message)}")
        return "\n".join(lines)
    raise UsageError(f"unknown format '{fmt}'; expected one of: {', '.join(FORMATS)}")
