"""Checks flows offline: the JSON Schema of the flow format, then semantic checks, as located
problems; also finds flow files in folders and formats problems for people and CI.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
import json
import os
import re
from collections.abc import Iterator, Sequence
from importlib import resources
from typing import Any, Final

from jsonschema import Draft202012Validator, ValidationError
from jsonschema.exceptions import best_match

from runner.errors import FlowError, Problem, RunnerError, UsageError
from runner.loader import Document, Path, load_document

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
        text = resources.files("runner.schemas").joinpath(SCHEMA_RESOURCE).read_text("utf-8")
        schema: dict[str, Any] = json.loads(text)
    except (OSError, ImportError, ValueError) as exc:
        raise RunnerError(f"the flow schema cannot be read from the installation: {exc}") from exc
    return schema


@functools.cache
def _flow_validator() -> Draft202012Validator:
    return Draft202012Validator(flow_schema())


@functools.cache
def _services_validator() -> Draft202012Validator:
    # The override file is the flow's `services` mapping on its own, with the same definitions.
    schema = flow_schema()
    services = {
        "$schema": schema["$schema"],
        **schema["properties"]["services"],
        "$defs": schema["$defs"],
    }
    return Draft202012Validator(services)


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
    close = difflib.get_close_matches(key, allowed, n=1)
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
            close = difflib.get_close_matches(key, allowed, n=1)
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
    return _problems(doc, _flow_validator(), doc.data)


# ============================================================================ SEMANTIC CHECKS
def semantic_problems(doc: Document) -> list[Problem]:
    """Checks beyond the schema (step references, goto targets, expressions...).

    Called only for a document that the schema found no error in, so `doc.data` has the
    shape the schema describes.
    """
    return []


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
    problems = _problems(doc, _services_validator(), doc.data)
    if known is not None:
        known_list = sorted(set(known))
        for name in doc.data:
            if name in known_list:
                continue
            close = difflib.get_close_matches(str(name), known_list, n=1)
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
