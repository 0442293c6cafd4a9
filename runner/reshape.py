"""Reshaping a mapped record: `add_fields` (dotted names write into nested objects),
`drop_fields` (dotted paths, `*` for one level) and `rename_keys` (lower, snake, or a
mapping of top-level keys). Each is compiled once into a function of one record; none
changes the record it is given (a response body may still be read after the mapping)."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from typing import Any

from runner.errors import RenderError

__all__ = [
    "RENAME_MODES",
    "compile_add",
    "compile_drop",
    "compile_rename",
    "snake_case",
]

Reshape = Callable[[dict[str, Any]], dict[str, Any]]
RENAME_MODES = ("lower", "snake")


# --- add_fields ------------------------------------------------------------------------------


def compile_add(
    fields: tuple[tuple[str, Callable[[Any], Any]], ...],
) -> Callable[[dict[str, Any], Callable[[str], Any]], dict[str, Any]]:
    """`add(record, value_of)`: the record with each name set to `value_of(name)`, in order;
    a dotted name (`meta.source`) creates missing objects on the way, and a value that is
    not an object on the way is a RenderError naming the key."""
    plain = tuple(name for name, _ in fields if "." not in name)
    if len(plain) == len(fields):

        def add_top(record: dict[str, Any], value_of: Callable[[str], Any]) -> dict[str, Any]:
            out = dict(record)
            for name in plain:
                out[name] = value_of(name)
            return out

        return add_top
    paths = tuple((name, tuple(name.split("."))) for name, _ in fields)

    def add_nested(record: dict[str, Any], value_of: Callable[[str], Any]) -> dict[str, Any]:
        out = dict(record)
        for name, parts in paths:
            value = value_of(name)
            if len(parts) == 1:
                out[name] = value
            else:
                _set_path(out, parts, value, name)
        return out

    return add_nested


def _set_path(record: dict[str, Any], parts: tuple[str, ...], value: Any, name: str) -> None:
    node = record
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = {}
        elif isinstance(child, dict):
            child = dict(child)  # copied: the original may be part of a response body
        else:
            where = ".".join(parts[: depth + 1])
            raise RenderError(
                f"add_fields.{name}: '{where}' is {_kind(child)}, not an object, so "
                f"'{name}' cannot be set in it"
            )
        node[part] = child
        node = child
    node[parts[-1]] = value


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "null" if value is None else type(value).__name__


# --- drop_fields ----------------------------------------------------------------------------


def compile_drop(paths: tuple[str, ...]) -> Reshape:
    """Removes each dotted path; `*` matches every key of one level (`x.*` leaves `x: {}`,
    `*.zip` drops `zip` from each top-level object). Absent keys are ignored."""
    top = frozenset(p for p in paths if "." not in p and p != "*")
    nested = tuple(tuple(p.split(".")) for p in paths if "." in p or p == "*")
    if not nested:

        def drop_top(record: dict[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in record.items() if k not in top}

        return drop_top

    def drop(record: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {k: v for k, v in record.items() if k not in top}
        for parts in nested:
            out = _drop_path(out, parts)
        return out

    return drop


def _drop_path(node: dict[str, Any], parts: tuple[str, ...]) -> dict[str, Any]:
    """`node` without `parts`, copied where it changes."""
    head, rest = parts[0], parts[1:]
    if not rest:
        if head == "*":
            return {}
        if head not in node:
            return node
        return {k: v for k, v in node.items() if k != head}
    keys = list(node) if head == "*" else ([head] if head in node else [])
    out = node
    for key in keys:
        child = node[key]
        if not isinstance(child, dict):
            continue
        changed = _drop_path(child, rest)
        if changed is not child:
            if out is node:
                out = dict(node)
            out[key] = changed
    return out


# --- rename_keys ----------------------------------------------------------------------------

_ACRONYM = re.compile(r"([A-Z]+)([A-Z][a-z])")
_WORD = re.compile(r"([a-z0-9])([A-Z])")
_SEPARATORS = re.compile(r"[\s\-.]+")


@functools.lru_cache(maxsize=4096)
def snake_case(key: str) -> str:
    """`CamelCase` -> `camel_case`, `HTTPCode` -> `http_code`, `userID` -> `user_id`,
    `first-name` -> `first_name`; a key already in snake case stays."""
    text = _ACRONYM.sub(r"\1_\2", key)
    text = _WORD.sub(r"\1_\2", text)
    return _SEPARATORS.sub("_", text).lower()


@functools.lru_cache(maxsize=4096)
def _lower(key: str) -> str:
    return key.lower()


def compile_rename(mode: str | Mapping[str, str]) -> Reshape:
    """Renames top-level keys, keeping their order; two keys that end with one name are a
    RenderError (one value would be lost)."""
    convert: Callable[[str], str]
    if isinstance(mode, str):
        if mode not in RENAME_MODES:
            raise ValueError(f"rename_keys: {mode!r} is not one of lower, snake, or a mapping")
        convert = _lower if mode == "lower" else snake_case
    else:
        table = dict(mode)

        def convert_by_table(key: str) -> str:
            return table.get(key, key)

        convert = convert_by_table

    def rename(record: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in record.items():
            new = convert(key)
            if new in out:
                first = next(k for k in record if convert(k) == new)
                raise RenderError(f"rename_keys: '{first}' and '{key}' are both renamed to '{new}'")
            out[new] = value
        return out

    return rename


# --- the three in order -----------------------------------------------------------------------

# One add_fields entry: its name, its function, and whether it reads the scope (a template,
# given the scope with `record`) or the record (JMESPath).
AddEntry = tuple[str, Callable[[Any], Any], bool]
Reshaper = Callable[[dict[str, Any], Mapping[str, Any]], dict[str, Any]]


def compile_reshape(
    add: tuple[AddEntry, ...] | None,
    drop: tuple[str, ...] | None,
    rename: str | Mapping[str, str] | None,
) -> Reshaper | None:
    """`add_fields`, then `drop_fields`, then `rename_keys`, as one function of a record (a
    dict) and the scope of its response; None when there is nothing to do."""
    stages: list[Reshape] = []
    if drop:
        stages.append(compile_drop(drop))
    if rename:
        stages.append(compile_rename(rename))
    adder = _compile_adder(add) if add else None
    if adder is None and not stages:
        return None
    if adder is not None and not stages:
        return adder
    if adder is None and len(stages) == 1:
        only = stages[0]

        def one(record: dict[str, Any], _scope: Mapping[str, Any]) -> dict[str, Any]:
            return only(record)

        return one

    def reshape(record: dict[str, Any], scope: Mapping[str, Any]) -> dict[str, Any]:
        if adder is not None:
            record = adder(record, scope)
        for stage in stages:
            record = stage(record)
        return record

    return reshape


def _compile_adder(add: tuple[AddEntry, ...]) -> Reshaper:
    if all("." not in name and not reads_scope for name, _, reads_scope in add):
        # The common case, kept to a dict copy and one call per field.
        searches = tuple((name, fn) for name, fn, _ in add)

        def add_on_record(record: dict[str, Any], _scope: Mapping[str, Any]) -> dict[str, Any]:
            out = dict(record)
            for name, search in searches:
                out[name] = search(record)
            return out

        return add_on_record
    setter = compile_add(tuple((name, fn) for name, fn, _ in add))
    table = {name: (fn, reads_scope) for name, fn, reads_scope in add}
    any_scope = any(reads_scope for _, _, reads_scope in add)

    def add_any(record: dict[str, Any], scope: Mapping[str, Any]) -> dict[str, Any]:
        tscope: dict[str, Any] | None = None
        if any_scope:
            tscope = dict(scope)
            tscope["record"] = record

        def value_of(name: str) -> Any:
            fn, reads_scope = table[name]
            return fn(tscope if reads_scope else record)

        return setter(record, value_of)

    return add_any
