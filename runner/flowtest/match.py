"""Request matching: a live request against recorded entries, and the difference between a
request and its nearest entry, in words an integrator reads.

A request matches an entry of the same method, URL (scheme, host, port, path, and query as a
multiset, less `ignore_query`) and body (JSON compared as values, form bodies as multisets,
multipart bodies with their boundary set aside, other bodies byte for byte, less
`ignore_body`); headers only when the case's `match.headers` names them.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from runner.har import RecordedEntry

from .spec import Match

_DEFAULT_PORTS = {"http": 80, "https": 443}
_MISSING = object()
SHOWN_CHARS = 200


@dataclass(frozen=True, slots=True)
class Shape:
    """A request reduced to what matching compares."""

    method: str
    origin: tuple[str, str, int]
    path: str
    query: tuple[tuple[str, str], ...]  # sorted: a multiset
    body_kind: str  # none | json | form | bytes
    body: Any
    headers: tuple[tuple[str, str], ...]  # only the compared ones, names lower case
    url: str

    @property
    def route(self) -> tuple[object, ...]:
        """What two matching requests share whatever their bodies: a key to index entries."""
        return (self.method, self.origin, self.path, self.query, self.headers)

    def same_request(self, other: Shape) -> bool:
        return (
            self.method == other.method
            and self.origin == other.origin
            and self.path == other.path
            and self.query == other.query
            and self.headers == other.headers
            and _same_body(self, other)
        )


def _same_body(a: Shape, b: Shape) -> bool:
    if a.body_kind == "none" or b.body_kind == "none":
        return _empty(a) and _empty(b)
    return a.body_kind == b.body_kind and a.body == b.body


def _empty(shape: Shape) -> bool:
    return shape.body_kind == "none" or shape.body in (b"", None)


def _split_url(url: str) -> tuple[tuple[str, str, int], str, list[tuple[str, str]]]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    try:
        port = parts.port or _DEFAULT_PORTS.get(scheme, 0)
    except ValueError:
        port = 0
    return (scheme, host, port), unquote(parts.path) or "/", parse_qsl(parts.query, True)


def _drop_path(data: Any, path: list[str]) -> Any:
    """A copy of JSON data without the value at a dotted path (a `*` matches every key or item)."""
    if not path:
        return _MISSING
    head, rest = path[0], path[1:]
    if isinstance(data, dict):
        keys = list(data) if head == "*" else [head]
        out = dict(data)
        for key in keys:
            if key in out:
                value = _drop_path(out[key], rest)
                if value is _MISSING:
                    del out[key]
                else:
                    out[key] = value
        return out
    if isinstance(data, list):
        if head == "*":
            return [v for v in (_drop_path(item, rest) for item in data) if v is not _MISSING]
        if head.isdigit() and int(head) < len(data):
            out_list = list(data)
            value = _drop_path(out_list[int(head)], rest)
            if value is _MISSING:
                del out_list[int(head)]
            else:
                out_list[int(head)] = value
            return out_list
    return data


def _body(mime: str, body: bytes | None, match: Match) -> tuple[str, Any]:
    if not body:
        return "none", None
    lowered = mime.lower()
    if "json" in lowered:
        try:
            data = json.loads(body)
        except ValueError:
            return "bytes", body
        for path in match.ignore_body:
            data = _drop_path(data, path.split("."))
        return "json", data
    if "x-www-form-urlencoded" in lowered:
        try:
            pairs = parse_qsl(body.decode("utf-8"), True)
        except UnicodeDecodeError:
            return "bytes", body
        ignored = set(match.ignore_body)
        return "form", tuple(sorted(p for p in pairs if p[0] not in ignored))
    if "multipart/" in lowered and "boundary=" in lowered:
        boundary = mime[lowered.index("boundary=") + len("boundary=") :].split(";")[0].strip('"')
        if boundary:
            return "bytes", body.replace(boundary.encode(), b"BOUNDARY")
    return "bytes", body


def shape(
    method: str,
    url: str,
    headers: Iterable[tuple[str, str]],
    body: bytes | None,
    match: Match,
) -> Shape:
    """The shape of a request: `url` with its query, already masked as recordings are."""
    origin, path, query = _split_url(url)
    query = [pair for pair in query if pair[0] not in match.ignore_query]
    headers = list(headers)
    mime = next((v for k, v in headers if k.lower() == "content-type"), "")
    kind, value = _body(mime, body, match)
    wanted = {h.lower() for h in match.headers} - match.ignore_headers
    compared = tuple(sorted((k.lower(), v) for k, v in headers if k.lower() in wanted))
    return Shape(method.upper(), origin, path, tuple(sorted(query)), kind, value, compared, url)


def entry_shape(entry: RecordedEntry, match: Match) -> Shape:
    headers = list(entry.headers)
    if entry.body is not None and not any(k.lower() == "content-type" for k, _ in headers):
        headers.append(("Content-Type", entry.body_mime))
    return shape(entry.method, entry.url, headers, entry.body, match)


# ------------------------------------------------------------------------------ differences


def _show(value: Any) -> str:
    if value is _MISSING:
        return "(absent)"
    if isinstance(value, bytes):
        text = value.decode("utf-8", "replace")
    else:
        text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


def json_differences(recorded: Any, sent: Any, path: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(path, recorded value, sent value) for every place where two JSON values differ."""
    if isinstance(recorded, dict) and isinstance(sent, dict):
        for key in list(recorded) + [k for k in sent if k not in recorded]:
            sub = f"{path}.{key}" if path else str(key)
            yield from json_differences(recorded.get(key, _MISSING), sent.get(key, _MISSING), sub)
        return
    if isinstance(recorded, list) and isinstance(sent, list) and len(recorded) == len(sent):
        for i, (a, b) in enumerate(zip(recorded, sent, strict=True)):
            yield from json_differences(a, b, f"{path}[{i}]")
        return
    if recorded != sent or type(recorded) is not type(sent):
        yield path or "(the whole body)", recorded, sent


def _multiset_differences(
    what: str, recorded: Iterable[tuple[str, str]], sent: Iterable[tuple[str, str]]
) -> Iterator[tuple[str, Any, Any]]:
    rec: dict[str, list[str]] = {}
    for k, v in recorded:
        rec.setdefault(k, []).append(v)
    live: dict[str, list[str]] = {}
    for k, v in sent:
        live.setdefault(k, []).append(v)
    for name in list(rec) + [k for k in live if k not in rec]:
        a, b = rec.get(name), live.get(name)
        if Counter(a or []) != Counter(b or []):
            yield f"{what} {name}", _one(a), _one(b)


def _one(values: list[str] | None) -> Any:
    return _MISSING if values is None else (values[0] if len(values) == 1 else values)


def differences(recorded: Shape, sent: Shape) -> list[tuple[str, Any, Any]]:
    """What differs between a recorded request and a sent one: (what, recorded, sent)."""
    out: list[tuple[str, Any, Any]] = []
    if recorded.method != sent.method:
        out.append(("method", recorded.method, sent.method))
    if recorded.origin != sent.origin:
        out.append(("origin", _origin_text(recorded.origin), _origin_text(sent.origin)))
    if recorded.path != sent.path:
        out.append(("path", recorded.path, sent.path))
    out += _multiset_differences("query", recorded.query, sent.query)
    out += _multiset_differences("header", recorded.headers, sent.headers)
    if not _same_body(recorded, sent):
        if recorded.body_kind == sent.body_kind == "json":
            out += [(f"body {p}", a, b) for p, a, b in json_differences(recorded.body, sent.body)]
        elif recorded.body_kind == sent.body_kind == "form":
            out += _multiset_differences("form field", recorded.body, sent.body)
        else:
            out.append(("body", _raw(recorded), _raw(sent)))
    return out


def _origin_text(origin: tuple[str, str, int]) -> str:
    return f"{origin[0]}://{origin[1]}:{origin[2]}"


def _raw(shape: Shape) -> Any:
    if shape.body_kind == "none":
        return _MISSING
    if shape.body_kind == "json":
        return shape.body
    if shape.body_kind == "form":
        return "&".join(f"{k}={v}" for k, v in shape.body)
    return shape.body


def format_differences(diffs: list[tuple[str, Any, Any]]) -> list[str]:
    return [f"{what}: recorded {_show(a)}, sent {_show(b)}" for what, a, b in diffs]


def nearest(
    sent: Shape, candidates: list[tuple[RecordedEntry, Shape, bool]]
) -> tuple[RecordedEntry, Shape, bool] | None:
    """The entry closest to a request: the same method and path first, unused ones first,
    then the fewest differences, then recorded order."""
    if not candidates:
        return None

    def rank(item: tuple[RecordedEntry, Shape, bool]) -> tuple[int, int, int, int]:
        entry, recorded, used = item
        same_route = recorded.method == sent.method and recorded.path == sent.path
        return (0 if same_route else 1, 1 if used else 0, len(differences(recorded, sent)),
                entry.index)  # fmt: skip

    return min(candidates, key=rank)
