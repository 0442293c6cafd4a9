"""Results of `runner test` as text, JSON, GitHub annotations and JUnit XML."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any
from xml.etree import ElementTree

from runner.words import plural

PASS, FAIL, ERROR = "pass", "fail", "error"


@dataclass(slots=True)
class CaseResult:
    """One case's verdict: `pass`, `fail` (an expectation not met) or `error` (it could not run)."""

    file: str
    line: int
    case: str
    status: str
    differences: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    virtual_s: float = 0.0
    updated: list[str] = field(default_factory=list)  # what --update rewrote

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "line": self.line,
            "case": self.case,
            "status": self.status,
            "differences": list(self.differences),
            "updated": list(self.updated),
            "wall_s": round(self.wall_s, 4),
            "virtual_s": round(self.virtual_s, 3),
        }


def counts(results: list[CaseResult]) -> tuple[int, int, int]:
    passed = sum(r.status == PASS for r in results)
    failed = sum(r.status == FAIL for r in results)
    return passed, failed, len(results) - passed - failed


def text_report(results: list[CaseResult]) -> str:
    lines = []
    for r in results:
        label = {PASS: "PASS", FAIL: "FAIL", ERROR: "ERROR"}[r.status]
        lines.append(f"{label} {r.case} ({r.file}:{r.line})")
        lines += [f"    {d}" for d in r.differences]
        lines += [f"    updated {u}" for u in r.updated]
    passed, failed, errors = counts(results)
    tail = f"{passed} passed, {failed} failed"
    if errors:
        tail += f", {plural(errors, 'error')}"
    lines.append(tail)
    return "\n".join(lines)


def json_report(results: list[CaseResult]) -> str:
    return json.dumps([r.as_dict() for r in results], indent=2, ensure_ascii=False)


def _escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def github_report(results: list[CaseResult]) -> str:
    """`::error file=F,line=L::...` for each failed case, at its `- name:` line; then counts."""
    lines = []
    for r in results:
        if r.status == PASS:
            continue
        title = f"{r.case}: " if r.case else ""
        message = title + "\n".join(r.differences or [r.status])
        lines.append(
            f"::error file={_escape_property(r.file)},line={r.line}::{_escape_data(message)}"
        )
    passed, failed, errors = counts(results)
    errors_part = f", {plural(errors, 'error')}" if errors else ""
    lines.append(f"{passed} passed, {failed} failed{errors_part}")
    return "\n".join(lines)


def junit_xml(results: list[CaseResult]) -> str:
    """JUnit XML: `testsuites`, a `testsuite` per test file, a `testcase` per case."""
    root = ElementTree.Element("testsuites", name="runner test")
    by_file: dict[str, list[CaseResult]] = {}
    for r in results:
        by_file.setdefault(r.file, []).append(r)
    for file, cases in by_file.items():
        _, failed, errors = counts(cases)
        suite = ElementTree.SubElement(
            root,
            "testsuite",
            name=file,
            tests=str(len(cases)),
            failures=str(failed),
            errors=str(errors),
            skipped="0",
            time=f"{sum(c.wall_s for c in cases):.3f}",
        )
        classname = os.path.splitext(file)[0].replace(os.sep, ".")
        for r in cases:
            case = ElementTree.SubElement(
                suite, "testcase", name=r.case, classname=classname, time=f"{r.wall_s:.3f}",
                file=file, line=str(r.line),
            )  # fmt: skip
            if r.status != PASS:
                tag = "failure" if r.status == FAIL else "error"
                first = r.differences[0] if r.differences else r.status
                node = ElementTree.SubElement(case, tag, message=first, type=tag)
                node.text = "\n".join(r.differences)
    _, failed, errors = counts(results)
    root.set("tests", str(len(results)))
    root.set("failures", str(failed))
    root.set("errors", str(errors))
    root.set("time", f"{sum(r.wall_s for r in results):.3f}")
    ElementTree.indent(root)
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        + ElementTree.tostring(root, encoding="unicode")
        + "\n"
    )
