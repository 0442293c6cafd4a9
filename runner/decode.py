"""Response decoding (JSON, NDJSON, CSV, XML, text) and body size limits.

Also the project's JSON helpers: `json_loads` and `json_dumps_line`, fast with orjson when present.
"""

from __future__ import annotations

import codecs
import importlib
import io
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any
from xml.parsers import expat

from defusedxml import (
    DefusedXmlException,
    DTDForbidden,
    EntitiesForbidden,
    ExternalReferenceForbidden,
)

from runner.errors import BODY_KEEP_CHARS, DecodeError

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
FORMATS = ("auto", "json", "xml", "csv", "ndjson", "text")
XML_NAMESPACES = ("strip", "keep")

_FORMAT_NAMES = {"json": "JSON", "ndjson": "NDJSON", "csv": "CSV", "xml": "XML", "text": "text"}
_NDJSON_TYPES = frozenset({"application/x-ndjson", "application/ndjson", "application/jsonl"})
_XML_TYPES = frozenset({"application/xml", "text/xml"})
# Elements nested in elements, at most: each level becomes an object, and the JSON writers
# stop at 255 levels (orjson), or at Python's recursion limit.
MAX_XML_DEPTH = 200
_UTF8 = "utf-8"
_BOM = codecs.BOM_UTF8


def _import_orjson() -> Any:
    try:
        return importlib.import_module("orjson")
    except ImportError:  # pragma: no cover - orjson is an optional dependency
        return None


_ORJSON: Any = _import_orjson()


# ---------------------------------------------------------------------------------------------
# JSON helpers


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _loads_stdlib(data: bytes | str) -> Any:
    try:
        return json.loads(data, parse_constant=_reject_constant)
    except RecursionError as exc:
        raise ValueError("JSON nested too deeply") from exc


# orjson silently turns an integer beyond 64 bits into a float; a run of 19 digits anywhere sends
# the document to the stdlib parser, which keeps it exact. Translating is far cheaper than a regex.
_DIGIT_MASK = bytes(0x30 if 0x30 <= i <= 0x39 else 0x20 for i in range(256))
_LONG_DIGIT_RUN = b"0" * 19


def _orjson_safe(buf: bytes) -> bool:
    return _LONG_DIGIT_RUN not in buf.translate(_DIGIT_MASK)


def _loads_fast(data: bytes | str) -> Any:
    try:
        buf = data.encode(_UTF8) if isinstance(data, str) else data
    except UnicodeEncodeError:  # lone surrogates: only the stdlib accepts them
        return _loads_stdlib(data)
    if _orjson_safe(buf):
        try:
            return _ORJSON.loads(buf)
        except ValueError:
            pass  # the stdlib gives the familiar message, or accepts what orjson refuses
    return _loads_stdlib(data)


# Parse JSON (NaN and Infinity refused); every failure is a ValueError.
json_loads: Callable[[bytes | str], Any] = _loads_fast if _ORJSON is not None else _loads_stdlib


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if obj - obj == 0.0 else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _dumps_stdlib(obj: Any) -> str:
    try:
        return _ENCODER.encode(obj)
    except ValueError:
        # NaN and infinities are not JSON: written as null, as orjson writes them.
        return _ENCODER.encode(_finite(obj))


# orjson and the stdlib differ only for floats below 1e-4: orjson writes `0.00001` and `1.5e-7`
# where Python writes `1e-05` and `1.5e-07` (checked over every exponent). Such output, and
# anything orjson refuses (big ints, non-str keys, surrogates), goes to the stdlib instead.
_ORJSON_FLOAT_DIFFERS = re.compile(rb"\de-\d(?:[,\]}]|$)|(?:^|[:,\[])-?0\.0000")


# Types the stdlib cannot write go to it too, so that both paths fail alike.
_ORJSON_OPTIONS = (
    _ORJSON.OPT_PASSTHROUGH_DATETIME | _ORJSON.OPT_PASSTHROUGH_DATACLASS
    if _ORJSON is not None
    else 0
)


def _dumps_fast(obj: Any) -> str:
    try:
        out: bytes = _ORJSON.dumps(obj, option=_ORJSON_OPTIONS)
    except TypeError:
        return _dumps_stdlib(obj)
    if (b"e-" in out or b"0.0000" in out) and _ORJSON_FLOAT_DIFFERS.search(out):
        return _dumps_stdlib(obj)
    return out.decode(_UTF8)


def json_dumps_line(obj: Any) -> str:
    """Compact JSON for one JSONL line (no newline): key order kept, non-ASCII unescaped.

    The output is the same byte for byte with or without orjson; NaN and infinities are null.
    """
    return _dumps_fast(obj) if _ORJSON is not None else _dumps_stdlib(obj)


_LINE_OPTIONS = _ORJSON_OPTIONS | (_ORJSON.OPT_APPEND_NEWLINE if _ORJSON is not None else 0)


def _dumps_line_bytes_fast(obj: Any) -> bytes:
    try:
        out: bytes = _ORJSON.dumps(obj, option=_LINE_OPTIONS)
    except TypeError:
        return _dumps_line_bytes_stdlib(obj)
    if (b"e-" in out or b"0.0000" in out) and _ORJSON_FLOAT_DIFFERS.search(out[:-1]):
        return _dumps_line_bytes_stdlib(obj)
    return out


def _dumps_line_bytes_stdlib(obj: Any) -> bytes:
    return (_dumps_stdlib(obj) + "\n").encode(_UTF8)


# `json_dumps_line(obj)` and a newline, as UTF-8: a JSONL line ready to write.
# With orjson the bytes come straight from it (no str round trip). A lone surrogate, which
# UTF-8 cannot hold, raises UnicodeEncodeError (orjson refuses it with TypeError first, and
# the stdlib path then fails to encode), as encoding `json_dumps_line(obj)` would.
json_dumps_line_bytes: Callable[[Any], bytes] = (
    _dumps_line_bytes_fast if _ORJSON is not None else _dumps_line_bytes_stdlib
)


# ---------------------------------------------------------------------------------------------
# Options and content types


class _LocalNames:
    """`key in names` by local name, for `namespaces: keep` where keys are `prefix:name`."""

    __slots__ = ("_names",)

    def __init__(self, names: frozenset[str]) -> None:
        self._names = names

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.rpartition(":")[2] in self._names


@dataclass(frozen=True, slots=True)
class DecodeOptions:
    """How a step's response bodies are decoded: its `response` settings."""

    format: str = "auto"  # auto | json | xml | csv | ndjson | text
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    xml_force_list: tuple[str, ...] = ()  # local element names that are always lists
    xml_namespaces: str = "strip"  # strip | keep
    xml_attr_prefix: str = "@"
    xml_text_key: str = "#text"
    csv_delimiter: str = ","
    csv_encoding: str | None = None  # None: the charset of the Content-Type, else utf-8
    _force_list: frozenset[str] | _LocalNames | None = field(
        init=False, default=None, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {self.format!r}")
        if isinstance(self.max_body_bytes, bool) or self.max_body_bytes <= 0:
            raise ValueError(f"max_body_bytes must be a positive integer: {self.max_body_bytes}")
        if self.xml_namespaces not in XML_NAMESPACES:
            raise ValueError(f"xml namespaces must be strip or keep, not {self.xml_namespaces!r}")
        if len(self.csv_delimiter) != 1:
            raise ValueError(f"csv delimiter must be one character, not {self.csv_delimiter!r}")
        if self.csv_encoding is not None and _codec(self.csv_encoding) is None:
            raise ValueError(f"unknown csv encoding {self.csv_encoding!r}")
        object.__setattr__(self, "xml_force_list", tuple(self.xml_force_list))
        names = frozenset(name.rpartition(":")[2] for name in self.xml_force_list)
        force_list: frozenset[str] | _LocalNames | None = None
        if names:
            force_list = names if self.xml_namespaces == "strip" else _LocalNames(names)
        object.__setattr__(self, "_force_list", force_list)


@lru_cache(maxsize=64)
def _codec(name: str) -> str | None:
    """The canonical codec name (`UTF8` -> `utf-8`), or None when Python does not know it."""
    try:
        return codecs.lookup(name).name
    except LookupError:
        return None


@lru_cache(maxsize=256)
def _parse_content_type(content_type: str) -> tuple[str, str | None]:
    """`Application/JSON; charset="UTF-8"` -> `("application/json", "utf-8")`.

    An unknown charset counts as none, so that a misconfigured server falls back to UTF-8.
    """
    media, _, params = content_type.partition(";")
    charset = None
    for param in params.split(";"):
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset":
            charset = _codec(value.strip().strip("\"'"))
    return media.strip().lower(), charset


def _charset(content_type: str | None) -> str | None:
    return None if content_type is None else _parse_content_type(content_type)[1]


def choose_format(content_type: str | None, fmt: str) -> str:
    """The format to decode with: `fmt` itself, or for `auto` the one the Content-Type names."""
    if fmt != "auto":
        return fmt
    if content_type is None:
        return "text"
    media = _parse_content_type(content_type)[0]
    if media == "application/json" or media.endswith("+json"):
        return "json"
    if media in _NDJSON_TYPES:
        return "ndjson"
    if media == "text/csv":
        return "csv"
    if media in _XML_TYPES or media.endswith("+xml"):
        return "xml"
    return "text"


# ---------------------------------------------------------------------------------------------
# Decoding


def body_excerpt(raw: bytes, limit: int = 500) -> str:
    """The start of a body as text, for error messages."""
    # A character takes at most 4 bytes: no need to decode a large body whole.
    return raw[: limit * 4].decode(_UTF8, "replace")[:limit]


def _too_large(max_bytes: int) -> DecodeError:
    return DecodeError(f"response body exceeds max_body_bytes ({max_bytes} bytes)")


class BodyLimit:
    """Counts the bytes of a body as it streams in, to enforce `max_body_bytes`.

    Feed it the chunks aiohttp yields: they are already decompressed, so a small gzip body
    that inflates past the limit is caught while reading, not after.
    """

    __slots__ = ("max_bytes", "total")

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.total = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        if self.total > self.max_bytes:
            raise _too_large(self.max_bytes)


def _invalid(fmt: str, content_type: str | None, raw: bytes, detail: object) -> DecodeError:
    where = f"Content-Type {content_type}" if content_type is not None else "no Content-Type"
    return DecodeError(
        f"response is not valid {_FORMAT_NAMES[fmt]} ({where}): {detail}",
        body=body_excerpt(raw, BODY_KEEP_CHARS),  # redacted before it is cut
    )


def _is_utf8(charset: str | None) -> bool:
    # ASCII is a subset: its bodies take the UTF-8 fast path too.
    return charset is None or charset == _UTF8 or charset == "ascii"


def _decode_json(
    raw: bytes, content_type: str | None, charset: str | None, _: DecodeOptions
) -> Any:
    try:
        if _is_utf8(charset):
            return json_loads(raw[3:] if raw.startswith(_BOM) else raw)
        return json_loads(raw.decode(charset or _UTF8))
    except ValueError as exc:
        raise _invalid("json", content_type, raw, exc) from exc


def _decode_ndjson(
    raw: bytes, content_type: str | None, charset: str | None, _: DecodeOptions
) -> Any:
    lines: Sequence[bytes | str]
    try:
        lines = _split_lines(raw, charset)
    except ValueError as exc:
        raise _invalid("ndjson", content_type, raw, exc) from exc
    loads: Callable[[bytes | str], Any] = json_loads
    if _ORJSON is not None and _is_utf8(charset) and _orjson_safe(raw):
        loads = _loads_line_fast  # one check for the whole body, not one per line
    out = []
    for index in range(len(lines)):  # not enumerate: mypy joins bytes | str to Sequence[object]
        line = lines[index]
        if not line or line.isspace():
            continue
        try:
            out.append(loads(line))
        except ValueError as exc:
            # The parser saw one line: its "line 1" would mislead, so name the body's line.
            detail = f"line {index + 1}: {exc}"
            if isinstance(exc, json.JSONDecodeError):
                detail = f"line {index + 1}, column {exc.colno}: {exc.msg}"
            raise _invalid("ndjson", content_type, raw, detail) from exc
    return out


def _split_lines(raw: bytes, charset: str | None) -> list[bytes] | list[str]:
    if _is_utf8(charset):
        return (raw[3:] if raw.startswith(_BOM) else raw).split(b"\n")
    return raw.decode(charset or _UTF8).split("\n")


def _loads_line_fast(line: bytes | str) -> Any:
    try:
        return _ORJSON.loads(line)
    except ValueError:
        return _loads_stdlib(line)


def _decode_csv(
    raw: bytes, content_type: str | None, charset: str | None, opts: DecodeOptions
) -> Any:
    import csv  # only CSV bodies need it: not imported at start-up

    codec = _codec(opts.csv_encoding) if opts.csv_encoding is not None else charset
    if _is_utf8(codec):
        codec = "utf-8-sig"  # tolerates a BOM, which spreadsheets like to write
    try:
        text = raw.decode(codec or _UTF8)
    except ValueError as exc:
        raise _invalid("csv", content_type, raw, exc) from exc
    # The body is already bounded by max_body_bytes; the csv module's own 128 KiB cap on a
    # field would only refuse legitimate large values.
    if csv.field_size_limit() < opts.max_body_bytes:
        csv.field_size_limit(opts.max_body_bytes)
    # strict: a quote left open (a cut body) is an error, not one field swallowing the rest.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=opts.csv_delimiter, strict=True)
    try:
        header = next((row for row in reader if row), None)
        if header is None:
            return None
        width = len(header)
        records: list[dict[str, str | None]] = []
        number = 0
        for row in reader:
            if not row:
                continue
            number += 1
            if len(row) == width:
                records.append(dict(zip(header, row, strict=True)))
            elif len(row) < width:
                padded: list[str | None] = [*row, *([None] * (width - len(row)))]
                records.append(dict(zip(header, padded, strict=True)))
            else:
                detail = (
                    f"row {number} (line {reader.line_num}) has {len(row)} fields,"
                    f" the header has {width}"
                )
                raise _invalid("csv", content_type, raw, detail)
    except csv.Error as exc:
        raise _invalid("csv", content_type, raw, f"line {reader.line_num}: {exc}") from exc
    return records


class _StripAll(dict[str, None]):
    """xmltodict's `namespaces` map sending every namespace URI to nothing: prefixes stripped."""

    def __missing__(self, key: str) -> None:
        return None


_STRIP_ALL = _StripAll()


def _refuse_dtd(name: str, sysid: str | None, pubid: str | None, _internal: int) -> None:
    raise DTDForbidden(name, sysid, pubid)


def _refuse_entity(
    name: str,
    _is_parameter: int,
    value: str | None,
    base: str | None,
    sysid: str | None,
    pubid: str | None,
    notation: str | None,
) -> None:
    raise EntitiesForbidden(name, value, base, sysid, pubid, notation)


def _refuse_unparsed_entity(
    name: str, base: str | None, sysid: str | None, pubid: str | None, notation: str | None
) -> None:
    raise EntitiesForbidden(name, None, base, sysid, pubid, notation)


def _refuse_external(context: str, base: str | None, sysid: str | None, pubid: str | None) -> int:
    raise ExternalReferenceForbidden(context, base, sysid, pubid)


def _is_xmlns(name: str) -> bool:
    return name == "xmlns" or name.startswith("xmlns:")


def _without_xmlns(handler: Callable[[str, list[str]], None]) -> Callable[[str, list[str]], None]:
    def start(name: str, attrs: list[str]) -> None:
        if attrs and any(_is_xmlns(key) for key in attrs[::2]):
            kept: list[str] = []
            for i in range(0, len(attrs), 2):
                if not _is_xmlns(attrs[i]):
                    kept += attrs[i : i + 2]
            attrs = kept
        handler(name, attrs)

    return start


def _depth_counted(
    handler: Callable[[str, list[str]], None], depth: list[int]
) -> Callable[[str, list[str]], None]:
    def start(name: str, attrs: list[str]) -> None:
        depth[0] += 1
        if depth[0] > MAX_XML_DEPTH:
            # Deeper data would break the recursive writers (JSON) with a RecursionError.
            raise ValueError(f"XML nested deeper than {MAX_XML_DEPTH} elements")
        handler(name, attrs)

    return start


def _depth_released(handler: Callable[[str], None], depth: list[int]) -> Callable[[str], None]:
    def end(name: str) -> None:
        depth[0] -= 1
        handler(name)

    return end


class _GuardedParser:
    """The pyexpat parser xmltodict drives, with the handlers that keep it safe left in place.

    A DTD is refused as soon as it starts, before any entity in it is declared or expanded.
    """

    __slots__ = ("_depth", "_keep_namespaces", "_parser")
    _parser: Any
    _keep_namespaces: bool
    _depth: list[int]

    def __init__(self, parser: Any, keep_namespaces: bool) -> None:
        object.__setattr__(self, "_parser", parser)
        object.__setattr__(self, "_keep_namespaces", keep_namespaces)
        object.__setattr__(self, "_depth", [0])

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("StartNamespaceDeclHandler", "EntityDeclHandler"):
            return  # ours refuses entities; namespace declarations would become `@xmlns`
        if name == "StartElementHandler":
            if self._keep_namespaces:
                value = _without_xmlns(value)
            value = _depth_counted(value, self._depth)
        elif name == "EndElementHandler":
            value = _depth_released(value, self._depth)
        setattr(self._parser, name, value)

    def Parse(self, data: bytes | str, isfinal: bool = False) -> int:  # expat's name
        result: int = self._parser.Parse(data, isfinal)
        return result


class _GuardedExpat:
    """Stands in for the `expat` module in `xmltodict.parse(expat=...)`, its documented hook."""

    __slots__ = ("_keep_namespaces",)

    def __init__(self, keep_namespaces: bool) -> None:
        self._keep_namespaces = keep_namespaces

    def ParserCreate(  # expat's name
        self, encoding: str | None = None, namespace_separator: str | None = None
    ) -> _GuardedParser:
        parser = expat.ParserCreate(encoding, namespace_separator)
        parser.StartDoctypeDeclHandler = _refuse_dtd
        parser.EntityDeclHandler = _refuse_entity
        parser.UnparsedEntityDeclHandler = _refuse_unparsed_entity
        parser.ExternalEntityRefHandler = _refuse_external
        return _GuardedParser(parser, self._keep_namespaces)


_EXPAT_STRIP = _GuardedExpat(keep_namespaces=False)
_EXPAT_KEEP = _GuardedExpat(keep_namespaces=True)


def _decode_xml(
    raw: bytes, content_type: str | None, charset: str | None, opts: DecodeOptions
) -> Any:
    # The Content-Type charset wins over the XML declaration (RFC 7303); without one, expat
    # reads the declaration and the BOM.
    data: bytes | str = raw
    encoding = None
    strip = opts.xml_namespaces == "strip"
    # Imported here: xmltodict pulls in urllib.request and more (~25 ms), which a flow
    # without XML, and `runner validate`, should not pay at start-up.
    import xmltodict

    try:
        if charset == _UTF8:
            encoding = _UTF8
        elif charset is not None:
            data = raw.decode(charset)
        return xmltodict.parse(
            data,
            encoding=encoding,
            expat=_EXPAT_STRIP if strip else _EXPAT_KEEP,
            process_namespaces=strip,
            namespaces=_STRIP_ALL if strip else None,
            force_list=opts._force_list,
            attr_prefix=opts.xml_attr_prefix,
            cdata_key=opts.xml_text_key,
        )
    except DefusedXmlException as exc:
        where = f"Content-Type {content_type}" if content_type is not None else "no Content-Type"
        raise DecodeError(
            f"XML with a DTD or entity declarations is refused ({where})",
            body=body_excerpt(raw, BODY_KEEP_CHARS),  # redacted before it is cut
        ) from exc
    except (expat.ExpatError, ValueError) as exc:
        raise _invalid("xml", content_type, raw, exc) from exc


def _decode_text(raw: bytes, charset: str | None) -> str:
    codec = "utf-8-sig" if _is_utf8(charset) else charset
    return raw.decode(codec or _UTF8, "replace")


_Decoder = Callable[[bytes, str | None, str | None, DecodeOptions], Any]
_DECODERS: dict[str, _Decoder] = {
    "json": _decode_json,
    "ndjson": _decode_ndjson,
    "csv": _decode_csv,
    "xml": _decode_xml,
    "text": lambda raw, _ct, charset, _opts: _decode_text(raw, charset),
}


@lru_cache(maxsize=256)
def _format_and_charset(content_type: str | None, fmt: str) -> tuple[str, str | None]:
    return choose_format(content_type, fmt), _charset(content_type)


def decode_body(raw: bytes, content_type: str | None, options: DecodeOptions) -> Any:
    """Decode a body by its format; an empty one (or only whitespace, but for text) is None."""
    if len(raw) > options.max_body_bytes:
        raise _too_large(options.max_body_bytes)
    fmt, charset = _format_and_charset(content_type, options.format)
    if not raw or (fmt != "text" and raw.isspace()):
        return None
    return _DECODERS[fmt](raw, content_type, charset, options)


def decode_lenient(raw: bytes, content_type: str | None, options: DecodeOptions) -> Any:
    """For a non-2xx body: decoded by its format if it can be, else kept as text."""
    try:
        return decode_body(raw, content_type, options)
    except DecodeError:
        if len(raw) > options.max_body_bytes:
            raise
        return _decode_text(raw, _charset(content_type))
