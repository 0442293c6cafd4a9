"""Response decoding (JSON, NDJSON, CSV, XML, text) and body size limits."""

from __future__ import annotations

import codecs
import io
import json
import re
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any
from xml.parsers import expat

from defusedxml import (
    DefusedXmlException,
    DTDForbidden,
    EntitiesForbidden,
    ExternalReferenceForbidden,
)

from runner.codec import json_lines_loader, json_loads
from runner.errors import BODY_KEEP_CHARS, DecodeError
from runner.messages import (
    DEFAULT_MAX_BODY_BYTES,
    FORMATS,
    XML_NAMESPACES,
    DecodeOptions,
    text_codec,
)

# The options live with the other plain settings (messages), so that loading a flow does not
# import the decoders; they are named here too, beside what they configure.
__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "FORMATS",
    "XML_NAMESPACES",
    "BodyLimit",
    "DecodeOptions",
    "body_excerpt",
    "choose_format",
    "decode_body",
    "decode_lenient",
    "unpack_payload",
]

_FORMAT_NAMES = {"json": "JSON", "ndjson": "NDJSON", "csv": "CSV", "xml": "XML", "text": "text"}
_NDJSON_TYPES = frozenset({"application/x-ndjson", "application/ndjson", "application/jsonl"})
_XML_TYPES = frozenset({"application/xml", "text/xml"})
# Elements nested in elements, at most: each level becomes an object, and the JSON writers
# stop at 255 levels (orjson), or at Python's recursion limit.
MAX_XML_DEPTH = 200
_UTF8 = "utf-8"
_BOM = codecs.BOM_UTF8

if TYPE_CHECKING:
    from runner.messages import Response
    from runner.redact import Redactor


# ---------------------------------------------------------------------------------------------
# Options and content types


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
            charset = text_codec(value.strip().strip("\"'"))
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
    loads = json_lines_loader(raw, utf8=_is_utf8(charset))
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


def _decode_csv(
    raw: bytes, content_type: str | None, charset: str | None, opts: DecodeOptions
) -> Any:
    import csv  # only CSV bodies need it: not imported at start-up

    codec = text_codec(opts.csv_encoding) if opts.csv_encoding is not None else charset
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
        if _looks_like_html(raw, content_type):  # <!DOCTYPE html> is a DTD to expat
            raise _not_html(where, raw) from exc
        raise DecodeError(
            f"XML with a DTD or entity declarations is refused ({where})",
            body=body_excerpt(raw, BODY_KEEP_CHARS),  # redacted before it is cut
        ) from exc
    except (expat.ExpatError, ValueError) as exc:
        if _looks_like_html(raw, content_type):
            where = f"Content-Type {content_type}" if content_type else "no Content-Type"
            raise _not_html(where, raw) from exc
        raise _invalid("xml", content_type, raw, exc) from exc


_HTML_START = re.compile(rb"\s*(?:<!--.*?-->\s*)*<(?:!doctype\s+html|html)[\s>]", re.I | re.S)


def _looks_like_html(raw: bytes, content_type: str | None) -> bool:
    """An HTML page (an error or login page, often) where XML was expected."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "text/html" or bool(_HTML_START.match(raw[:1024].lstrip(_BOM)))


def _not_html(where: str, raw: bytes) -> DecodeError:
    return DecodeError(
        f"response is HTML, not XML ({where})",
        body=body_excerpt(raw, BODY_KEEP_CHARS),
    )


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


# ---------------------------------------------------------------------------------------------
# Compressed payloads (a `.csv.gz` file, `application/gzip`), after Content-Encoding

_GZIP_MAGIC = b"\x1f\x8b"
_GZIP_TYPES = frozenset({"application/gzip", "application/x-gzip"})
_SUFFIX_FORMATS = {
    ".csv.gz": "csv",
    ".tsv.gz": "csv",
    ".json.gz": "json",
    ".ndjson.gz": "ndjson",
    ".jsonl.gz": "ndjson",
    ".xml.gz": "xml",
}


def _url_path(url: str) -> str:
    # The suffix is the path's, never the query's (`?name=x.gz`).
    from urllib.parse import urlsplit

    return urlsplit(url).path.lower()


def unpack_payload(
    raw: bytes, content_type: str | None, url: str, options: DecodeOptions
) -> tuple[bytes, DecodeOptions]:
    """A gzip payload inflated (bounded by `max_body_bytes`), and the options to decode it by:
    under `format: auto`, a URL path ending in `.csv.gz`, `.json.gz`, `.ndjson.gz` or
    `.xml.gz` gives the format. `auto` inflates a body that starts as gzip does and is
    `application/gzip` or comes from a `.gz` path; a body whose Content-Encoding the transport
    already undid is not one any more. `gzip` inflates whatever the headers say."""
    if options.compression == "none":
        return raw, options
    path = _url_path(url)
    if options.compression == "auto":
        media = _parse_content_type(content_type)[0] if content_type is not None else ""
        if not (media in _GZIP_TYPES or path.endswith(".gz")):
            return raw, options
        if not raw.startswith(_GZIP_MAGIC):
            return raw, options
    elif not raw:
        return raw, options
    data = _gunzip(raw, options.max_body_bytes)
    if options.format == "auto":
        for suffix, fmt in _SUFFIX_FORMATS.items():
            if path.endswith(suffix):
                return data, _with_format(options, fmt)
    return data, options


@lru_cache(maxsize=64)
def _with_format(options: DecodeOptions, fmt: str) -> DecodeOptions:
    import dataclasses

    return dataclasses.replace(options, format=fmt)


def _gunzip(raw: bytes, max_bytes: int) -> bytes:
    import zlib

    if not raw.startswith(_GZIP_MAGIC):
        raise DecodeError(
            "response is not gzip (compression: gzip)", body=body_excerpt(raw, BODY_KEEP_CHARS)
        )
    limit = BodyLimit(max_bytes)
    chunks: list[bytes] = []
    data = raw
    try:
        # A gzip file may hold several members one after another (`cat a.gz b.gz`).
        while data:
            inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            pending = data
            while pending and not inflater.eof:
                out = inflater.decompress(pending, 64 * 1024)
                limit.add(out)
                chunks.append(out)
                pending = inflater.unconsumed_tail
            if not inflater.eof:
                raise DecodeError("gzip payload ends before its end marker")
            data = inflater.unused_data
            if data and not data.startswith(_GZIP_MAGIC):
                break  # trailing garbage after the last member, as gzip(1) ignores it
    except zlib.error as exc:
        raise DecodeError(f"response is not valid gzip: {exc}") from exc
    return b"".join(chunks)


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


# -- receiving ------------------------------------------------------------------------------


def receive(
    response: Response, options: DecodeOptions, redactor: Redactor, method: str | None = None
) -> None:
    """Decodes a final response's body into `response.data` (the raw bytes stay in `body`).

    A 2xx body must decode (DecodeError, located by the request's method, the final URL and
    the status); any other is decoded leniently, for the rules and the error message to read
    what they can.
    """
    raw = response.body
    ctype = response.content_type
    if 200 <= response.status < 300:
        try:
            raw, unpacked = unpack_payload(raw, ctype, response.url, options)
            data = decode_body(raw, ctype, unpacked)
        except DecodeError as exc:
            raise exc.in_context(
                method=method,
                url=redactor.redact(response.url),
                status=response.status,
                reason=response.reason,
            ) from exc.__cause__
    else:
        data = decode_lenient(raw, ctype, options)
    response.data = data
