"""The flow format's JSON Schema and the located, readable problems of a document that breaks
it (and of a `--services` file). A valid document is checked by jsonschema-rs when it is
installed, without importing jsonschema, which only words the problems."""

from __future__ import annotations

import functools
import json
import pkgutil
import re
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Final

from runner.errors import Problem, RunnerError, closest
from runner.loader import Document, Path

if TYPE_CHECKING:
    from jsonschema import Draft202012Validator, ValidationError

__all__ = [
    "NOT_A_FLOW",
    "flow_schema",
    "included_problems",
    "schema_problems",
    "services_problems",
]

SCHEMA_RESOURCE: Final = "flow.schema.json"

NOT_A_FLOW: Final = (
    "a flow is a mapping with version, steps and optionally services, inputs, outputs"
)
NOT_AN_INCLUDED_FILE: Final = (
    "an included file is a mapping with services, definitions, defaults and include"
)
NOT_A_SERVICES_FILE: Final = (
    "a services file is a mapping of service names to service keys (base_url, auth, ...)"
)

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


def _included_schema() -> dict[str, Any]:
    # The root's properties stay for the `#/properties/...` references of `included_file`.
    schema = flow_schema()
    return {
        "$schema": schema["$schema"],
        "$ref": "#/$defs/included_file",
        "properties": schema["properties"],
        "$defs": schema["$defs"],
    }


@functools.cache
def _included_validator() -> Draft202012Validator:
    from jsonschema import Draft202012Validator

    return Draft202012Validator(_included_schema())


@functools.cache
def _flow_validator() -> Draft202012Validator:
    from jsonschema import Draft202012Validator

    return Draft202012Validator(flow_schema())


@functools.cache
def _services_validator() -> Draft202012Validator:
    from jsonschema import Draft202012Validator

    return Draft202012Validator(_services_schema())


# jsonschema-rs answers "valid?" in microseconds and imports in a few milliseconds; jsonschema
# (~30 ms to import) is then needed only to word the problems of a flow that has some, or
# for everything where jsonschema-rs is missing. Both implement draft 2020-12; tests hold them
# to the same verdicts.
@functools.cache
def _fast_check(which: str) -> Callable[[Any], bool] | None:
    try:
        import jsonschema_rs
    except ImportError:
        return None
    schemas: dict[str, Callable[[], dict[str, Any]]] = {
        "flow": flow_schema,
        "services": _services_schema,
        "included": _included_schema,
    }
    schema = schemas[which]()
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


def _unknown_key_message(key: str, allowed: Sequence[str]) -> str:
    close = closest(key, allowed)
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
            close = closest(key, allowed)
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


def included_problems(doc: Document) -> list[Problem]:
    """Every way a file named by `include` breaks its schema, located in it."""
    if not isinstance(doc.data, dict):
        return [Problem(doc.file, 1, 1, "", NOT_AN_INCLUDED_FILE)]
    if _surely_valid("included", doc.data):
        return []
    return _problems(doc, _included_validator(), doc.data)


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
            close = closest(str(name), known_list)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            message = f"service '{name}' is not declared by any flow validated{hint}"
            problems.append(doc.problem((name,), message, severity="warning"))
    return sorted(problems)
