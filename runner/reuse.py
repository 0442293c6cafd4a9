"""`include`, `defaults`, `definitions` and `use`: the flow that the compile pass sees, merged
from the places its keys were written.

The merge runs between loading and the compile walk, on plain data. Each value merged into a
step keeps where it was written (an `Origin` in the merged Document), so that a problem in it
is reported at its own file, line and column, with a note naming the step that used it:
`common/defaults.yaml:12:5: defaults.retry.max_attempts: ... (in step orders of flows/orders.yaml)`.

Precedence, lowest first: `defaults` (only into steps that send a request, at any depth),
the `use`d definition, the step's own keys. Mappings merge key by key; lists and scalars
are replaced. An included file holds only `services`, `definitions`, `defaults` and
`include`; its paths are relative to it; a name defined in two files is an error naming both;
a cycle of includes is an error.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from typing import Any, Final

from runner.errors import FlowError, Problem, did_you_mean
from runner.loader import Document, Origin, Path, load_document
from runner.schema import included_problems

__all__ = ["Expanded", "Includes", "expand", "without_note"]

# The sections an included file contributes, compared one level down for duplicates.
SECTIONS: Final = ("services", "definitions", "defaults")
_SINGULAR: Final = {"services": "service", "definitions": "definition", "defaults": "default"}
# Keys whose presence makes a flow need the merge.
_REUSE_KEYS: Final = ("include", "defaults", "definitions")
_NOTE_STARTS: Final = (" (in step ", " (included by ")


@dataclasses.dataclass(slots=True)
class _Included:
    doc: Document | None
    problems: list[Problem]  # its own problems, the same whoever includes it


class Includes:
    """Included files, each loaded and checked once (for one load, or one `validate` run)."""

    def __init__(self) -> None:
        self._files: dict[str, _Included] = {}

    def get(self, file: str) -> _Included:
        key = os.path.realpath(file)
        found = self._files.get(key)
        if found is None:
            try:
                doc = load_document(file)
            except FlowError as exc:
                found = _Included(None, list(exc.problems))
            else:
                found = _Included(doc, included_problems(doc))
            self._files[key] = found
        return found


@dataclasses.dataclass(frozen=True, slots=True)
class Expanded:
    """The merged document, the problems of the merge itself, and the included documents."""

    doc: Document
    problems: list[Problem]
    included: tuple[Document, ...] = ()
    notes: frozenset[str] = frozenset()


def without_note(problem: Problem, notes: frozenset[str]) -> str | None:
    """The message of a problem in a merged value without its note, or None if it has none."""
    message = problem.message
    if not notes or not message.endswith(")"):
        return None
    for start in _NOTE_STARTS:
        at = message.rfind(start)
        if at >= 0 and message[at:] in notes:
            return message[:at]
    return None


def _uses(steps: Any) -> bool:
    if not isinstance(steps, list):
        return False
    return any(isinstance(s, dict) and ("use" in s or _uses(s.get("steps"))) for s in steps)


def expand(doc: Document, includes: Includes | None = None) -> Expanded:
    """The flow with its includes, defaults and definitions merged in; the same document when
    it uses none of them."""
    data = doc.data
    if not isinstance(data, dict) or (
        not any(key in data for key in _REUSE_KEYS) and not _uses(data.get("steps"))
    ):
        return Expanded(doc, [])
    return _Merge(doc, includes or Includes()).run()


class _Merge:
    def __init__(self, doc: Document, includes: Includes) -> None:
        self.doc = doc
        self.includes = includes
        self.problems: list[Problem] = []
        # (section, name) -> (value, the document it is written in, its path there)
        self.table: dict[tuple[str, str], tuple[Any, Document, Path]] = {}
        self.included: dict[str, Document] = {}
        self.origins: dict[Path, Origin] = {}
        self.notes: set[str] = set()

    def run(self) -> Expanded:
        doc = self.doc
        data: dict[str, Any] = doc.data
        self.collect(doc, data, (os.path.realpath(doc.file),))
        merged = dict(data)
        if any(section == "services" for section, _ in self.table):
            services: dict[str, Any] = {}
            note = f" (included by {doc.file})"
            for (section, name), (value, where, path) in self.table.items():
                if section != "services":
                    continue
                services[name] = value
                if where is not doc:
                    self.origins[("services", name)] = Origin(where, path, note)
                    self.notes.add(note)
            merged["services"] = services
        if isinstance(data.get("steps"), list):
            merged["steps"] = self.steps(data["steps"], ("steps",))
        return Expanded(
            dataclasses.replace(doc, data=merged, origins=self.origins),
            self.problems,
            tuple(self.included.values()),
            frozenset(self.notes),
        )

    # -- collecting the sections of the flow and its includes ----------------------------

    def collect(self, doc: Document, data: dict[str, Any], chain: tuple[str, ...]) -> None:
        for section in SECTIONS:
            entries = data.get(section)
            if not isinstance(entries, dict):
                continue
            for name, value in entries.items():
                self.add(section, str(name), value, doc)
        names = data.get("include")
        if not isinstance(names, list):
            return
        for i, name in enumerate(names):
            if not isinstance(name, str) or not name:
                continue  # the schema says so
            file = os.path.normpath(os.path.join(os.path.dirname(doc.file), name))
            real = os.path.realpath(file)
            if real in chain:
                loop = [*chain[chain.index(real) :], real]
                shown = " -> ".join(os.path.relpath(p) for p in loop)
                self.problems.append(doc.problem(("include", i), f"include cycle: {shown}"))
                continue
            if not os.path.isfile(file):
                self.problems.append(doc.problem(("include", i), f"no such file: {file}"))
                continue
            found = self.includes.get(file)
            self.problems.extend(found.problems)
            if found.doc is None or not isinstance(found.doc.data, dict):
                continue
            self.included.setdefault(real, found.doc)
            self.collect(found.doc, found.doc.data, (*chain, real))

    def add(self, section: str, name: str, value: Any, doc: Document) -> None:
        key = (section, name)
        path: Path = (section, name)
        first = self.table.get(key)
        if first is None:
            self.table[key] = (value, doc, path)
            return
        first_doc = first[1]
        if os.path.realpath(first_doc.file) == os.path.realpath(doc.file):
            return  # the same file reached through two includes
        # Reported in the flow when the flow is one of the two, else at the later file.
        at, other = (first_doc, doc) if first_doc is self.doc else (doc, first_doc)
        line, column = other.locate(path)
        message = (
            f"{_SINGULAR[section]} '{name}' is defined twice: here and in "
            f"{other.file}:{line}:{column}"
        )
        self.problems.append(at.problem(path, message))

    # -- merging into the steps ------------------------------------------------------------

    def steps(self, steps: list[Any], path: Path) -> list[Any]:
        return [
            self.step(step, (*path, i)) if isinstance(step, dict) else step
            for i, step in enumerate(steps)
        ]

    def step(self, step: dict[str, Any], path: Path) -> dict[str, Any]:
        step_id = step.get("id")
        note = f" (in step {step_id if isinstance(step_id, str) else '?'} of {self.doc.file})"
        used: tuple[Any, Document, Path] | None = None
        name = step.get("use")
        if isinstance(name, str):
            used = self.table.get(("definitions", name))
            if used is None:
                known = sorted(n for s, n in self.table if s == "definitions")
                self.problems.append(
                    self.doc.problem(
                        (*path, "use"), f"unknown definition '{name}'" + did_you_mean(name, known)
                    )
                )
            elif not isinstance(used[0], dict):
                used = None  # the schema says so
        base: dict[str, Any] = used[0] if used is not None else {}
        sends = "request" in step or "request" in base
        layers: list[tuple[dict[str, Any], Document | None, Path]] = []
        if sends:
            for (section, key), (value, where, at) in self.table.items():
                if section == "defaults":
                    layers.append(({key: value}, where, at[:-1]))
        if used is not None:
            layers.append((base, used[1], used[2]))
        layers.append((step, None, path))

        merged: dict[str, Any] = {}
        for key in _keys(layers):
            if key == "use" and used is not None:
                continue  # kept when unknown: the step's other problems are then not reported
            found = [
                (layer[key], (where, (*at, key)) if where is not None else None)
                for layer, where, at in layers
                if key in layer
            ]
            merged[key] = self.merge(found, (*path, key), note)
        if isinstance(merged.get("steps"), list):
            merged["steps"] = self.steps(merged["steps"], (*path, "steps"))
        return merged

    def merge(
        self, layers: list[tuple[Any, tuple[Document, Path] | None]], at: Path, note: str
    ) -> Any:
        """The value at `at` from its layers, lowest first; records where each part is from."""
        value, source = layers[-1]
        if source is not None:
            self.origins[at] = Origin(source[0], source[1], note)
            self.notes.add(note)
        if not isinstance(value, dict):
            return value
        mappings: list[tuple[dict[str, Any], tuple[Document, Path] | None]] = []
        for lower, where in reversed(layers):
            if not isinstance(lower, dict):
                break  # a scalar or list below is replaced whole
            mappings.append((lower, where))
        mappings.reverse()
        if len(mappings) == 1:
            return value
        out: dict[str, Any] = {}
        for key in _keys(m for m, _ in mappings):
            found = [
                (m[key], (where[0], (*where[1], key)) if where is not None else None)
                for m, where in mappings
                if key in m
            ]
            out[key] = self.merge(found, (*at, key), note)
        return out


def _keys(mappings: Iterable[Any]) -> list[str]:
    """The keys of several mappings, lowest layer first, each once."""
    keys: dict[str, None] = {}
    for mapping in mappings:
        if isinstance(mapping, dict):
            keys.update(dict.fromkeys(mapping))
        elif isinstance(mapping, tuple):
            keys.update(dict.fromkeys(mapping[0]))
    return list(keys)
