"""`runner test --update`: snapshots (outputs and state) rewritten from a case's run.

A file named by the case is rewritten as JSONL; an inline value is replaced in place in the
test file, as flow-style JSON, every other byte of the file untouched (comments, order,
quoting). `exit_code`, `summary` and `error` expectations are never changed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import yaml

from runner.outputs import atomic_write

Path = Sequence[str | int]


def jsonl(records: list[Any]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in records)


def write_snapshot_file(path: str, records: list[Any]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write(path, jsonl(records).encode("utf-8"))


def flow_json(value: Any) -> str:
    """JSON as a YAML flow value: valid YAML 1.2, one line."""
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def _child(node: yaml.Node, key: str | int) -> tuple[yaml.Node | None, yaml.Node | None]:
    """(key node, value node) of a mapping entry or a sequence item."""
    if isinstance(node, yaml.MappingNode) and isinstance(key, str):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == key:
                return k, v
    if isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
        return None, node.value[key]
    return None, None


def _content_end(node: yaml.Node) -> int:
    """Where a node's own text ends: for a block collection, the end of its last leaf (its
    end mark lies after the blank lines and comments that follow it)."""
    if isinstance(node, yaml.ScalarNode) or getattr(node, "flow_style", False):
        return int(node.end_mark.index)
    children: list[yaml.Node] = []
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            children += [k, v]
    elif isinstance(node, yaml.SequenceNode):
        children = list(node.value)
    if not children:
        return int(node.end_mark.index)
    return max(_content_end(child) for child in children)


def _span(text: str, root: yaml.Node, path: Path) -> tuple[int, int, str]:
    """(start, end, prefix) of the value at `path`, to be replaced by prefix + new text."""
    node: yaml.Node | None = root
    key_node: yaml.Node | None = None
    for key in path:
        assert node is not None
        key_node, node = _child(node, key)
        if node is None:
            raise KeyError(f"no {'.'.join(map(str, path))} in the test file")
    assert node is not None
    flow = isinstance(node, yaml.ScalarNode) or getattr(node, "flow_style", False)
    if flow:
        return int(node.start_mark.index), int(node.end_mark.index), ""
    # A block collection: from just after the key's colon to the end of its content.
    assert key_node is not None
    colon = text.index(":", int(key_node.end_mark.index))
    return colon + 1, _content_end(node), " "


def replace_inline(text: str, replacements: list[tuple[Path, Any]]) -> str:
    """The test file's text with each value at a path replaced by flow-style JSON."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is None or not replacements:
        return text
    spans = sorted(
        ((*_span(text, root, path), flow_json(value)) for path, value in replacements),
        key=lambda span: span[0],
        reverse=True,  # from the end, so that earlier offsets stay valid
    )
    for start, end, prefix, new in spans:
        text = text[:start] + prefix + new + text[end:]
    return text


def rewrite_test_file(path: str, replacements: list[tuple[Path, Any]]) -> None:
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    new = replace_inline(text, replacements)
    if new != text:
        atomic_write(path, new.encode("utf-8"))
