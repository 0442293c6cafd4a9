"""The Jinja side of templates: the sandboxed environments, and compiling with Jinja what the
fast path of `templates` does not cover. Imported on first need: a flow whose templates are
all plain lookups (`{{ env.URL }}`, `/items/{{ item.id }}`) never loads Jinja."""

from __future__ import annotations

import functools
import operator
import re
import string
import types
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jinja2
from jinja2 import filters as jinja_filters
from jinja2 import meta, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import generate_lorem_ipsum

from runner.errors import ExpressionError
from runner.expressions import MAX_NESTING
from runner.rendering import (
    FILTERS,
    GLOBALS,
    PLAIN_TYPES,
    Mode,
    Parts,
    Reads,
    Renderer,
    check_defined,
    finalize_json,
    finalize_path,
    lookup_renderer,
    parts_renderer,
    plain,
)

# -- size caps ------------------------------------------------------------------------------
# A template may build a string or list of at most this many characters or items in one
# operation (`*`, padding, widths in `%` and `format`, `join`, `replace`, `indent`, ...).
MAX_SIZE = 16 * 1024 * 1024
# An integer result of `*` or `**` of at most this many bits (about 30,000 digits).
MAX_INT_BITS = 100_000
# A text template renders to at most this many characters (loops inside loops).
MAX_RENDERED_CHARS = 64 * 1024 * 1024
# lipsum(n, html, min, max): at most this many paragraphs and words per paragraph.
MAX_LIPSUM_PARAGRAPHS = 100
MAX_LIPSUM_WORDS = 1000
# A width or precision in a `%` or `{}` format spec.
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
_DIGITS = re.compile(r"\d+")


class SizeLimitError(ValueError):
    """A template operation that would build a value past the sandbox's caps."""


def _check_size(size: int, what: str) -> None:
    if size > MAX_SIZE:
        raise SizeLimitError(f"{what} would be {size} long, more than the limit of {MAX_SIZE}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_multiply(left: Any, right: Any) -> None:
    if isinstance(left, str | list | tuple) and _is_int(right):
        _check_size(len(left) * right, "a repeated string or list")
    elif isinstance(right, str | list | tuple) and _is_int(left):
        _check_size(len(right) * left, "a repeated string or list")
    elif _is_int(left) and _is_int(right) and left.bit_length() + right.bit_length() > MAX_INT_BITS:
        raise SizeLimitError(f"an integer of more than {MAX_INT_BITS} bits")


def _check_power(left: Any, right: Any) -> None:
    if not (_is_int(left) and _is_int(right) and right > 0 and abs(left) > 1):
        return
    if left.bit_length() * min(right, MAX_INT_BITS + 1) > MAX_INT_BITS:
        raise SizeLimitError(f"an integer of more than {MAX_INT_BITS} bits")


def _ints(values: Any) -> Iterable[int]:
    if isinstance(values, tuple | list):
        return (v for v in values if _is_int(v))
    if isinstance(values, Mapping):
        return (v for v in values.values() if _is_int(v))
    return (values,) if _is_int(values) else ()


def _check_percent_format(fmt: str, args: Any) -> None:
    """`'%*s' % (10**9, 'a')`, `'%1000000000d' % 1`: widths and precisions within the cap."""
    starred = False
    for match in _PERCENT_SPEC.finditer(fmt):
        for number in match.groups():
            if number == "*":
                starred = True
            elif number is not None:
                _check_size(int(number), "a width or precision in a % format")
    if starred:
        for value in _ints(args):
            _check_size(abs(value), "a width or precision in a % format")


def _check_brace_format(fmt: str, args: Iterable[Any], kwargs: Mapping[str, Any]) -> None:
    """`'{:>1000000000}'.format(x)` and nested widths `'{:>{}}'.format(x, 10**9)`."""
    try:
        parsed = list(string.Formatter().parse(fmt))
    except ValueError:
        return  # the formatter itself reports it
    nested = False
    for _, _, spec, _ in parsed:
        if not spec:
            continue
        nested = nested or "{" in spec
        for number in _DIGITS.findall(spec):
            _check_size(int(number), "a width or precision in a format")
    if nested:
        for value in (*_ints(list(args)), *_ints(dict(kwargs))):
            _check_size(abs(value), "a width or precision in a format")


def _check_join(separator: str, items: list[Any]) -> None:
    size = len(separator) * max(0, len(items) - 1)
    size += sum(len(i) if isinstance(i, str) else 20 for i in items)
    _check_size(size, "a joined string")


def _check_replace(text: str, old: str, new: str, count: Any) -> None:
    found = len(text) + 1 if old == "" else text.count(old)
    if _is_int(count) and count >= 0:
        found = min(found, count)
    _check_size(len(text) + found * max(0, len(new) - len(old)), "a replaced string")


def _checked_method(obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Checks a call of a str method that can grow its string; returns the arguments to use
    (a generator given to join is read once, here)."""
    text = obj.__self__
    name = obj.__name__
    if name in ("center", "ljust", "rjust", "zfill"):
        width = args[0] if args else kwargs.get("width", 0)
        if _is_int(width):
            _check_size(width, f"str.{name}()")
    elif name == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        if _is_int(size):
            _check_size(len(text) * max(1, size), "str.expandtabs()")
    elif name == "replace" and len(args) >= 2:
        old, new = args[0], args[1]
        count = args[2] if len(args) > 2 else kwargs.get("count", -1)
        if isinstance(old, str) and isinstance(new, str):
            _check_replace(text, old, new, count)
    elif name == "join" and args:
        items = list(args[0])
        _check_join(text, items)
        return (items, *args[1:])
    return args


_GROWING_METHODS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs", "replace", "join"})


def _capped_filters() -> dict[str, Callable[..., Any]]:
    """Jinja's filters that can grow a value, with the same checks as the operators."""

    @functools.wraps(jinja_filters.do_center)
    def center(value: Any, width: int = 80) -> str:
        if _is_int(width):
            _check_size(width, "center")
        return jinja_filters.do_center(value, width)

    @functools.wraps(jinja_filters.do_indent)
    def indent(s: Any, width: int | str = 4, first: bool = False, blank: bool = False) -> str:
        text = str(s)
        pad = width if _is_int(width) else len(str(width))
        assert isinstance(pad, int)
        _check_size(len(text) + (text.count("\n") + 1) * pad, "indent")
        return jinja_filters.do_indent(s, width, first, blank)

    @functools.wraps(jinja_filters.do_format)
    def format_(value: Any, *args: Any, **kwargs: Any) -> str:
        _check_percent_format(str(value), kwargs or args)
        return jinja_filters.do_format(value, *args, **kwargs)

    @functools.wraps(jinja_filters.do_join)
    def join(eval_ctx: Any, value: Any, d: str = "", attribute: Any = None) -> str:
        items = list(value)
        if attribute is None:
            _check_join(str(d), items)
        return str(jinja_filters.do_join(eval_ctx, items, d, attribute))

    @functools.wraps(jinja_filters.do_replace)
    def replace(eval_ctx: Any, s: Any, old: Any, new: Any, count: Any = None) -> str:
        _check_replace(str(s), str(old), str(new), count)
        return jinja_filters.do_replace(eval_ctx, s, old, new, count)

    @functools.wraps(jinja_filters.do_wordwrap)
    def wordwrap(environment: Any, s: Any, width: int = 79, *args: Any, **kwargs: Any) -> str:
        text = str(s)
        wrap = kwargs.get("wrapstring", args[1] if len(args) > 1 else None)
        lines = len(text) // max(1, width if _is_int(width) else 1) + text.count("\n") + 1
        _check_size(len(text) + lines * len(str(wrap or "\n")), "wordwrap")
        return jinja_filters.do_wordwrap(environment, s, width, *args, **kwargs)

    @functools.wraps(jinja_filters.do_batch)
    def batch(value: Any, linecount: int, fill_with: Any = None) -> Any:
        if _is_int(linecount):
            _check_size(linecount, "batch")
        return jinja_filters.do_batch(value, linecount, fill_with)

    @functools.wraps(jinja_filters.do_slice)
    def slice_(eval_ctx: Any, value: Any, slices: int, fill_with: Any = None) -> Any:
        if _is_int(slices):
            _check_size(slices, "slice")
        return jinja_filters.do_slice(eval_ctx, value, slices, fill_with)

    return {
        "center": center,
        "indent": indent,
        "format": format_,
        "join": join,
        "replace": replace,
        "wordwrap": wordwrap,
        "batch": batch,
        "slice": slice_,
    }


def lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
    """Jinja's `lipsum`, with at most MAX_LIPSUM_PARAGRAPHS paragraphs of MAX_LIPSUM_WORDS."""
    if not all(_is_int(v) for v in (n, min, max)):
        raise SizeLimitError("lipsum takes integers")
    if n > MAX_LIPSUM_PARAGRAPHS or max > MAX_LIPSUM_WORDS or min > MAX_LIPSUM_WORDS:
        raise SizeLimitError(
            f"lipsum is limited to {MAX_LIPSUM_PARAGRAPHS} paragraphs of {MAX_LIPSUM_WORDS} words"
        )
    return str(generate_lorem_ipsum(n, html, min, max))


class _Environment(ImmutableSandboxedEnvironment):
    """The sandbox, where `body.items` reads the key `items` of a mapping, not `dict.items`,
    and where no operation builds a value past the size caps above."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def getattr(self, obj: Any, attribute: str) -> Any:
        if type(obj) is dict or isinstance(obj, Mapping):
            try:
                return obj[attribute]
            except (KeyError, TypeError):
                pass
        return super().getattr(obj, attribute)

    def call_binop(self, context: Any, operator_: str, left: Any, right: Any) -> Any:
        if operator_ == "*":
            _check_multiply(left, right)
            return operator.mul(left, right)
        if operator_ == "**":
            _check_power(left, right)
            return operator.pow(left, right)
        if operator_ == "%" and isinstance(left, str):
            _check_percent_format(left, right)
        return super().call_binop(context, operator_, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        if (
            isinstance(__obj, types.BuiltinMethodType)
            and isinstance(getattr(__obj, "__self__", None), str)
            and __obj.__name__ in _GROWING_METHODS
        ):
            args = _checked_method(__obj, args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt = value.__self__
        is_map = value.__name__ == "format_map"

        def checked(*args: Any, **kwargs: Any) -> str:
            if is_map:
                mapping = args[0] if args and isinstance(args[0], Mapping) else {}
                _check_brace_format(fmt, (), mapping)
            else:
                _check_brace_format(fmt, args, kwargs)
            assert wrapped is not None
            return wrapped(*args, **kwargs)

        return checked


def _make_environment(finalize: Callable[[Any], Any], autoescape: bool) -> _Environment:
    env = _Environment(
        undefined=jinja2.StrictUndefined,
        autoescape=autoescape,
        finalize=finalize,
        keep_trailing_newline=True,
    )
    env.filters.update(_capped_filters())
    env.filters.update(FILTERS)
    env.globals.update(GLOBALS)
    env.globals["lipsum"] = lipsum
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
) -> tuple[frozenset[str], frozenset[str], Renderer, Reads, Reads]:
    """The root names read, the `steps.<id>` read, the renderer of a template, its static
    reads (`env.X`, `inputs['y']`) and those of them it guards (`| default`, `is defined`);
    raises ExpressionError on a syntax error, an unknown filter or test."""
    env = environment(mode, autoescape)
    try:
        tree = env.parse(source)
        if _tree_depth(tree) > MAX_NESTING:
            raise RecursionError  # reported below, as when the parser itself ran out
        names = frozenset(meta.find_undeclared_variables(tree)) - _GLOBAL_NAMES
        step_refs = frozenset(_step_refs(tree))
        reads, guarded = _reads(tree)
        expr = _lone_expression(tree) if mode == "value" else None
        fn = _compile_expression(env, expr) if expr is not None else _compile_text(env, tree)
    except jinja2.TemplateSyntaxError as exc:
        raise ExpressionError(_syntax_message(source, exc), expression=source) from exc
    except RecursionError:
        raise ExpressionError(
            f"Jinja: the template is nested more than {MAX_NESTING} levels deep"
        ) from None
    return names, step_refs, fn, frozenset(reads), frozenset(guarded)


def is_lone_expression(source: str) -> bool:
    """Whether a template is exactly one `{{ expression }}` (white space around allowed)."""
    try:
        return _lone_expression(_ENV.parse(source)) is not None
    except jinja2.TemplateSyntaxError:
        return False  # its syntax error is reported where it is compiled


def _tree_depth(tree: nodes.Node) -> int:
    """The depth of a parsed template, measured without recursion."""
    deepest = 0
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > MAX_NESTING:
            return deepest
        stack.extend((child, depth + 1) for child in node.iter_child_nodes())
    return deepest


def _syntax_message(source: str, exc: jinja2.TemplateSyntaxError) -> str:
    lines = source.splitlines()
    lineno = exc.lineno or 1
    shown = lines[lineno - 1].strip() if 0 < lineno <= len(lines) else source
    if len(shown) > 200:
        shown = shown[:200] + "..."
    return f"Jinja: {exc.message} (line {lineno}): {shown}"


# Filters that give a value for a missing key: what they read may be missing.
_GUARD_FILTERS = frozenset({"default", "d"})


def _read(node: nodes.Node) -> tuple[str, str] | None:
    """`name.key` or `name['key']` on a name of the scope, as (name, key)."""
    if isinstance(node, nodes.Getattr) and isinstance(node.node, nodes.Name):
        return node.node.name, node.attr
    if (
        isinstance(node, nodes.Getitem)
        and isinstance(node.node, nodes.Name)
        and isinstance(node.arg, nodes.Const)
        and isinstance(node.arg.value, str)
    ):
        return node.node.name, node.arg.value
    return None


def _reads(tree: nodes.Template) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """The static reads of a template, and those it guards: under `default` or a test
    (`is defined`). A method called on a name (`env.get('X')`) is not a read."""
    reads: set[tuple[str, str]] = set()
    guarded: set[tuple[str, str]] = set()
    stack: list[tuple[nodes.Node, bool, nodes.Node | None]] = [(tree, False, None)]
    while stack:
        node, under_guard, parent = stack.pop()
        read = _read(node)
        if read is not None and not (isinstance(parent, nodes.Call) and parent.node is node):
            reads.add(read)
            if under_guard:
                guarded.add(read)
        guard = (
            under_guard
            or isinstance(node, nodes.Test)
            or (isinstance(node, nodes.Filter) and node.name in _GUARD_FILTERS)
        )
        stack.extend((child, guard, node) for child in node.iter_child_nodes())
    return reads, guarded


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
        pieces = []
        size = 0
        for piece in root(new_context({**globals_, **scope}, True)):
            size += len(piece)
            if size > MAX_RENDERED_CHARS:
                raise SizeLimitError(
                    f"the template renders to more than {MAX_RENDERED_CHARS} characters"
                )
            pieces.append(piece)
        return join(pieces)

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
