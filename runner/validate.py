"""`runner validate`: finds flow files in folders, runs the compile pass on each (with a
`--services` file applied, as `runner run` would apply it), and formats the problems for
people and CI."""

from __future__ import annotations

import fnmatch
import json
import os
import re
from collections.abc import Sequence
from typing import Final

from runner.compiler import compile_document, merge_services
from runner.errors import FlowError, Problem, UsageError
from runner.loader import Document, load_document
from runner.reuse import Includes
from runner.schema import flow_schema, schema_problems, services_problems
from runner.words import plural

__all__ = [
    "apply_services_override",
    "check_paths",
    "closing_line",
    "find_flow_files",
    "flow_schema",
    "format_problems",
    "load_services_override",
    "merge_services",
    "schema_problems",
    "services_problems",
    "validate_document",
    "validate_paths",
]

FORMATS: Final = ("text", "json", "github")

# A top-level `steps` key starts a line in block style; nested ones are indented.
_STEPS_KEY: Final = re.compile(rb"""^(?:steps|'steps'|"steps")[ \t]*:""", re.MULTILINE)
_FLOW_SUFFIXES: Final = (".yaml", ".yml")


def validate_document(doc: Document) -> list[Problem]:
    """Every problem of one loaded flow, schema and semantic, sorted: the compile pass."""
    return list(compile_document(doc).problems)


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

    A valid override is applied to each flow's services, as `runner run` would apply it.
    """
    return check_paths(paths, exclude, services_file)[0]


def check_paths(
    paths: Sequence[str], exclude: Sequence[str] = (), services_file: str | None = None
) -> tuple[list[Problem], int]:
    """`validate_paths`, and the number of flow files checked."""
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
    # Each included file is read and checked once, and its own problems reported once.
    includes = Includes()
    files = find_flow_files(paths, exclude)
    for file in files:
        try:
            doc = load_document(file)
        except FlowError as exc:
            problems.extend(exc.problems)
            continue
        compiled = compile_document(doc, usable.data if usable is not None else None, includes)
        problems.extend(compiled.problems)
        services.extend(compiled.service_names)
    if overrides is not None:
        problems.extend(services_problems(overrides, services))
    return sorted(dict.fromkeys(problems)), len(files)


def closing_line(problems: Sequence[Problem], flows: int) -> str:
    """`checked 8 flows: 0 errors, 1 warning`, as linters end their report."""
    errors = sum(1 for p in problems if p.severity == "error")
    warnings = len(problems) - errors
    return (
        f"checked {plural(flows, 'flow')}: {plural(errors, 'error')}, {plural(warnings, 'warning')}"
    )


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
            message = f"{p.path}: {p.summary}" if p.path else p.summary
            lines.append(f"::{command} {where}::{_escape_data(message)}")
        return "\n".join(lines)
    raise UsageError(f"unknown format '{fmt}'; expected one of: {', '.join(FORMATS)}")
