"""Templates: typed single expressions, JSON rendering of non-strings, percent-encoded path
values. Compile once, render many times (the filters and finalizers are in `rendering`).

Literal text with `{{ name.key[0] }}` lookups is parsed and rendered here, without Jinja;
anything else, and any lookup that misses, goes to the sandboxed Jinja of `sandbox`."""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from runner.errors import ExpressionError, RenderError
from runner.rendering import (
    GLOBALS,
    MODES,
    Mode,
    Parts,
    RawPath,
    Reads,
    Renderer,
    finalize_json,
    finalize_path,
    lookup_renderer,
    parts_renderer,
)

__all__ = [
    "CompiledValue",
    "Mode",
    "RawPath",
    "Template",
    "compile_template",
    "compile_value",
    "is_template",
]


def is_template(source: str) -> bool:
    """Whether a string holds Jinja syntax (`{{`, `{%` or `{#`)."""
    return "{{" in source or "{%" in source or "{#" in source


# --- compiled templates --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Template:
    """A compiled template. `render` raises RenderError, never a Jinja error."""

    source: str
    names: frozenset[str]  # root scope names read, for validate
    step_refs: frozenset[str]  # ids read as steps.<id> or steps['<id>']
    is_constant: bool  # no template syntax: render returns `source`
    _fn: Callable[[Mapping[str, Any]], Any] | None = field(default=None, repr=False, compare=False)
    # Text and lookups only: the result depends on the scope alone (no `now()`, no
    # `uuid4()`), so the same scope values give the same text.
    lookups_only: bool = False
    # `name.key` read statically, as (name, key); and those the template guards (`default`,
    # `is defined`), which may be missing.
    reads: Reads = frozenset()
    guarded_reads: Reads = frozenset()

    def render(self, scope: Mapping[str, Any]) -> Any:
        if self._fn is None:
            return self.source
        try:
            return self._fn(scope)
        except Exception as exc:
            raise RenderError(f"template error in {self.source!r}: {_describe(exc)}") from exc


def _describe(exc: Exception) -> str:
    jinja2 = sys.modules.get("jinja2")
    worded = (ValueError,) if jinja2 is None else (ValueError, jinja2.TemplateError)
    if isinstance(exc, worded) and str(exc):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def compile_template(source: str, mode: Mode = "value", autoescape: bool = False) -> Template:
    """Compile `source` once (cached). Mode `value` gives a lone `{{ expr }}` its own type;
    `text` always gives a string; `path` percent-encodes every value as a path segment.
    Raises ExpressionError on a syntax error, an unknown filter or test."""
    if not isinstance(source, str):
        raise ExpressionError(f"Jinja: expected a string template, got {source!r}")
    return _compile_template(source, mode, autoescape)


# A typed front for the cache: lru_cache's wrapper would hide the signature from mypy.
@functools.lru_cache(maxsize=8192)
def _compile_template(source: str, mode: Mode, autoescape: bool) -> Template:
    if mode not in MODES:
        raise ValueError(f"unknown template mode {mode!r}")
    if not is_template(source):
        return Template(source, frozenset(), frozenset(), True, lookups_only=True)
    if mode == "path" and autoescape:
        raise ValueError("autoescape applies to text templates only")
    parts = None if autoescape else simple_parts(source)
    if parts is not None:
        return _simple_template(source, mode, parts)
    from runner.sandbox import compile_jinja

    names, step_refs, fn, reads, guarded = compile_jinja(source, mode, autoescape)
    return Template(source, names, step_refs, False, fn, reads=reads, guarded_reads=guarded)


# --- the fast path: literal text and lookups, without Jinja ----------------------------------

# Jinja's own globals and ours: a lookup rooted at one of them goes to Jinja.
_JINJA_GLOBALS = frozenset({"range", "dict", "lipsum", "cycler", "joiner", "namespace"})
# Words Jinja reads as constants, operators or its own template (`self`), not as names.
_JINJA_WORDS = frozenset(
    {"true", "false", "none", "True", "False", "None", "and", "or", "not", "in", "is", "if",
     "else", "self"}
)  # fmt: skip
_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_KEY = rf"""\.{_NAME}|\[(?:0|[1-9][0-9]*)\]|\['[^'\\\r\n]*'\]|\["[^"\\\r\n]*"\]"""
_LOOKUP = re.compile(rf"\{{\{{\s*({_NAME}(?:{_KEY})*)\s*\}}\}}")
_KEY_PARTS = re.compile(
    rf"""\.({_NAME})|\[(0|[1-9][0-9]*)\]|\['([^'\\\r\n]*)'\]|\["([^"\\\r\n]*)"\]"""
)
_ROOT = re.compile(_NAME)
_NEWLINES = re.compile(r"\r\n|\r")


def simple_parts(source: str) -> Parts | None:
    """`source` as literal text and `{{ name.key['k'][0] }}` lookups, exactly as Jinja parses
    it; None for anything else (filters, operators, calls, blocks, comments, whitespace
    control, Jinja's constants and globals)."""
    if "{%" in source or "{#" in source:
        return None
    parts: Parts = []
    position = 0
    for match in _LOOKUP.finditer(source):
        if source.find("{{", position) != match.start():
            return None  # a `{{` the pattern did not take, before this one
        if match.start() > position:
            parts.append(_NEWLINES.sub("\n", source[position : match.start()]))
        lookup = _lookup(match.group(1))
        if lookup is None:
            return None
        parts.append(lookup)
        position = match.end()
    if "{{" in source[position:]:
        return None
    if position < len(source):
        parts.append(_NEWLINES.sub("\n", source[position:]))
    return parts


def _lookup(text: str) -> tuple[str, tuple[str | int, ...]] | None:
    root = _ROOT.match(text)
    assert root is not None
    name = root.group()
    if name in _JINJA_WORDS or name in _JINJA_GLOBALS or name in GLOBALS:
        return None
    keys: list[str | int] = []
    for attr, index, single, double in _KEY_PARTS.findall(text, root.end()):
        if attr:
            if attr in _JINJA_WORDS:
                return None
            keys.append(attr)
        elif index:
            keys.append(int(index))
        else:
            keys.append(single or double)
    return name, tuple(keys)


def _simple_template(source: str, mode: Mode, parts: Parts) -> Template:
    lookups = [p for p in parts if not isinstance(p, str)]
    names = frozenset(name for name, _ in lookups)
    step_refs = frozenset(
        keys[0] for name, keys in lookups if name == "steps" and keys and isinstance(keys[0], str)
    )
    reads = frozenset(
        (name, keys[0]) for name, keys in lookups if keys and isinstance(keys[0], str)
    )
    fallback = functools.partial(_jinja_renderer, source, mode)
    lone = mode == "value" and len(lookups) == 1
    if lone and all(p.strip() == "" for p in parts if isinstance(p, str)):
        fn = lookup_renderer(*lookups[0], fallback)
    else:
        fn = parts_renderer(parts, finalize_path if mode == "path" else finalize_json, fallback)
    return Template(source, names, step_refs, False, fn, lookups_only=True, reads=reads)


def _jinja_renderer(source: str, mode: Mode) -> Renderer:
    from runner.sandbox import compile_jinja

    return compile_jinja(source, mode, False)[2]


# --- structures of templates ---------------------------------------------------------------

_Renderer = Callable[[Mapping[str, Any]], Any]


class CompiledValue:
    """A dict/list/scalar structure whose string leaves are templates.

    `render(scope)` returns the same structure rendered; a structure with no template
    returns the original object itself (callers must not mutate it). Dict keys are not
    rendered.
    """

    __slots__ = ("_fn", "is_constant", "names", "source", "step_refs")

    def __init__(
        self,
        source: Any,
        fn: _Renderer | None,
        names: frozenset[str],
        step_refs: frozenset[str],
    ) -> None:
        self.source = source
        self._fn = fn
        self.is_constant = fn is None
        self.names = names
        self.step_refs = step_refs

    def render(self, scope: Mapping[str, Any]) -> Any:
        if self._fn is None:
            return self.source
        return self._fn(scope)

    def __repr__(self) -> str:
        return f"CompiledValue({self.source!r})"


def compile_value(
    value: Any,
    mode: Mode = "value",
    compile_leaf: Callable[[str, Mode], Template] | None = None,
) -> CompiledValue:
    """Compile every string leaf of `value` as a template (ExpressionError on bad syntax).
    `compile_leaf` gives a leaf's template (the compile pass passes the ones it compiled)."""
    templates: list[Template] = []
    fn = _compile_node(value, mode, templates, compile_leaf or compile_template)
    names: frozenset[str] = frozenset().union(*(t.names for t in templates))
    step_refs: frozenset[str] = frozenset().union(*(t.step_refs for t in templates))
    return CompiledValue(value, fn, names, step_refs)


def _compile_node(
    value: Any, mode: Mode, templates: list[Template], compile_leaf: Callable[[str, Mode], Template]
) -> _Renderer | None:
    """A renderer for `value`, or None when it is constant."""
    if isinstance(value, str):
        template = compile_leaf(value, mode)
        if template.is_constant:
            return None
        templates.append(template)
        return template.render
    if isinstance(value, dict):
        entries = [
            (k, v, _compile_node(v, mode, templates, compile_leaf)) for k, v in value.items()
        ]
        if all(f is None for _, _, f in entries):
            return None

        def render_dict(scope: Mapping[str, Any]) -> dict[Any, Any]:
            return {k: v if f is None else f(scope) for k, v, f in entries}

        return render_dict
    if isinstance(value, list | tuple):
        items = [(v, _compile_node(v, mode, templates, compile_leaf)) for v in value]
        if all(f is None for _, f in items):
            return None

        def render_list(scope: Mapping[str, Any]) -> list[Any]:
            return [v if f is None else f(scope) for v, f in items]

        return render_list
    return None
