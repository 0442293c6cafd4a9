"""YAML text to plain data with the line and column of every key path (YAML 1.2 core schema).

Every bad input becomes a located FlowError; a traceback from PyYAML never reaches the user.
"""

from __future__ import annotations

import codecs
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, cast

import yaml
from yaml import events as ev
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.scanner import Scanner

from runner.errors import FlowError, Problem, UsageError, format_path

__all__ = ["Document", "Origin", "Path", "load_data_file", "load_document", "load_text"]

Path = tuple[str | int, ...]

# Nodes copied through aliases, in total, before a file is refused as an alias bomb.
MAX_ALIAS_NODES: Final = 10_000
# Bytes of keys and strings copied through aliases, in total: one large string aliased many
# times is a bomb too, whatever the count of nodes.
MAX_ALIAS_BYTES: Final = 1024 * 1024
# Deeper data breaks recursive consumers (jsonschema, JSON writers) with a RecursionError.
MAX_DEPTH: Final = 200

_CORE: Final = "tag:yaml.org,2002:"
_STR: Final = _CORE + "str"
_MAP: Final = _CORE + "map"
_SEQ: Final = _CORE + "seq"

_INT_RE: Final = re.compile(r"[-+]?[0-9]+")
_FLOAT_RE: Final = re.compile(r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?")
_OCT_RE: Final = re.compile(r"0o[0-7]+")
_HEX_RE: Final = re.compile(r"0x[0-9a-fA-F]+")
_NUMBER_START: Final = frozenset("0123456789+-.")

_NULLS: Final = ("", "~", "null", "Null", "NULL")
_TRUES: Final = ("true", "True", "TRUE")
_FALSES: Final = ("false", "False", "FALSE")
_INFS: Final = (".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF")
_NEG_INFS: Final = ("-.inf", "-.Inf", "-.INF")
_NANS: Final = (".nan", ".NaN", ".NAN")

_LITERALS: Final[dict[str, Any]] = {
    **dict.fromkeys(_NULLS, None),
    **dict.fromkeys(_TRUES, True),
    **dict.fromkeys(_FALSES, False),
    **dict.fromkeys(_INFS, float("inf")),
    **dict.fromkeys(_NEG_INFS, float("-inf")),
    **dict.fromkeys(_NANS, float("nan")),
}
_NOT_LITERAL: Final = object()


def _number(text: str) -> Any:
    """The int or float a plain scalar spells in the core schema, else _NOT_LITERAL."""
    try:
        if _INT_RE.fullmatch(text):
            return int(text)
        if _FLOAT_RE.fullmatch(text):
            return float(text)
        if _OCT_RE.fullmatch(text):
            return int(text[2:], 8)
        if _HEX_RE.fullmatch(text):
            return int(text[2:], 16)
    except ValueError:
        # An integer beyond Python's digit limit: keep the text rather than fail.
        return _NOT_LITERAL
    return _NOT_LITERAL


def _resolve_plain(text: str) -> Any:
    value = _LITERALS.get(text, _NOT_LITERAL)
    if value is _NOT_LITERAL and text[:1] in _NUMBER_START:
        value = _number(text)
    return text if value is _NOT_LITERAL else value


def _construct_null(text: str) -> Any:
    return None if text in _NULLS else _NOT_LITERAL


def _construct_bool(text: str) -> Any:
    return True if text in _TRUES else False if text in _FALSES else _NOT_LITERAL


def _construct_int(text: str) -> Any:
    value = _number(text)
    return value if isinstance(value, int) else _NOT_LITERAL


def _construct_float(text: str) -> Any:
    value = _LITERALS.get(text, _NOT_LITERAL)
    if isinstance(value, float):
        return value
    value = _number(text)
    return float(value) if isinstance(value, int | float) else _NOT_LITERAL


_EXPLICIT_SCALARS: Final[dict[str, Callable[[str], Any]]] = {
    _CORE + "null": _construct_null,
    _CORE + "bool": _construct_bool,
    _CORE + "int": _construct_int,
    _CORE + "float": _construct_float,
}


def _show_tag(tag: str) -> str:
    return "!!" + tag[len(_CORE) :] if tag.startswith(_CORE) else tag


@dataclass(frozen=True, slots=True)
class Document:
    """A loaded YAML file: its data and where each key path is written."""

    file: str
    data: Any
    marks: Mapping[Path, tuple[int, int]]
    # Where the value of a mapping entry (or a quoted or block scalar in a list) begins: the
    # first character of its content, so that an offset into the string lands on the text.
    value_marks: Mapping[Path, tuple[int, int]] = field(default_factory=dict, repr=False)

    def locate(self, path: Sequence[str | int]) -> tuple[int, int]:
        """The mark of `path`, else of its nearest ancestor that has one."""
        key = tuple(path)
        marks = self.marks
        while key:
            mark = marks.get(key)
            if mark is not None:
                return mark
            key = key[:-1]
        return marks.get((), (1, 1))

    def value_mark(self, path: Sequence[str | int]) -> tuple[int, int]:
        """Where the value at `path` begins; falls back to `locate`."""
        mark = self.value_marks.get(tuple(path))
        return mark if mark is not None else self.locate(path)

    # Keys merged in from elsewhere (`defaults`, `use`, `include`): the prefix of a path in this
    # document -> where that value was written. Empty for a document as loaded.
    origins: Mapping[Path, Origin] = field(default_factory=dict, repr=False)

    def origin(self, path: Sequence[str | int]) -> tuple[Document, Path, str]:
        """The document and path where the key at `path` was written, and the note that
        names its user: the key itself, or one merged in from another place."""
        key = tuple(path)
        origins = self.origins
        if origins:
            for end in range(len(key), 0, -1):
                found = origins.get(key[:end])
                if found is not None:
                    return found.doc, (*found.path, *key[end:]), found.note
        return self, key, ""

    def problem(self, path: Sequence[str | int], message: str, severity: str = "error") -> Problem:
        doc, where, note = self.origin(path)
        line, column = doc.locate(where)
        return Problem(doc.file, line, column, format_path(where), message + note, severity)

    def value_problem(
        self,
        path: Sequence[str | int],
        message: str,
        severity: str = "error",
        expression: str | None = None,
        offset: int | None = None,
    ) -> Problem:
        """A problem inside a template or expression, located at the start of its text."""
        doc, where, note = self.origin(path)
        line, column = doc.value_mark(where)
        # The note joins the first line, so that a caret line stays under the expression.
        first, newline, rest = message.partition("\n")
        return Problem(
            doc.file,
            line,
            column,
            format_path(where),
            first + note + newline + rest,
            severity,
            expression,
            offset,
        )


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a merged value was written, and the note that names the step that uses it."""

    doc: Document
    path: Path
    note: str


class _Fatal(Exception):
    """Stops the build at a problem after which the rest of the file cannot be read."""


class _TooDeep(Exception):
    """An alias that would nest the data deeper than MAX_DEPTH."""


class _TooLarge(Exception):
    """Aliases that would copy more than MAX_ALIAS_BYTES."""


class _Frame:
    """An open mapping or sequence while its events arrive."""

    __slots__ = ("anchor", "container", "is_map", "key", "path")

    def __init__(self, container: Any, path: Path, is_map: bool, anchor: str | None) -> None:
        self.container = container
        self.path = path
        self.is_map = is_map
        self.anchor = anchor
        self.key: str | None = None  # a mapping's key waiting for its value


class _PyParser(Reader, Scanner, Parser):
    """PyYAML's pure Python parser: slower, used for its clearer syntax error messages."""

    def __init__(self, stream: str) -> None:
        Reader.__init__(self, stream)
        Scanner.__init__(self)
        Parser.__init__(self)


_ParserFactory = Callable[[str], Any]

try:
    from yaml._yaml import CParser as _CParser  # the libyaml parser: marks work the same

    _FAST_PARSER: _ParserFactory = _CParser
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    _FAST_PARSER = _PyParser


class _Builder:
    """Builds data, key marks and value marks from parser events in one pass."""

    def __init__(self, file: str, text: str) -> None:
        self.file = file
        self.text = text
        self.marks: dict[Path, tuple[int, int]] = {}
        self.value_marks: dict[Path, tuple[int, int]] = {}
        self.problems: list[Problem] = []
        # anchor -> (value, its text if a scalar); collections are added when they close
        self.anchors: dict[str, tuple[Any, str | None]] = {}
        self.open_anchors: set[str] = set()
        self.alias_nodes = 0
        self.alias_bytes = 0
        self.data: Any = None
        self._lines: list[str] | None = None

    def add(self, line: int, column: int, path: Path, message: str) -> None:
        self.problems.append(Problem(self.file, line, column, format_path(path), message))

    def fatal(self, line: int, column: int, path: Path, message: str) -> _Fatal:
        self.add(line, column, path, message)
        return _Fatal()

    def build(self, parser: Any) -> Any:
        get_event = parser.get_event
        get_event()  # StreamStartEvent
        event = get_event()
        if isinstance(event, ev.StreamEndEvent):
            raise self.fatal(1, 1, (), "empty file: expected a mapping")
        event = get_event()  # the root node's first event
        if isinstance(event, ev.ScalarEvent) and event.value == "" and event.implicit[0]:
            raise self.fatal(1, 1, (), "empty file: expected a mapping")
        start = event.start_mark
        self.marks[()] = (start.line + 1, start.column + 1)

        root: Any = None
        stack: list[_Frame] = []
        scalar_event = ev.ScalarEvent
        alias_event = ev.AliasEvent
        end_events = (ev.MappingEndEvent, ev.SequenceEndEvent)
        while True:
            cls = event.__class__
            if cls in end_events:
                frame = stack.pop()
                if frame.anchor is not None:
                    self.anchors[frame.anchor] = (frame.container, None)
                    self.open_anchors.discard(frame.anchor)
                if not stack:
                    break
                event = get_event()
                continue

            top = stack[-1] if stack else None
            mark = event.start_mark
            line = mark.line + 1
            column = mark.column + 1

            if top is not None and top.is_map and top.key is None:
                self.take_key(top, event, line, column)
                event = get_event()
                continue

            # A value: the root, a sequence element or the value of a mapping entry.
            if top is None:
                path: Path = ()
            elif top.is_map:
                path = (*top.path, cast(str, top.key))
            else:
                path = (*top.path, len(top.container))
                self.marks[path] = (line, column)

            container: Any
            if cls is scalar_event:
                value = self.scalar(event, path, line, column)
                if top is not None and (top.is_map or event.style not in (None, "")):
                    self.value_marks[path] = self.content_start(event, line, column)
                if event.anchor is not None:
                    self.anchors[event.anchor] = (value, event.value)
            elif cls is alias_event:
                if top is not None and top.is_map:
                    self.value_marks[path] = (line, column)
                value = self.alias(event.anchor, path, line, column, len(stack))
            else:
                is_map = cls is ev.MappingStartEvent
                tag = event.tag
                if tag is not None and tag != "!" and tag != (_MAP if is_map else _SEQ):
                    kind = "a mapping" if is_map else "a list"
                    self.add(line, column, path, f"tag {_show_tag(tag)} is not allowed on {kind}")
                if len(stack) >= MAX_DEPTH:
                    raise self.fatal(line, column, (), f"nested deeper than {MAX_DEPTH} levels")
                if top is not None and top.is_map:
                    self.value_marks[path] = (line, column)
                value = container = {} if is_map else []
                anchor = event.anchor
                if anchor is not None:
                    self.open_anchors.add(anchor)
                stack.append(_Frame(container, path, is_map, anchor))

            if top is None:
                root = value
                if cls is scalar_event or cls is alias_event:
                    break
            elif top.is_map:
                top.container[top.key] = value
                top.key = None
            else:
                top.container.append(value)
            event = get_event()

        event = get_event()  # DocumentEndEvent
        event = get_event()
        if not isinstance(event, ev.StreamEndEvent):
            mark = event.start_mark
            raise self.fatal(
                mark.line + 1,
                mark.column + 1,
                (),
                "several documents in one file: a file holds one YAML document",
            )
        return root

    def take_key(self, frame: _Frame, event: Any, line: int, column: int) -> None:
        cls = event.__class__
        if cls is ev.ScalarEvent:
            key: str = event.value
            self.check_scalar_tag(event, frame.path, line, column)
            if event.anchor is not None:
                self.anchors[event.anchor] = (key, key)
            if key == "<<" and event.implicit[0]:
                self.add(line, column, frame.path, "merge keys (<<) are not supported")
        elif cls is ev.AliasEvent:
            value, text = self.anchors.get(event.anchor, (None, None))
            if event.anchor not in self.anchors:
                raise self.fatal(line, column, frame.path, f"undefined alias '*{event.anchor}'")
            if text is None:
                kind = "a mapping" if isinstance(value, dict) else "a list"
                raise self.fatal(
                    line, column, frame.path, f"a key must be a scalar, not {kind} (alias)"
                )
            key = text
        else:
            kind = "a mapping" if cls is ev.MappingStartEvent else "a list"
            raise self.fatal(line, column, frame.path, f"a key must be a scalar, not {kind}")
        path = (*frame.path, key)
        if key in frame.container:
            first = self.marks[path][0]
            self.add(line, column, path, f"duplicate key '{key}' (first at line {first})")
        self.marks[path] = (line, column)
        frame.key = key

    def check_scalar_tag(self, event: Any, path: Path, line: int, column: int) -> str | None:
        """The explicit core tag of a scalar to construct with, or None for its plain text."""
        tag: str | None = event.tag
        if tag is None or tag == "!" or tag == _STR:
            return None
        if tag in _EXPLICIT_SCALARS:
            return tag
        self.add(line, column, path, f"tag {_show_tag(tag)} is not allowed")
        return None

    def scalar(self, event: Any, path: Path, line: int, column: int) -> Any:
        text: str = event.value
        if event.tag is None:
            return _resolve_plain(text) if event.implicit[0] else text
        tag = self.check_scalar_tag(event, path, line, column)
        if tag is None:
            return text
        value = _EXPLICIT_SCALARS[tag](text)
        if value is _NOT_LITERAL:
            self.add(line, column, path, f"'{text}' is not a valid {_show_tag(tag)}")
            return text
        return value

    def alias(self, anchor: str, path: Path, line: int, column: int, depth: int) -> Any:
        if anchor in self.open_anchors:
            raise self.fatal(line, column, path, f"alias '*{anchor}' refers to its own anchor")
        if anchor not in self.anchors:
            raise self.fatal(line, column, path, f"undefined alias '*{anchor}'")
        value = self.anchors[anchor][0]
        # Each alias gets its own copy: a consumer that mutates one place (defaults applied
        # to inputs) must not change the other.
        try:
            copy = self.copy(value, depth)
        except _TooDeep:
            raise self.fatal(line, column, (), f"nested deeper than {MAX_DEPTH} levels") from None
        except _TooLarge:
            raise self.fatal(
                line,
                column,
                path,
                f"too many aliases: more than {MAX_ALIAS_BYTES} bytes expanded through aliases",
            ) from None
        if self.alias_nodes > MAX_ALIAS_NODES:
            raise self.fatal(
                line,
                column,
                path,
                f"too many aliases: more than {MAX_ALIAS_NODES} nodes expanded through aliases",
            )
        return copy

    def count_bytes(self, size: int) -> None:
        self.alias_bytes += size
        if self.alias_bytes > MAX_ALIAS_BYTES:
            raise _TooLarge

    def copy(self, value: Any, depth: int) -> Any:
        self.alias_nodes += 1
        if isinstance(value, str):
            self.count_bytes(len(value.encode("utf-8", "surrogatepass")))
            return value
        if isinstance(value, dict | list):
            # The same limit as for nesting written out: an alias must not get around it.
            if depth >= MAX_DEPTH:
                raise _TooDeep
            if isinstance(value, dict):
                self.count_bytes(sum(len(str(k)) for k in value))
                return {k: self.copy(v, depth + 1) for k, v in value.items()}
            return [self.copy(v, depth + 1) for v in value]
        return value

    def content_start(self, event: Any, line: int, column: int) -> tuple[int, int]:
        """Where a scalar's text begins: after a quote, on the first line of a block scalar."""
        style = event.style
        if style in (None, "") and event.tag is None and event.anchor is None:
            return (line, column)
        if style in ("|", ">"):
            if self._lines is None:
                self._lines = self.text.splitlines()
            lines = self._lines
            for index in range(line, min(event.end_mark.line + 1, len(lines))):
                stripped = lines[index].lstrip(" ")
                if stripped:
                    return (index + 1, len(lines[index]) - len(stripped) + 1)
            return (line, column)
        # Tags and anchors precede the text on its line.
        if style in ("'", '"'):
            if event.tag is None and event.anchor is None:
                return (line, column + 1)
            return self.find_text_start(line, column, quote=True)
        return self.find_text_start(line, column, quote=False)

    def find_text_start(self, line: int, column: int, quote: bool) -> tuple[int, int]:
        if self._lines is None:
            self._lines = self.text.splitlines()
        if line - 1 >= len(self._lines):
            return (line, column)
        text = self._lines[line - 1]
        index = column - 1
        # Skip `!tag` and `&anchor` tokens and the spaces after them.
        while index < len(text) and text[index] in "!&":
            while index < len(text) and text[index] not in " \t":
                index += 1
            while index < len(text) and text[index] in " \t":
                index += 1
        if index >= len(text):
            return (line, column)  # the text starts on a later line: keep the node's start
        if quote and text[index] in "'\"":
            index += 1
        return (line, index + 1)


def _yaml_problem(file: str, text: str, exc: Exception) -> Problem:
    if isinstance(exc, yaml.reader.ReaderError):
        position = min(exc.position, len(text))
        line = text.count("\n", 0, position) + 1
        column = position - (text.rfind("\n", 0, position) + 1) + 1
        char = exc.character
        code = f"#x{ord(char) if isinstance(char, str) else char:04x}"
        return Problem(file, line, column, "", f"unacceptable character {code}: {exc.reason}")
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        message = exc.problem or exc.context or "invalid YAML"
        context_mark = exc.context_mark
        if (
            exc.problem
            and exc.context
            and context_mark is not None
            and mark is not None
            and (context_mark.line, context_mark.column) != (mark.line, mark.column)
        ):
            where = f"line {context_mark.line + 1}, column {context_mark.column + 1}"
            message = f"{message} ({exc.context} at {where})"
        if mark is not None:
            return Problem(file, mark.line + 1, mark.column + 1, "", message)
        return Problem(file, 1, 1, "", message)
    return Problem(file, 1, 1, "", f"invalid YAML: {exc}")


def _decode(data: bytes, file: str) -> str:
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as exc:
            problem = Problem(file, 1, 1, "", f"not UTF-16 text: {exc.reason}")
            raise FlowError([problem]) from exc
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        prefix = data[: exc.start]
        line_start = prefix.rfind(b"\n") + 1
        line = prefix.count(b"\n") + 1
        column = len(prefix[line_start:].decode("utf-8", errors="replace")) + 1
        message = f"not UTF-8 text: invalid byte 0x{data[exc.start]:02x}"
        raise FlowError([Problem(file, line, column, "", message)]) from exc


def _parse(builder: _Builder, parser_factory: _ParserFactory) -> None:
    """Fill `builder`; raises yaml.YAMLError for text the parser refuses."""
    parser = parser_factory(builder.text)
    try:
        builder.data = builder.build(parser)
    except _Fatal:
        pass  # the problem is in builder.problems
    finally:
        dispose = getattr(parser, "dispose", None)
        if dispose is not None:
            dispose()


def load_text(text: str | bytes, file: str = "<string>") -> Document:
    """Load one YAML document; any bad input raises FlowError with located problems."""
    if isinstance(text, bytes | bytearray):
        text = _decode(bytes(text), file)
    builder = _Builder(file, text)
    try:
        _parse(builder, _FAST_PARSER)
    except (yaml.YAMLError, UnicodeEncodeError) as exc:
        # UnicodeEncodeError: libyaml encodes the text to UTF-8 first, and lone surrogates fail.
        raise FlowError(_syntax_problems(file, text, exc)) from exc
    if builder.problems:
        raise FlowError(builder.problems)
    return Document(file, builder.data, builder.marks, builder.value_marks)


def _syntax_problems(file: str, text: str, exc: Exception) -> list[Problem]:
    """libyaml's messages are terse ("found character that cannot start any token"): parse
    again with the Python parser, on this error path only, for its wording."""
    builder = _Builder(file, text)
    try:
        _parse(builder, _PyParser)
    except yaml.YAMLError as slow_exc:
        return [*builder.problems, _yaml_problem(file, text, slow_exc)]
    if builder.problems:
        return builder.problems
    # The Python parser accepted what libyaml refused: report libyaml's own error.
    return [_yaml_problem(file, text, exc)]


def load_document(path: str | os.PathLike[str]) -> Document:
    """Read and load a YAML file; an unreadable file is a FlowError too."""
    file = os.fspath(path)
    try:
        with open(file, "rb") as stream:
            data = stream.read()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise FlowError([Problem(file, 1, 1, "", f"cannot read the file: {reason}")]) from exc
    return load_text(data, file)


def load_data_file(path: str) -> Any:
    """Load a YAML or JSON data file (--inputs-file, --services); errors are UsageErrors."""
    try:
        return load_document(path).data
    except FlowError as exc:
        raise UsageError(str(exc)) from exc
