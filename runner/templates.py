"""Templates: typed single expressions, JSON rendering of non-strings, percent-encoded path
values, and the project's filters. Compile once, render many times.

Literal text with `{{ name.key[0] }}` lookups is parsed and rendered here, without Jinja;
anything else, and any lookup that misses, goes to the sandboxed Jinja of `sandbox`."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import re
import sys
import uuid
from collections.abc import Callable, Iterator, KeysView, Mapping, Set, ValuesView
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote

from runner.errors import ExpressionError, RenderError
from runner.expressions import format_datetime, to_epoch

if TYPE_CHECKING:
    from markupsafe import Markup

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
Renderer = Callable[[Mapping[str, Any]], Any]
# Literal text, and lookups as (root name, keys): `/items/{{ item.id }}`.
Parts = list[str | tuple[str, tuple[str | int, ...]]]


def _is_undefined(value: Any) -> bool:
    """A Jinja undefined value (none can exist before Jinja is imported)."""
    jinja2 = sys.modules.get("jinja2")
    return jinja2 is not None and isinstance(value, jinja2.Undefined)


def is_template(source: str) -> bool:
    """Whether a string holds Jinja syntax (`{{`, `{%` or `{#`)."""
    return "{{" in source or "{%" in source or "{#" in source


# --- JSON rendering of non-strings ---------------------------------------------------------


def _json_default(value: Any) -> Any:
    if _is_undefined(value):
        value._fail_with_undefined_error()
    if isinstance(value, Iterator | range | tuple | Set | KeysView | ValuesView):
        return list(value)
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"a value of type {type(value).__name__} cannot be rendered as JSON")


def _dumps(value: Any) -> str:
    """Compact JSON, keys in their order, nothing escaped."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=_json_default)


def finalize_json(value: Any) -> Any:
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
    if _is_undefined(value):
        # str() of a StrictUndefined raises the "is undefined" error we want.
        return value
    return _dumps(value)


class RawPath(str):
    """A string marked by the `raw` filter: placed in a path without percent-encoding."""

    __slots__ = ()


class _NullInPath(ValueError):
    pass


def finalize_path(value: Any) -> Any:
    """Every interpolated value is one path segment: only unreserved characters stay as is."""
    if type(value) is RawPath:
        return str.__str__(value)
    if value is None:
        raise _NullInPath("null value in path")
    if type(value) is int:
        return str(value)  # digits and "-": nothing to encode
    if _is_undefined(value):
        return value
    text = finalize_json(value)
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
    return str(finalize_json(value))


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
    from markupsafe import Markup

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


PLAIN_TYPES = frozenset({str, int, float, bool, list, dict, type(None)})


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
    if mode not in _MODES:
        raise ValueError(f"unknown template mode {mode!r}")
    if not is_template(source):
        return Template(source, frozenset(), frozenset(), True, lookups_only=True)
    if mode == "path" and autoescape:
        raise ValueError("autoescape applies to text templates only")
    parts = None if autoescape else simple_parts(source)
    if parts is not None:
        return _simple_template(source, mode, parts)
    from runner.sandbox import compile_jinja

    names, step_refs, fn = compile_jinja(source, mode, autoescape)
    return Template(source, names, step_refs, False, fn)


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
    fallback = functools.partial(_jinja_renderer, source, mode)
    lone = mode == "value" and len(lookups) == 1
    if lone and all(p.strip() == "" for p in parts if isinstance(p, str)):
        fn = lookup_renderer(*lookups[0], fallback)
    else:
        fn = parts_renderer(parts, finalize_path if mode == "path" else finalize_json, fallback)
    return Template(source, names, step_refs, False, fn, lookups_only=True)


def _jinja_renderer(source: str, mode: Mode) -> Renderer:
    from runner.sandbox import compile_jinja

    return compile_jinja(source, mode, False)[2]


def _compiled_on_first_call(compile_: Callable[[], Renderer]) -> Renderer:
    """A renderer that compiles itself (with Jinja) the first time it is needed."""
    compiled: list[Renderer] = []

    def render(scope: Mapping[str, Any]) -> Any:
        if not compiled:
            compiled.append(compile_())
        return compiled[0](scope)

    return render


def parts_renderer(
    parts: Parts, finalize: Callable[[Any], Any], fallback: Callable[[], Renderer]
) -> Renderer:
    """Renders literal text and lookups over plain dicts and lists; anything else (a miss,
    another type, a value finalize refuses) renders through `fallback()`, compiled on first
    need, which gives the same text or error."""
    render_slowly = _compiled_on_first_call(fallback)
    join = "".join

    def render_parts(scope: Mapping[str, Any]) -> Any:
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
                        return render_slowly(scope)
                if type(value) not in PLAIN_TYPES:
                    return render_slowly(scope)
                out.append(str(finalize(value)))
            except Exception:
                return render_slowly(scope)
        return join(out)

    return render_parts


def lookup_renderer(
    name: str, keys: tuple[str | int, ...], fallback: Callable[[], Renderer]
) -> Renderer:
    """`{{ item }}`, `{{ item.a[0] }}` as a value of its own type, over plain dicts and lists;
    anything else (a miss, another type) through `fallback()`, with the same value or error."""
    render_slowly = _compiled_on_first_call(fallback)

    def render_lookup(scope: Mapping[str, Any]) -> Any:
        try:
            value = scope[name]
            for key in keys:
                if type(value) is dict:  # noqa: SIM114 (split so that mypy narrows key to int)
                    value = value[key]
                elif type(value) is list and type(key) is int:
                    value = value[key]
                else:
                    return render_slowly(scope)
        except (KeyError, IndexError, TypeError):
            return render_slowly(scope)
        if type(value) not in PLAIN_TYPES:
            return render_slowly(scope)
        return value

    return render_lookup


def plain(value: Any) -> Any:
    """Undefined raises; str subclasses, tuples, generators and views become plain JSON types;
    anything that is not data (a function, a template object) is an error."""
    if _is_undefined(value):
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


def check_defined(value: Any) -> None:
    if _is_undefined(value):
        value._fail_with_undefined_error()
    if isinstance(value, list | tuple):
        for item in value:
            check_defined(item)
    elif isinstance(value, dict):
        for item in value.values():
            check_defined(item)


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
