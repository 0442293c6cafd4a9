"""JMESPath with the project's extra functions: compiled once, plain field paths run without
the interpreter, every failure turned into ExpressionError (compile) or RenderError (run)."""

from __future__ import annotations

import functools
import json
import math
import warnings
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import jmespath
from jmespath import exceptions as jexc
from jmespath import functions as jfunc
from jmespath import visitor as jvisitor

from runner.errors import ExpressionError, RenderError
from runner.timeutil import parse_datetime, parse_datetime_text, windows
from runner.words import plural

__all__ = [
    "SECRET_PRESENCE",
    "Expression",
    "compile_expression",
    "compile_shape",
    "format_datetime",
    "parse_datetime",
    "template_expression",
    "to_epoch",
    "truthy",
]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SECOND = timedelta(seconds=1)


# --- datetimes, shared with templates.py and outputs.py ------------------------------------


def _as_datetime(value: Any) -> datetime:
    if isinstance(value, bool):
        raise ValueError(f"not a datetime or epoch number: {value!r}")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError(f"not an epoch number: {value!r}")
        return datetime.fromtimestamp(value, UTC)
    return parse_datetime(value)


def to_epoch(value: Any) -> int:
    """Integer seconds since 1970-01-01T00:00:00Z (floored) of an ISO 8601 string or a number.

    `to_epoch("2024-05-01T12:00:00Z")` -> 1714564800; `to_epoch(1714564800.9)` -> 1714564800.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a datetime or epoch number: {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"not an epoch number: {value!r}")
        return math.floor(value)
    # Exact integer arithmetic: float timestamps lose the floor for far dates.
    return (parse_datetime(value) - _EPOCH) // _SECOND


def format_datetime(value: Any, fmt: str = "%Y-%m-%dT%H:%M:%SZ") -> str:
    """An ISO 8601 string or epoch number formatted with strftime, in UTC."""
    return _as_datetime(value).astimezone(UTC).strftime(fmt)


# --- truthiness ----------------------------------------------------------------------------


def truthy(value: Any) -> bool:
    """JMESPath truthiness: false, null, "", [] and {} are false; 0 is true."""
    if value is None or value is False:
        return False
    if isinstance(value, str | list | dict):
        return len(value) > 0
    return True


# --- extra functions -----------------------------------------------------------------------


def _unique_key(value: Any) -> Any:
    # JMESPath equality: 1 == 1.0, but true != 1, and objects compare by content.
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, int | float):
        return ("n", value)
    if isinstance(value, str):
        return ("s", value)
    if value is None:
        return ("z",)
    return ("j", json.dumps(value, sort_keys=True, separators=(",", ":")))


def _number(value: Any, name: str) -> float | int:
    # JMESPath's "number" type admits booleans (a Python int): they are not numbers here.
    if isinstance(value, bool):
        raise jexc.JMESPathTypeError(name, value, "boolean", ["number"])
    return cast("float | int", value)


class _Functions(jfunc.Functions):
    """unique, lower, upper, split, replace, to_epoch, items, from_items, add, subtract,
    multiply, divide, windows, parse_datetime."""

    @jfunc.signature({"types": ["array"]})
    def _func_unique(self, values: list[Any]) -> list[Any]:
        seen: set[Any] = set()
        out = []
        for value in values:
            key = _unique_key(value)
            if key not in seen:
                seen.add(key)
                out.append(value)
        return out

    @jfunc.signature({"types": ["string"]})
    def _func_lower(self, value: str) -> str:
        return value.lower()

    @jfunc.signature({"types": ["string"]})
    def _func_upper(self, value: str) -> str:
        return value.upper()

    @jfunc.signature({"types": ["string"]}, {"types": ["string"]})
    def _func_split(self, value: str, sep: str) -> list[str]:
        return value.split(sep) if sep else list(value)

    @jfunc.signature({"types": ["string"]}, {"types": ["string"]}, {"types": ["string"]})
    def _func_replace(self, value: str, old: str, new: str) -> str:
        return value.replace(old, new)

    @jfunc.signature({"types": ["string", "number"]})
    def _func_to_epoch(self, value: str | float) -> int:
        return to_epoch(value)

    @jfunc.signature({"types": ["object"]})
    def _func_items(self, value: dict[str, Any]) -> list[list[Any]]:
        return [[k, v] for k, v in value.items()]

    @jfunc.signature({"types": ["array"]})
    def _func_from_items(self, pairs: list[Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for pair in pairs:
            if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)):
                raise ValueError(
                    f"from_items() expects [key, value] pairs with string keys, got {pair!r}"
                )
            out[pair[0]] = pair[1]
        return out

    @jfunc.signature({"types": ["string"]})
    def _func_has_secret(self, name: str) -> bool:
        check = SECRET_PRESENCE.get()
        if check is None:
            raise ValueError("has_secret() is read only by an auth alternative's when")
        return check(name)

    @jfunc.signature({"types": ["number"]}, {"types": ["number"]})
    def _func_add(self, left: float, right: float) -> float:
        return _number(left, "add") + _number(right, "add")

    @jfunc.signature({"types": ["number"]}, {"types": ["number"]})
    def _func_subtract(self, left: float, right: float) -> float:
        return _number(left, "subtract") - _number(right, "subtract")

    @jfunc.signature({"types": ["number"]}, {"types": ["number"]})
    def _func_multiply(self, left: float, right: float) -> float:
        return _number(left, "multiply") * _number(right, "multiply")

    @jfunc.signature({"types": ["number"]}, {"types": ["number"]})
    def _func_divide(self, left: float, right: float) -> float:
        left, right = _number(left, "divide"), _number(right, "divide")
        if right == 0:
            # Not a type error: a condition does not turn it into false.
            raise ValueError(f"divide({left}, {right}): division by zero")
        quotient = left / right
        # True division; an exact quotient of integers stays an integer (10 / 2 is 5).
        if type(left) is int and type(right) is int and left % right == 0:
            return left // right
        return quotient

    @jfunc.signature(
        {"types": ["string", "number", "null"]},
        {"types": ["string", "number", "null"]},
        {"types": ["string"]},
    )
    def _func_windows(self, start: Any, end: Any, step: str) -> list[dict[str, Any]]:
        return windows(start, end, step)

    @jfunc.signature({"types": ["string"]}, {"types": ["string"]})
    def _func_parse_datetime(self, text: str, fmt: str) -> str:
        return parse_datetime_text(text, fmt)


# Whether a secret exists, while an auth alternative's `when` is evaluated (once per run).
SECRET_PRESENCE: ContextVar[Callable[[str], bool] | None] = ContextVar(
    "SECRET_PRESENCE", default=None
)
_FUNCTIONS = _Functions()
_OPTIONS = jmespath.Options(custom_functions=_FUNCTIONS)
# The interpreter keeps no per-search state, so one serves every expression.
_INTERPRETER = jvisitor.TreeInterpreter(_OPTIONS)


# --- compiled expressions ------------------------------------------------------------------


class Expression:
    """A compiled JMESPath expression. `search` raises RenderError, never a jmespath error."""

    # `search` is the compiled function itself, not a method wrapping it: one Python call per
    # search, which counts when fields are read from every record.
    __slots__ = (
        "getter",
        "holds",
        "is_plain_path",
        "is_template",
        "negated_path",
        "reads",
        "root_names",
        "search",
        "source",
        "step_refs",
    )

    source: str
    search: Callable[[Any], Any]
    # For a plain path: the path as keys and indexes, which compile_shape inlines.
    getter: tuple[str | int, ...] | None
    step_refs: frozenset[str]
    root_names: frozenset[str]
    # `name.key` read against the root, as (name, key): `inputs.since` -> ("inputs", "since").
    reads: frozenset[tuple[str, str]]
    is_plain_path: bool
    # The expression as a condition: JMESPath truthiness, and false where a function meets a
    # value of the wrong type (`contains(null, 'x')`), instead of a failure.
    holds: Callable[[Any], bool]
    # Where `!a.b` is written: it parses as `(!a).b`, always null.
    negated_path: str | None
    # A Jinja `{{ ... }}` in a key that takes JMESPath: it reads the scope (and `record`, on a
    # record), not the data a JMESPath expression would search.
    is_template: bool

    def __init__(
        self,
        source: str,
        fn: Callable[[Any], Any],
        *,
        step_refs: frozenset[str],
        root_names: frozenset[str],
        is_plain_path: bool,
        path: tuple[str | int, ...] | None = None,
        holds: Callable[[Any], bool] | None = None,
        negated_path: str | None = None,
        is_template: bool = False,
        reads: frozenset[tuple[str, str]] = frozenset(),
    ) -> None:
        self.source = source
        self.reads = reads
        self.search = fn
        self.holds = holds if holds is not None else (lambda data: truthy(fn(data)))
        self.negated_path = negated_path
        self.is_template = is_template
        self.getter = path
        self.step_refs = step_refs
        self.root_names = root_names
        self.is_plain_path = is_plain_path

    def __repr__(self) -> str:
        return f"Expression({self.source!r})"


def template_expression(
    source: str,
    render: Callable[[Any], Any],
    *,
    names: frozenset[str],
    step_refs: frozenset[str],
) -> Expression:
    """A key that takes JMESPath, written as a Jinja template: evaluated on the scope, judged
    by JMESPath truthiness as a condition. Its errors are the template's (RenderError)."""
    return Expression(
        source,
        render,
        step_refs=step_refs,
        root_names=names,
        is_plain_path=False,
        holds=lambda scope: truthy(render(scope)),
        is_template=True,
    )


def _render_error(source: str, exc: Exception) -> RenderError:
    return RenderError(f"JMESPath error in {source!r}: {exc}")


def _guarded(source: str, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def search(data: Any) -> Any:
        try:
            return fn(data)
        except Exception as exc:
            raise _render_error(source, exc) from exc

    return search


def compile_expression(source: str) -> Expression:
    """Parse `source` once (cached); ExpressionError with a caret line under the error on bad
    syntax, an unknown function or a wrong number of arguments."""
    if not isinstance(source, str):
        raise ExpressionError(f"JMESPath: expected a string expression, got {source!r}")
    return _compile_expression(source)


# Brackets, parentheses and operators nested in one another, at most: the expression is
# evaluated by recursion, and a deeper one would end in a RecursionError.
MAX_NESTING = 100


def _too_deep(language: str) -> str:
    return f"{language}: the expression is nested more than {MAX_NESTING} levels deep"


def _tree_depth(tree: dict[str, Any]) -> int:
    """The depth of a parsed JMESPath expression, measured without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > MAX_NESTING:
            return deepest
        if isinstance(node, dict):
            stack.extend((child, depth + 1) for child in node.get("children", ()))
        elif isinstance(node, list):
            stack.extend((child, depth) for child in node)
    return deepest


# A typed front for the cache: lru_cache's wrapper would hide the signature from mypy.
@functools.lru_cache(maxsize=8192)
def _compile_expression(source: str) -> Expression:
    try:
        with warnings.catch_warnings():
            # JEP-12's "deprecated string literal syntax" (`foo` read as a string): the
            # expression still compiles as JMESPath defines it; the warning is the library's.
            warnings.simplefilter("ignore", PendingDeprecationWarning)
            tree = jmespath.compile(source).parsed
    except jexc.JMESPathError as exc:
        raise _syntax_error(source, exc) from exc
    except RecursionError:
        raise ExpressionError(_too_deep("JMESPath")) from None
    parsed = cast("dict[str, Any]", tree)
    if _tree_depth(parsed) > MAX_NESTING:
        raise ExpressionError(_too_deep("JMESPath"))
    _check_functions(source, parsed)

    path = _plain_path(parsed)
    fn: Callable[[Any], Any] = (
        _guarded(source, functools.partial(_INTERPRETER.visit, tree))
        if path is None
        else _make_getter(source, path)
    )
    return Expression(
        source,
        fn,
        step_refs=frozenset(_step_refs(parsed)),
        root_names=frozenset(_root_names(parsed)),
        reads=frozenset(_root_reads(parsed)),
        is_plain_path=path is not None,
        path=path,
        holds=None if path is not None else _null_safe(source, tree),
        negated_path=_negated_path(parsed),
    )


def _null_safe(source: str, tree: Any) -> Callable[[Any], bool]:
    visit = _INTERPRETER.visit

    def holds(data: Any) -> bool:
        try:
            return truthy(visit(tree, data))
        except jexc.JMESPathTypeError:
            return False
        except Exception as exc:
            raise _render_error(source, exc) from exc

    return holds


def _negated_path(parsed: dict[str, Any]) -> str | None:
    """`!a.b` as the text `a.b` when it is written somewhere in the expression."""
    for node in _walk(parsed):
        if node["type"] != "subexpression":
            continue
        first, second = node["children"][0], node["children"][1]
        if first["type"] == "not_expression":
            inner = _plain_path(first["children"][0])
            rest = _plain_path(second)
            if inner is not None and rest is not None and inner and rest:
                return ".".join(str(part) for part in (*inner, *rest))
            return "a.b"
    return None


def _syntax_error(source: str, exc: jexc.JMESPathError) -> ExpressionError:
    """The message (with its caret line), and the expression and the offset as data."""
    message, shown, position = _syntax_message(source, exc)
    return ExpressionError(message, expression=shown, offset=position)


def _syntax_message(source: str, exc: jexc.JMESPathError) -> tuple[str, str, int | None]:
    # Newlines (YAML block scalars) would break the caret's alignment.
    shown = source.replace("\n", " ").replace("\r", " ")
    if isinstance(exc, jexc.EmptyExpressionError):
        return "JMESPath: empty expression", shown, None
    position: int | None = None
    if isinstance(exc, jexc.LexerError):
        what = exc.message.rstrip(".")
        what = what[:1].lower() + what[1:]
        position = exc.lexer_position
    elif isinstance(exc, jexc.IncompleteExpressionError):
        what = "unexpected end of expression"
        position = exc.lex_position
    elif isinstance(exc, jexc.ParseError):
        position = exc.lex_position
        if exc.token_type == "EOF":
            what = "unexpected end of expression"
        elif exc.msg.startswith("Unexpected token"):
            what = f"unexpected token {exc.token_value!r}"
        else:
            what = exc.msg[:1].lower() + exc.msg[1:]
    else:
        what = str(exc)
    head = f"JMESPath: {what}: "
    if position is None:
        return head + shown, shown, None
    # The caret is aligned for the message printed alone; whoever prefixes the first line
    # (file:line:col: path: ) indents the following lines by the prefix's width.
    return f"{head}{shown}\n{' ' * (len(head) + position)}^", shown, position


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for child in node.get("children", ()):
            yield from _walk(child)


def _check_functions(source: str, parsed: dict[str, Any]) -> None:
    """Unknown functions and wrong argument counts are flow errors, found before any run."""
    table = _FUNCTIONS.FUNCTION_TABLE
    for node in _walk(parsed):
        if node["type"] != "function_expression":
            continue
        name = node["value"]
        spec = table.get(name)
        if spec is None:
            known = ", ".join(sorted(table))
            raise ExpressionError(
                f"JMESPath: unknown function {name}() in {source!r}; known functions: {known}"
            )
        signature = spec["signature"]
        given = len(node["children"])
        if signature and signature[-1].get("variadic"):
            if given < len(signature):
                raise ExpressionError(
                    f"JMESPath: {name}() takes at least {plural(len(signature), 'argument')}, "
                    f"got {given}: {source}"
                )
        elif given != len(signature):
            wanted = plural(len(signature), "argument")
            raise ExpressionError(f"JMESPath: {name}() takes {wanted}, got {given}: {source}")


def _step_refs(parsed: dict[str, Any]) -> set[str]:
    # Anywhere in the tree, even where `steps` would be read on an element: keeping a step's
    # records when not needed costs memory, missing one would be wrong.
    refs = set()
    for node in _walk(parsed):
        if node["type"] == "subexpression":
            first, second = node["children"][0], node["children"][1]
            if first["type"] == "field" and first["value"] == "steps" and second["type"] == "field":
                refs.add(second["value"])
    return refs


# Node types whose first child is evaluated against the context and the rest against its result.
_LEFT_ONLY = frozenset(
    {
        "subexpression",
        "index_expression",
        "projection",
        "value_projection",
        "filter_projection",
        "flatten",
        "pipe",
    }
)
# Node types whose children are all evaluated against the context.
_ALL_CHILDREN = frozenset(
    {
        "comparator",
        "and_expression",
        "or_expression",
        "not_expression",
        "multi_select_list",
        "multi_select_dict",
        "key_val_pair",
        "function_expression",
    }
)


def _root_names(node: dict[str, Any]) -> set[str]:
    """First field names read against the root; not those read on elements of a projection."""
    kind = node["type"]
    if kind == "field":
        return {node["value"]}
    children = node.get("children", [])
    if kind in _LEFT_ONLY and children:
        return _root_names(children[0])
    if kind in _ALL_CHILDREN:
        names: set[str] = set()
        for child in children:
            names |= _root_names(child)
        return names
    # literal, current, expref (evaluated on elements), index, slice, ...
    return set()


def _root_reads(node: dict[str, Any]) -> set[tuple[str, str]]:
    """`name.key` read against the root (as `_root_names` finds the names), as (name, key)."""
    kind = node["type"]
    children = node.get("children", [])
    if (
        kind == "subexpression"
        and children[0]["type"] == "field"
        and children[1]["type"] == "field"
    ):
        return {(children[0]["value"], children[1]["value"])}
    if kind in _LEFT_ONLY and children:
        return _root_reads(children[0])
    if kind in _ALL_CHILDREN:
        reads: set[tuple[str, str]] = set()
        for child in children:
            reads |= _root_reads(child)
        return reads
    return set()


def _plain_path(node: dict[str, Any]) -> tuple[str | int, ...] | None:
    """`a.b[0]."x-y"` as ("a", "b", 0, "x-y"); None for anything that is not a plain path."""
    kind = node["type"]
    if kind == "field":
        return (node["value"],)
    if kind in ("current", "identity"):
        return ()
    if kind == "index":
        return (node["value"],)
    if kind in ("subexpression", "index_expression"):
        # Both apply their children in turn to the previous result.
        parts: tuple[str | int, ...] = ()
        for child in node["children"]:
            sub = _plain_path(child)
            if sub is None:
                return None
            parts += sub
        return parts
    return None


def _make_getter(source: str, path: tuple[str | int, ...]) -> Callable[[Any], Any]:
    """A getter with JMESPath's semantics: a missing key, a wrong type or an index out of
    range gives None. Fields use `.get` like jmespath's own visitor does. Anything else that
    goes wrong (a mapping-like object whose `get` fails) is a RenderError."""
    if len(path) == 1 and isinstance(path[0], str):
        key = path[0]

        def get1(data: Any) -> Any:
            try:
                return data.get(key)
            except AttributeError:
                return None
            except Exception as exc:
                raise _render_error(source, exc) from exc

        return get1

    if len(path) == 2 and isinstance(path[0], str) and isinstance(path[1], str):
        key1, key2 = path

        def get2(data: Any) -> Any:
            try:
                return data.get(key1).get(key2)
            except AttributeError:
                return None
            except Exception as exc:
                raise _render_error(source, exc) from exc

        return get2

    def get(data: Any) -> Any:
        try:
            return _walk_path(data, path)
        except Exception as exc:
            raise _render_error(source, exc) from exc

    return get


def _walk_path(data: Any, path: tuple[str | int, ...]) -> Any:
    for key in path:
        if type(key) is int:
            if not isinstance(data, list):
                return None
            try:
                data = data[key]
            except IndexError:
                return None
        else:
            try:
                data = data.get(key)
            except AttributeError:
                return None
    return data


# --- shaping records -----------------------------------------------------------------------


def compile_shape(
    fields: tuple[tuple[str, Expression], ...],
) -> Callable[[Any], dict[str, Any]]:
    """One function making `{name: expression.search(record), ...}` for a record.

    When every expression is a plain path, it is generated as one function that reads plain
    dicts inline (`r.get("a")`, then `.get("b")` when that is a dict); any other value takes
    the expression's own getter, so the result is always the same as searching field by field.
    Cached: flows compile their fields once, and so does this.
    """
    return _compile_shape(fields)


@functools.lru_cache(maxsize=1024)
def _compile_shape(
    fields: tuple[tuple[str, Expression], ...],
) -> Callable[[Any], dict[str, Any]]:
    names = [name for name, _ in fields]
    searches = [expression.search for _, expression in fields]
    if len(set(names)) != len(names) or any(e.getter is None for _, e in fields):

        def shape_each(record: Any) -> dict[str, Any]:
            return {name: search(record) for name, search in zip(names, searches, strict=True)}

        return shape_each
    # Generated code names only local variables; keys and getters come in as arguments, so no
    # value from the flow is ever pasted into source text.
    namespace: dict[str, Any] = {"_dict": dict}
    values = []
    for i, (name, expression) in enumerate(fields):
        path = expression.getter
        assert path is not None
        namespace[f"n{i}"] = name
        namespace[f"s{i}"] = expression.search
        if not path or not all(type(k) is str for k in path):
            values.append(f"s{i}(r)")
            continue
        for j, key in enumerate(path):
            namespace[f"k{i}_{j}"] = key
        if len(path) == 1:
            values.append(f"g(k{i}_0)")
        else:
            # First level inline; deeper levels (rare) through the expression's own getter.
            rest = tuple(path[1:])
            namespace[f"t{i}"] = _make_getter(expression.source, rest)
            values.append(
                f"(t{i}(v) if type(v := g(k{i}_0)) is not _dict else v.get(k{i}_1))"
                if len(rest) == 1
                else f"t{i}(g(k{i}_0))"
            )
    body = ", ".join(f"n{i}: {value}" for i, value in enumerate(values))
    fallback = ", ".join(f"n{i}: s{i}(r)" for i in range(len(fields)))
    source = (
        "def shape(r):\n"
        "    if type(r) is not _dict:\n"
        f"        return {{{fallback}}}\n"
        "    g = r.get\n"
        f"    return {{{body}}}\n"
    )
    exec(compile(source, "<runner.expressions.compile_shape>", "exec"), namespace)
    shape: Callable[[Any], dict[str, Any]] = namespace["shape"]
    return shape
