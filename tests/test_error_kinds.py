"""The documented `error.kind` list is the complete list of kinds the code can produce."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from runner.errors import ERROR_KINDS, RunnerError

ROOT = Path(__file__).resolve().parent.parent


def _documented(text: str) -> list[str]:
    """The first column of the table under the "Error kinds" heading of docs/FORMAT.md."""
    section = text.split("### Error kinds", 1)[1]
    kinds = []
    for line in section.splitlines()[1:]:
        if line.startswith("#"):
            break
        match = re.match(r"\| `([a-z_]+)` \|", line)
        if match:
            kinds.append(match.group(1))
    return kinds


def _constants(node: ast.AST) -> set[str]:
    """The literal strings an expression can give: `"x"`, `"a" if c else "b"`, `k or "x"`."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, ast.IfExp):
        return _constants(node.body) | _constants(node.orelse)
    if isinstance(node, ast.BoolOp):
        return set().union(*(_constants(value) for value in node.values))
    return set()


def _kinds_in_code() -> set[str]:
    """Every literal given as an error's kind: `kind = "x"` in a class body, `kind="x"` (or
    `kind="a" if c else "b"`) passed to a call."""
    found: set[str] = set()
    for file in (ROOT / "runner").rglob("*.py"):
        tree = ast.parse(file.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if (
                        isinstance(item, ast.Assign | ast.AnnAssign)
                        and any(
                            isinstance(t, ast.Name) and t.id == "kind"
                            for t in (
                                item.targets if isinstance(item, ast.Assign) else [item.target]
                            )
                        )
                        and item.value is not None
                    ):
                        found |= _constants(item.value)
            elif isinstance(node, ast.Call):
                for keyword in node.keywords:
                    if keyword.arg == "kind" and not isinstance(keyword.value, ast.Name):
                        found |= _constants(keyword.value)
    return found


def test_the_docs_list_every_error_kind_and_no_other() -> None:
    documented = _documented((ROOT / "docs" / "FORMAT.md").read_text(encoding="utf-8"))
    assert documented == list(ERROR_KINDS)


def test_the_code_produces_only_documented_kinds() -> None:
    in_code = _kinds_in_code()
    # The walk sees the error classes and the kinds passed where errors are raised.
    assert {"render", "timeout", "io", "destination", "cursor", "internal"} <= in_code
    assert in_code - set(ERROR_KINDS) == set()


def test_every_error_class_has_a_documented_kind() -> None:
    classes: list[type[RunnerError]] = [RunnerError]
    seen = []
    while classes:
        cls = classes.pop()
        seen.append(cls)
        classes.extend(cls.__subclasses__())
    assert {cls.kind for cls in seen if cls.__module__ == "runner.errors"} <= set(ERROR_KINDS)


def test_the_readme_names_every_kind() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    paragraph = readme.split("`error.kind`", 1)[1].split("\n\n", 1)[0]
    assert re.findall(r"`([a-z_]+)`", paragraph)[: len(ERROR_KINDS)] == list(ERROR_KINDS)
