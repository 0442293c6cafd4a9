"""The sandboxed Jinja environment: typed single expressions, JSON rendering of non-strings,
percent-encoded path values, and the project's filters. Compile once, render many times."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import uuid
from collections.abc import Callable, Iterator, KeysView, Mapping, Set, ValuesView
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import quote

import jinja2
from jinja2 import meta, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from markupsafe import Markup

from runner.errors import ExpressionError, RenderError
from runner.expressions import format_datetime, to_epoch

__all__ = [
    "CompiledValue",
    "Mode",
    "RawPath",
    "Template",
    "compile_template",
    "compile_value",
    "is_template",
]

Mode = Literal["value", "text", "path"]
_MODES = ("value", "text", "path")


def is_template(source: str) -> bool:
    """Whether a string holds Jinja syntax (`{{`, `{%` or `{#`)."""
    return "{{" in source or "{%" in source or "{#" in source


# --- JSON rendering of non-strings ---------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, jinja2.Undefined):
        value._fail_with_undefined_error()
    if isinstance(value, Iterator | range | tuple | Set | KeysView | ValuesView):
        return list(value)
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"a value of type {type(value).__name__} cannot be rendered as JSON")


def _dumps(value: Any) -> str:
    """Compact JSON, keys in their order, nothing escaped."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=_json_default)


def _finalize_json(value: Any) -> Any:
    """Strings as they are, everything else as JSON: `n={{ flag }}` gives `n=true`."""
    if isinstance(value, str):
        return value
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if type(value) is int:
        return str(value)
    if isinstance(value, jinja2.Undefined):
        # str() of a StrictUndefined raises the "is undefined" error we want.
        return value
    return _dumps(value)


class RawPath(str):
    """A string marked by the `raw` filter: placed in a path without percent-encoding."""

    __slots__ = ()


class _NullInPath(ValueError):
    pass


def _finalize_path(value: Any) -> Any:
    """Every interpolated value is one path segment: only unreserved characters stay as is."""
    if type(value) is RawPath:
        return str.__str__(value)
    if value is None:
        raise _NullInPath("null value in path")
    if type(value) is int:
        return str(value)  # digits and "-": nothing to encode
    if isinstance(value, jinja2.Undefined):
        return value
    text = _finalize_json(value)
    if type(text) is str and text.isascii() and text.isalnum():
        return text  # an id or a word: nothing to encode
    return quote(text, safe="")


# --- filters and globals -------------------------------------------------------------------


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8")
    # str() of an undefined value raises its "is undefined" error.
    return str(_finalize_json(value))


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    return _as_text(value).encode("utf-8")


def filter_tojson(value: Any) -> str:
    """Compact JSON that keeps key order and escapes nothing.

    `{{ {"b": 1, "a": "<x>"} | tojson }}` -> `{"b":1,"a":"<x>"}`
    """
    return _dumps(value)


def filter_b64encode(value: Any) -> str:
    """Base64 of a string's UTF-8 bytes. `{{ "user:pass" | b64encode }}` -> `dXNlcjpwYXNz`"""
    return base64.b64encode(_as_bytes(value)).decode("ascii")


def filter_b64decode(value: Any) -> str:
    """The UTF-8 text behind base64. `{{ "dXNlcjpwYXNz" | b64decode }}` -> `user:pass`"""
    return base64.b64decode(_as_bytes(value), validate=True).decode("utf-8")


def _quote_all(value: Any) -> str:
    return quote(_as_text(value), safe="")


def filter_urlencode(value: Any) -> str:
    """Percent-encodes everything but unreserved characters (`/` too); an object becomes a
    query string, where null omits the key and a list repeats it.

    `{{ "a/b c" | urlencode }}` -> `a%2Fb%20c`; `{{ {"q": "x y", "n": [1, 2]} | urlencode }}`
    -> `q=x%20y&n=1&n=2`
    """
    if isinstance(value, Mapping):
        parts = []
        for key, item in value.items():
            for one in item if isinstance(item, list | tuple) else (item,):
                if one is not None:
                    parts.append(f"{_quote_all(key)}={_quote_all(one)}")
        return "&".join(parts)
    return _quote_all(value)


def filter_sha256(value: Any) -> str:
    """Hex SHA-256 of the UTF-8 bytes. `{{ "abc" | sha256 }}` -> `ba7816bf...15ad`"""
    return hashlib.sha256(_as_bytes(value)).hexdigest()


def filter_hmac_sha256(value: Any, key: Any) -> str:
    """Hex HMAC-SHA-256 of the value under `key`.

    `{{ "GET\\n/v1/items" | hmac_sha256(secrets.SIGNING_KEY) }}`
    """
    return hmac.new(_as_bytes(key), _as_bytes(value), hashlib.sha256).hexdigest()


def filter_xml_escape(value: Any) -> Markup:
    """Escapes `& < > " '` for XML text and attributes. `{{ "a<b" | xml_escape }}` -> `a&lt;b`

    Marked safe, so an autoescaping body_file does not escape it twice.
    """
    text = (
        _as_text(value)
        .replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace('"', "&quot;")
        .replace("'", "&apos;")
    )
    return Markup(text)


def filter_to_epoch(value: Any) -> int:
    """Integer seconds since the epoch of an ISO 8601 datetime (`Z`, offset, or none = UTC)
    or a number. `{{ "2024-05-01T12:00:00Z" | to_epoch }}` -> `1714564800`"""
    return to_epoch(value)


def filter_format_datetime(value: Any, fmt: str = "%Y-%m-%dT%H:%M:%SZ") -> str:
    """An ISO 8601 datetime or an epoch number formatted with strftime, in UTC.

    `{{ 1714564800 | format_datetime("%Y-%m-%d") }}` -> `2024-05-01`
    """
    return format_datetime(value, fmt)


def filter_raw(value: Any) -> RawPath:
    """Marks a value as already a path: placed in `path` without percent-encoding.

    `path: "/files/{{ item.path | raw }}"` with `a/b.txt` -> `/files/a/b.txt`
    """
    if value is None:
        raise _NullInPath("null value in path")
    return RawPath(_as_text(value))


def global_now() -> str:
    """The current time, ISO 8601 UTC with `Z`, to the second: `2024-05-01T12:00:00Z`."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def global_uuid4() -> str:
    """A random UUID: `{{ uuid4() }}` -> `5f0c...-...`."""
    return str(uuid.uuid4())


FILTERS: dict[str, Callable[..., Any]] = {
    "tojson": filter_tojson,
    "b64encode": filter_b64encode,
    "b64decode": filter_b64decode,
    "urlencode": filter_urlencode,
    "sha256": filter_sha256,
    "hmac_sha256": filter_hmac_sha256,
    "xml_escape": filter_xml_escape,
    "to_epoch": filter_to_epoch,
    "format_datetime": filter_format_datetime,
    "raw": filter_raw,
}
GLOBALS: dict[str, Callable[..., Any]] = {"now": global_now, "uuid4": global_uuid4}


# --- the environments ----------------------------------------------------------------------


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


_ENV = _make_environment(_finalize_json, autoescape=False)
_ENV_ESCAPE = _make_environment(_finalize_json, autoescape=True)
_ENV_PATH = _make_environment(_finalize_path, autoescape=False)
_GLOBAL_NAMES = frozenset(_ENV.globals)

_PLAIN_TYPES = frozenset({str, int, float, bool, list, dict, type(None)})


# --- compiled templates --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Template:
    """A compiled template. `render` raises RenderError, never a Jinja error."""

    source: str
    names: frozenset[str]  # root scope names read, for validate
    step_refs: frozenset[str]  # ids read as steps.<id> or steps['<id>']
    is_constant: bool  # no template syntax: render returns `source`
    _fn: Callable[[Mapping[str, Any]], Any] | None = field(default=None, repr=False, compare=False)

    def render(self, scope: Mapping[str, Any]) -> Any:
        if self._fn is None:
            return self.source
        try:
            return self._fn(scope)
        except Exception as exc:
            raise RenderError(f"template error in {self.source!r}: {_describe(exc)}") from exc


def _describe(exc: Exception) -> str:
    if isinstance(exc, jinja2.TemplateError | ValueError) and str(exc):
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
    if mode not in _MODES:
        raise ValueError(f"unknown template mode {mode!r}")
    if not is_template(source):
        return Template(source, frozenset(), frozenset(), True)
    if mode == "path":
        if autoescape:
            raise ValueError("autoescape applies to text templates only")
        env = _ENV_PATH
    else:
        env = _ENV_ESCAPE if autoescape else _ENV
    try:
        tree = env.parse(source)
        names = frozenset(meta.find_undeclared_variables(tree)) - _GLOBAL_NAMES
        step_refs = frozenset(_step_refs(tree))
        expr = _lone_expression(tree) if mode == "value" else None
        fn = _compile_expression(env, expr) if expr is not None else _compile_text(env, tree)
    except jinja2.TemplateSyntaxError as exc:
        raise ExpressionError(_syntax_message(source, exc)) from exc
    return Template(source, names, step_refs, False, fn)


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


def _compile_text(env: _Environment, tree: nodes.Template) -> Callable[[Mapping[str, Any]], Any]:
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
    finalize = env.finalize
    assert finalize is not None

    def render_parts(scope: Mapping[str, Any]) -> str:
        # `/items/{{ item }}`, `Bearer {{ auth.api.access_token }}`: literal text and lookups
        # over plain dicts and lists need no Jinja. Anything else (a miss, another type, a
        # value finalize refuses) renders through Jinja, which gives the same text or error.
        out = []
        for part in parts:
            if isinstance(part, str):
                out.append(part)
                continue
            name, keys = part
            try:
                value = scope[name]
                for key in keys:
                    if type(value) is dict:  # noqa: SIM114 (split so that mypy narrows key)
                        value = value[key]
                    elif type(value) is list and type(key) is int:
                        value = value[key]
                    else:
                        return render_text(scope)
                if type(value) not in _PLAIN_TYPES:
                    return render_text(scope)
                out.append(str(finalize(value)))
            except Exception:
                return render_text(scope)
        return join(out)

    return render_parts


def _text_parts(tree: nodes.Template) -> list[str | tuple[str, tuple[str | int, ...]]] | None:
    """A template made only of literal text and `{{ name.key[0] }}` lookups, as its parts;
    None for anything else (filters, calls, tests, blocks, ...)."""
    parts: list[str | tuple[str, tuple[str | int, ...]]] = []
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


def _compile_expression(env: _Environment, expr: nodes.Expr) -> Callable[[Mapping[str, Any]], Any]:
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
        if type(value) not in _PLAIN_TYPES:
            value = _plain(value)
        if deep:
            _check_defined(value)
        return value

    chain = _lookup_chain(expr)
    if chain is None:
        return render_value
    name, keys = chain

    def render_lookup(scope: Mapping[str, Any]) -> Any:
        # `{{ item }}`, `{{ item.a[0] }}` over plain dicts and lists need no Jinja; anything
        # else (a miss, another type) takes the full path, which gives the same value or error.
        try:
            value = scope[name]
            for key in keys:
                if type(value) is dict:  # noqa: SIM114 (split so that mypy narrows key to int)
                    value = value[key]
                elif type(value) is list and type(key) is int:
                    value = value[key]
                else:
                    return render_value(scope)
        except (KeyError, IndexError, TypeError):
            return render_value(scope)
        if type(value) not in _PLAIN_TYPES:
            value = _plain(value)
        return value

    return render_lookup


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


def _plain(value: Any) -> Any:
    """Undefined raises; str subclasses, tuples, generators and views become plain JSON types;
    anything that is not data (a function, a template object) is an error."""
    if isinstance(value, jinja2.Undefined):
        value._fail_with_undefined_error()
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int | float):
        return value
    if isinstance(value, Iterator | range | tuple | Set | KeysView | ValuesView):
        return list(value)
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"a value of type {type(value).__name__} is not data")


def _check_defined(value: Any) -> None:
    if isinstance(value, jinja2.Undefined):
        value._fail_with_undefined_error()
    if isinstance(value, list | tuple):
        for item in value:
            _check_defined(item)
    elif isinstance(value, dict):
        for item in value.values():
            _check_defined(item)


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


def compile_value(value: Any, mode: Mode = "value") -> CompiledValue:
    """Compile every string leaf of `value` as a template (ExpressionError on bad syntax)."""
    templates: list[Template] = []
    fn = _compile_node(value, mode, templates)
    names: frozenset[str] = frozenset().union(*(t.names for t in templates))
    step_refs: frozenset[str] = frozenset().union(*(t.step_refs for t in templates))
    return CompiledValue(value, fn, names, step_refs)


def _compile_node(value: Any, mode: Mode, templates: list[Template]) -> _Renderer | None:
    """A renderer for `value`, or None when it is constant."""
    if isinstance(value, str):
        template = compile_template(value, mode)
        if template.is_constant:
            return None
        templates.append(template)
        return template.render
    if isinstance(value, dict):
        entries = [(k, v, _compile_node(v, mode, templates)) for k, v in value.items()]
        if all(f is None for _, _, f in entries):
            return None

        def render_dict(scope: Mapping[str, Any]) -> dict[Any, Any]:
            return {k: v if f is None else f(scope) for k, v, f in entries}

        return render_dict
    if isinstance(value, list | tuple):
        items = [(v, _compile_node(v, mode, templates)) for v in value]
        if all(f is None for _, f in items):
            return None

        def render_list(scope: Mapping[str, Any]) -> list[Any]:
            return [v if f is None else f(scope) for v, f in items]

        return render_list
    return None
