"""The Jinja side of templates: the sandboxed environments, and compiling with Jinja what the
fast path of `templates` does not cover. Imported on first need: a flow whose templates are
all plain lookups (`{{ env.URL }}`, `/items/{{ item.id }}`) never loads Jinja."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jinja2
from jinja2 import meta, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from runner.errors import ExpressionError
from runner.templates import (
    FILTERS,
    GLOBALS,
    PLAIN_TYPES,
    Mode,
    Parts,
    Renderer,
    check_defined,
    finalize_json,
    finalize_path,
    lookup_renderer,
    parts_renderer,
    plain,
)


class _Environment(ImmutableSandboxedEnvironment):
    """The sandbox, where `body.items` reads the key `items` of a mapping, not `dict.items`."""

    def getattr(self, obj: Any, attribute: str) -> Any:
        if type(obj) is dict or isinstance(obj, Mapping):
            try:
                return obj[attribute]
            except (KeyError, TypeError):
                pass
        return super().getattr(obj, attribute)


def _make_environment(finalize: Callable[[Any], Any], autoescape: bool) -> _Environment:
    env = _Environment(
        undefined=jinja2.StrictUndefined,
        autoescape=autoescape,
        finalize=finalize,
        keep_trailing_newline=True,
    )
    env.filters.update(FILTERS)
    env.globals.update(GLOBALS)
    return env


_ENV = _make_environment(finalize_json, autoescape=False)
_ENV_ESCAPE = _make_environment(finalize_json, autoescape=True)
_ENV_PATH = _make_environment(finalize_path, autoescape=False)
_GLOBAL_NAMES = frozenset(_ENV.globals)


def environment(mode: Mode, autoescape: bool) -> _Environment:
    if mode == "path":
        return _ENV_PATH
    return _ENV_ESCAPE if autoescape else _ENV


def compile_jinja(
    source: str, mode: Mode, autoescape: bool
) -> tuple[frozenset[str], frozenset[str], Renderer]:
    """The root names read, the `steps.<id>` read, and the renderer of a template; raises
    ExpressionError on a syntax error, an unknown filter or test."""
    env = environment(mode, autoescape)
    try:
        tree = env.parse(source)
        names = frozenset(meta.find_undeclared_variables(tree)) - _GLOBAL_NAMES
        step_refs = frozenset(_step_refs(tree))
        expr = _lone_expression(tree) if mode == "value" else None
        fn = _compile_expression(env, expr) if expr is not None else _compile_text(env, tree)
    except jinja2.TemplateSyntaxError as exc:
        raise ExpressionError(_syntax_message(source, exc)) from exc
    return names, step_refs, fn


def _syntax_message(source: str, exc: jinja2.TemplateSyntaxError) -> str:
    lines = source.splitlines()
    lineno = exc.lineno or 1
    shown = lines[lineno - 1].strip() if 0 < lineno <= len(lines) else source
    if len(shown) > 200:
        shown = shown[:200] + "..."
    return f"Jinja: {exc.message} (line {lineno}): {shown}"


def _step_refs(tree: nodes.Template) -> set[str]:
    refs = set()
    for attr in tree.find_all(nodes.Getattr):
        if isinstance(attr.node, nodes.Name) and attr.node.name == "steps":
            refs.add(attr.attr)
    for item in tree.find_all(nodes.Getitem):
        if (
            isinstance(item.node, nodes.Name)
            and item.node.name == "steps"
            and isinstance(item.arg, nodes.Const)
            and isinstance(item.arg.value, str)
        ):
            refs.add(item.arg.value)
    return refs


def _lone_expression(tree: nodes.Template) -> nodes.Expr | None:
    """The expression of a template that is exactly one `{{ expr }}`, whitespace around."""
    if len(tree.body) != 1 or not isinstance(tree.body[0], nodes.Output):
        return None
    found: nodes.Expr | None = None
    for child in tree.body[0].nodes:
        if isinstance(child, nodes.TemplateData):
            if child.data.strip():
                return None
        elif found is not None:
            return None
        else:
            found = child
    return found


def _compile_text(env: _Environment, tree: nodes.Template) -> Renderer:
    template = env.from_string(tree)
    root = template.root_render_func
    new_context = template.new_context
    globals_ = dict(template.globals)
    join = "".join

    def render_text(scope: Mapping[str, Any]) -> str:
        # Template.render would copy the scope through a slow ChainMap of globals and rewrite
        # tracebacks; we merge into one dict ourselves and convert errors anyway.
        return join(root(new_context({**globals_, **scope}, True)))

    parts = None if env.autoescape else _text_parts(tree)
    if parts is None:
        return render_text
    assert env.finalize is not None
    return parts_renderer(parts, env.finalize, lambda: render_text)


def _text_parts(tree: nodes.Template) -> Parts | None:
    """A template made only of literal text and `{{ name.key[0] }}` lookups, as its parts;
    None for anything else (filters, calls, tests, blocks, ...)."""
    parts: Parts = []
    for node in tree.body:
        if not isinstance(node, nodes.Output):
            return None
        for child in node.nodes:
            if isinstance(child, nodes.TemplateData):
                parts.append(child.data)
                continue
            chain = _lookup_chain(child)
            if chain is None:
                return None
            parts.append(chain)
    return parts


def _compile_expression(env: _Environment, expr: nodes.Expr) -> Renderer:
    """Like Environment.compile_expression, from the parsed node, keeping the value's type."""
    body: list[nodes.Node] = [nodes.Assign(nodes.Name("result", "store"), expr, lineno=1)]
    template = env.from_string(nodes.Template(body, lineno=1))
    root = template.root_render_func
    new_context = template.new_context
    globals_ = dict(template.globals)
    # Only a literal list or dict (or a call's result) can hold an undefined value unnoticed.
    holders = (nodes.List, nodes.Dict, nodes.Tuple, nodes.Call)
    deep = isinstance(expr, holders) or next(expr.find_all(holders), None) is not None

    def render_value(scope: Mapping[str, Any]) -> Any:
        context = new_context({**globals_, **scope}, True)
        for _ in root(context):
            pass
        value = context.vars["result"]
        if type(value) not in PLAIN_TYPES:
            value = plain(value)
        if deep:
            check_defined(value)
        return value

    chain = _lookup_chain(expr)
    if chain is None:
        return render_value
    return lookup_renderer(*chain, lambda: render_value)


def _lookup_chain(expr: nodes.Expr) -> tuple[str, tuple[str | int, ...]] | None:
    """`item.a['b'][0]` as ("item", ("a", "b", 0)); None for any other expression."""
    keys: list[str | int] = []
    node = expr
    while True:
        if isinstance(node, nodes.Getattr):
            keys.append(node.attr)
            node = node.node
        elif (
            isinstance(node, nodes.Getitem)
            and isinstance(node.arg, nodes.Const)
            and type(node.arg.value) in (str, int)
        ):
            keys.append(node.arg.value)
            node = node.node
        elif isinstance(node, nodes.Name) and node.ctx == "load":
            return node.name, tuple(reversed(keys))
        else:
            return None
