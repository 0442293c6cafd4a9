"""What rendering a template needs on both of its paths, the fast one of `templates` and
Jinja's in `sandbox`: the template modes, JSON and path finalizers, the project's filters and
globals, and renderers of literal text and lookups over plain data. Both import it; neither
imports the other at the top, and this module imports neither."""

from __future__ import annotations

import base64
import contextlib
import contextvars
import hashlib
import hmac
import json
import sys
import uuid
from collections.abc import Callable, Iterator, KeysView, Mapping, Set, ValuesView
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote

from runner.clock import current as current_clock
from runner.expressions import format_datetime, to_epoch
from runner.timeutil import parse_datetime_text, windows

if TYPE_CHECKING:
    from markupsafe import Markup

Mode = Literal["value", "text", "path"]
MODES = ("value", "text", "path")
Renderer = Callable[[Mapping[str, Any]], Any]
# Static reads of the scope as (root name, first key): `env.URL` -> ("env", "URL").
Reads = frozenset[tuple[str, str]]
# Literal text, and lookups as (root name, keys): `/items/{{ item.id }}`.
Parts = list[str | tuple[str, tuple[str | int, ...]]]


def is_undefined(value: Any) -> bool:
    """A Jinja undefined value (none can exist before Jinja is imported)."""
    jinja2 = sys.modules.get("jinja2")
    return jinja2 is not None and isinstance(value, jinja2.Undefined)


# --- JSON rendering of non-strings ---------------------------------------------------------


def _json_default(value: Any) -> Any:
    if is_undefined(value):
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
    if is_undefined(value):
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
    if is_undefined(value):
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


def filter_parse_datetime(value: Any, fmt: str) -> str:
    """Text read with a strftime format (or RFC 2822), as ISO 8601 UTC with `Z`; as a filter
    or a function. `{{ "Tue, 03 Dec 2024 10:00:00 GMT" | parse_datetime("%a, %d %b %Y
    %H:%M:%S %z") }}` -> `2024-12-03T10:00:00Z`"""
    return parse_datetime_text(value, fmt)


def global_windows(start: Any, end: Any, step: Any) -> list[dict[str, Any]]:
    """Half-open `{start, end}` windows of `step` (ISO 8601 duration) from `start` to `end`
    (null: now). `{{ windows("2024-01-01", "2024-03-01", "P1M") }}` ->
    `[{"start": "2024-01-01", "end": "2024-02-01"}, {"start": "2024-02-01", "end":
    "2024-03-01"}]`"""
    return windows(start, end, step)


def filter_raw(value: Any) -> RawPath:
    """Marks a value as already a path: placed in `path` without percent-encoding.

    `path: "/files/{{ item.path | raw }}"` with `a/b.txt` -> `/files/a/b.txt`
    """
    if value is None:
        raise _NullInPath("null value in path")
    return RawPath(_as_text(value))


def global_now() -> str:
    """The current time, ISO 8601 UTC with `Z`, to the second: `2024-05-01T12:00:00Z`.

    Read from the run's clock (runner/clock.py): compiled templates are shared by runs."""
    return current_clock().now().strftime("%Y-%m-%dT%H:%M:%SZ")


# Where `uuid4()` draws from; `runner test` sets one derived from the case and a counter.
_UUID4: contextvars.ContextVar[Callable[[], str] | None] = contextvars.ContextVar(
    "runner_uuid4", default=None
)


def global_uuid4() -> str:
    """A random UUID: `{{ uuid4() }}` -> `5f0c...-...`."""
    source = _UUID4.get()
    return source() if source is not None else str(uuid.uuid4())


@contextlib.contextmanager
def using_uuid4(source: Callable[[], str]) -> Iterator[None]:
    """`uuid4()` in this context (and the tasks made inside it) returns `source()`."""
    token = _UUID4.set(source)
    try:
        yield
    finally:
        _UUID4.reset(token)


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
    "parse_datetime": filter_parse_datetime,
    "raw": filter_raw,
}
GLOBALS: dict[str, Callable[..., Any]] = {
    "now": global_now,
    "uuid4": global_uuid4,
    "windows": global_windows,
    "parse_datetime": filter_parse_datetime,
}


PLAIN_TYPES = frozenset({str, int, float, bool, list, dict, type(None)})


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
    if is_undefined(value):
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
    if is_undefined(value):
        value._fail_with_undefined_error()
    if isinstance(value, list | tuple):
        for item in value:
            check_defined(item)
    elif isinstance(value, dict):
        for item in value.values():
            check_defined(item)
