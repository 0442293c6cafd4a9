"""The package's shape: no module imports, directly or through others, a module that imports
it back, counting the imports made inside functions (the lazy ones) too."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "runner"


def _module_name(file: Path) -> str:
    parts = list(file.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(file: Path, module: str, modules: set[str]) -> set[str]:
    """The package's modules that `file` imports anywhere but under `if TYPE_CHECKING:`."""
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def target(name: str) -> None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                target(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            for alias in node.names:
                full = f"{source}.{alias.name}"
                target(full if full in modules else source)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(file.read_text(encoding="utf-8")))
    return found


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(f): f for f in PACKAGE.rglob("*.py")}
    names = set(files)
    return {name: _imports(file, name, names) for name, file in files.items()}


def _cycle_from(start: str, graph: dict[str, set[str]]) -> list[str] | None:
    """A path start -> ... -> start, if there is one."""
    stack: list[tuple[str, list[str]]] = [(start, [start])]
    seen: set[str] = set()
    while stack:
        node, path = stack.pop()
        for nxt in sorted(graph[node]):
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, [*path, nxt]))
    return None


def test_the_import_graph_is_seen() -> None:
    graph = import_graph()
    # The walk finds top-level, relative and lazy imports alike.
    assert "runner.errors" in graph["runner.loader"]
    assert "runner.model" in graph["runner.run"]
    assert "runner.sandbox" in graph["runner.templates"]  # imported inside a function


def test_the_package_has_no_import_cycles() -> None:
    graph = import_graph()
    cycles = [" -> ".join(c) for name in sorted(graph) if (c := _cycle_from(name, graph))]
    assert cycles == []
