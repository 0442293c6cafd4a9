"""HTTP Archive (HAR 1.2) recordings: entries built from a run's exchanges, secrets masked,
written on every exit; and the same files read back for replay.

`runner run FLOW --record F.har` keeps every attempt, redirect hop and token or login
request in the order sent. Entries are spooled to `F.har.partial` as they complete (a
crash keeps what was sent) and the final file is written at exit, redacted again with the
run's final set of secrets.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from .messages import PreparedRequest, Response
from .redact import MASK, Redactor

HAR_VERSION = "1.2"
CREATOR = {"name": "runner", "version": "0.1.0"}
# Replaced whole, whatever the secrets: they carry credentials by definition.
MASKED_HEADERS = frozenset({"authorization", "cookie", "set-cookie", "proxy-authorization"})
# Keys of a token or login response whose values are credentials.
TOKEN_KEYS = frozenset({"access_token", "refresh_token", "id_token"})
ERROR_KINDS = ("timeout", "reset", "refused")
_TEXT_TYPES = ("json", "xml", "text/", "csv", "javascript", "x-www-form-urlencoded", "ndjson")


def iso_ms(moment: datetime) -> str:
    """`2024-05-01T12:00:00.000Z`: what browsers write in `startedDateTime`."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso(text: str) -> datetime:
    """A HAR or test-file date (`Z` or an offset; no zone is UTC) as an aware datetime."""
    moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _is_text(mime: str | None, body: bytes) -> bool:
    if not body:
        return True
    lowered = (mime or "").lower()
    if mime and not any(t in lowered for t in _TEXT_TYPES):
        return False
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def body_text(mime: str | None, body: bytes) -> tuple[str, str | None]:
    """A body as HAR keeps it: UTF-8 text, or base64 (with `encoding: base64`) for binary."""
    if _is_text(mime, body):
        return body.decode("utf-8"), None
    return base64.b64encode(body).decode("ascii"), "base64"


def body_bytes(text: str | None, encoding: str | None) -> bytes:
    if not text:
        return b""
    if encoding == "base64":
        return base64.b64decode(text)
    return text.encode("utf-8")


def _header_list(headers: Iterable[tuple[str, str]]) -> list[dict[str, str]]:
    return [
        {"name": name, "value": MASK if name.lower() in MASKED_HEADERS else value}
        for name, value in headers
    ]


def _mask_token_values(data: Any) -> Any:
    if isinstance(data, dict):
        return {
            k: (MASK if k in TOKEN_KEYS and isinstance(v, str) else _mask_token_values(v))
            for k, v in data.items()
        }
    if isinstance(data, list):
        return [_mask_token_values(v) for v in data]
    return data


def mask_token_body(text: str) -> str:
    """A token or login response keeps its shape; access, refresh and id tokens become `***`
    (the session's selected token and every other secret are masked by the redactor)."""
    try:
        data = json.loads(text)
    except ValueError:
        pairs = parse_qsl(text, keep_blank_values=True)
        if not pairs or "=" not in text:
            return text
        return urlencode([(k, MASK if k in TOKEN_KEYS else v) for k, v in pairs])
    return json.dumps(_mask_token_values(data), ensure_ascii=False, separators=(",", ":"))


@dataclass(slots=True)
class Exchange:
    """One attempt of one hop as the recorder saw it, before it becomes a HAR entry."""

    seq: int
    started: datetime
    elapsed_ms: float
    request: PreparedRequest
    url: str  # with the query
    service: str
    auth: bool  # a token or login request
    response: Response | None = None
    error: str | None = None  # timeout | reset | refused, or another failure's message
    message: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def entry_of(exchange: Exchange) -> dict[str, Any]:
    """The HAR entry of an exchange; credential headers and token values already masked."""
    request = exchange.request
    headers = list(request.headers.items())
    if request.cookies:
        headers.append(("Cookie", "; ".join(f"{k}={v}" for k, v in request.cookies.items())))
    query = [{"name": k, "value": v} for k, v in parse_qsl(urlsplit(exchange.url).query, True)]
    har_request: dict[str, Any] = {
        "method": request.method,
        "url": exchange.url,
        "httpVersion": "HTTP/1.1",
        "cookies": [],
        "headers": _header_list(headers),
        "queryString": query,
        "headersSize": -1,
        "bodySize": len(request.body) if request.body is not None else 0,
    }
    if request.body is not None:
        mime = next((v for k, v in request.headers.items() if k.lower() == "content-type"), "")
        text, encoding = body_text(mime, request.body)
        post: dict[str, Any] = {"mimeType": mime or "application/octet-stream", "text": text}
        if encoding:
            post["_encoding"] = encoding  # HAR's postData has no encoding field of its own
        har_request["postData"] = post
    response = exchange.response
    if response is None:
        har_response: dict[str, Any] = {
            "status": 0,
            "statusText": "",
            "httpVersion": "",
            "cookies": [],
            "headers": [],
            "content": {"size": 0, "mimeType": ""},
            "redirectURL": "",
            "headersSize": -1,
            "bodySize": -1,
        }
    else:
        mime = response.headers.get("content-type", "")
        text, encoding = body_text(mime, response.body)
        if exchange.auth and encoding is None:
            text = mask_token_body(text)
        content: dict[str, Any] = {"size": len(response.body), "mimeType": mime, "text": text}
        if encoding:
            content["encoding"] = encoding
        har_response = {
            "status": response.status,
            "statusText": response.reason,
            "httpVersion": "HTTP/1.1",
            "cookies": [],
            "headers": _header_list(response.headers.items()),
            "content": content,
            "redirectURL": response.headers.get("location", ""),
            "headersSize": -1,
            "bodySize": len(response.body),
        }
    elapsed = round(exchange.elapsed_ms, 3)
    entry: dict[str, Any] = {
        "startedDateTime": iso_ms(exchange.started),
        "time": elapsed,
        "request": har_request,
        "response": har_response,
        "cache": {},
        "timings": _timings(elapsed),
        "_service": exchange.service,
    }
    if exchange.auth:
        entry["_auth"] = True
    if exchange.error is not None:
        entry["_error"] = exchange.error
    if exchange.message:
        entry["_message"] = exchange.message
    entry.update(exchange.extra)
    return entry


def _timings(elapsed: float) -> dict[str, float]:
    # The runner does not time the phases of a request: all of it counts as waiting.
    return {"blocked": -1, "dns": -1, "connect": -1, "ssl": -1, "send": 0, "wait": elapsed,
            "receive": 0}  # fmt: skip


def har_document(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {"log": {"version": HAR_VERSION, "creator": dict(CREATOR), "entries": entries}}


class HarWriter:
    """Spools entries as they complete; `close` writes the final, redacted HAR file."""

    def __init__(self, path: str | os.PathLike[str], redactor: Redactor) -> None:
        self.path = os.fspath(path)
        self.partial = self.path + ".partial"
        self._redactor = redactor
        self._spool = open(self.partial, "w", encoding="utf-8")  # noqa: SIM115 (open until close)
        self._closed = False

    def add(self, exchange: Exchange) -> None:
        if self._closed:
            return
        entry = self._redactor.redact_data(entry_of(exchange))
        self._spool.write(json.dumps([exchange.seq, entry], ensure_ascii=False) + "\n")
        self._spool.flush()

    def close(self) -> None:
        """The final file, entries in the order sent, redacted with every secret known now."""
        if self._closed:
            return
        self._closed = True
        self._spool.close()
        numbered: list[tuple[int, dict[str, Any]]] = []
        with open(self.partial, encoding="utf-8") as spool:
            for line in spool:
                if line.strip():
                    seq, entry = json.loads(line)
                    numbered.append((seq, entry))
        numbered.sort(key=lambda pair: pair[0])
        entries = [self._redact_entry(entry) for _, entry in numbered]
        text = json.dumps(har_document(entries), ensure_ascii=False, indent=1) + "\n"
        from .outputs import atomic_write

        atomic_write(self.path, text.encode("utf-8"))
        os.unlink(self.partial)

    def _redact_entry(self, entry: dict[str, Any]) -> dict[str, Any]:
        redacted = self._redactor.redact_data(entry)
        assert isinstance(redacted, dict)
        for part, key in (("request", "postData"), ("response", "content")):
            holder = redacted.get(part, {}).get(key)
            if isinstance(holder, dict) and "text" in holder:
                encoding = holder.get("encoding") or holder.get("_encoding")
                if encoding == "base64":
                    holder["text"] = self._redact_binary(holder["text"])
        return redacted

    def _redact_binary(self, text: str) -> str:
        # A binary body's bytes, read as Latin-1 so that an ASCII secret in it is found.
        raw = base64.b64decode(text).decode("latin-1")
        return base64.b64encode(self._redactor.redact(raw).encode("latin-1")).decode("ascii")


# ---------------------------------------------------------------------------- reading


class HarFormatError(ValueError):
    """A file that is not a HAR 1.2 recording this runner can replay; names the place."""


@dataclass(slots=True)
class RecordedEntry:
    """One recorded exchange, ready to be matched and replayed."""

    index: int
    method: str
    url: str
    headers: list[tuple[str, str]]
    body: bytes | None
    body_mime: str
    started: datetime | None
    status: int
    reason: str
    response_headers: dict[str, str]  # lower-case names, repeated values joined
    response_body: bytes
    error: str | None
    message: str | None
    auth: bool
    service: str | None


def _pairs(value: Any, where: str) -> list[tuple[str, str]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise HarFormatError(f"{where}: expected a list of {{name, value}}")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
            raise HarFormatError(f"{where}[{i}]: expected {{name, value}}")
        out.append((item["name"], str(item.get("value", ""))))
    return out


def read_entries(data: Any) -> list[RecordedEntry]:
    """The entries of a parsed HAR document; HarFormatError names what is wrong and where."""
    log = data.get("log") if isinstance(data, Mapping) else None
    if not isinstance(log, Mapping) or not isinstance(log.get("entries"), list):
        raise HarFormatError("not a HAR file: no log.entries")
    entries = []
    for i, raw in enumerate(log["entries"]):
        where = f"log.entries[{i}]"
        if not isinstance(raw, Mapping):
            raise HarFormatError(f"{where}: expected an object")
        request = raw.get("request")
        response = raw.get("response") or {}
        if not isinstance(request, Mapping) or not isinstance(request.get("url"), str):
            raise HarFormatError(f"{where}.request: needs method and url")
        if not isinstance(response, Mapping):
            raise HarFormatError(f"{where}.response: expected an object")
        error = raw.get("_error")
        if error is not None and not isinstance(error, str):
            raise HarFormatError(f"{where}._error: expected one of {', '.join(ERROR_KINDS)}")
        post = request.get("postData")
        body: bytes | None = None
        mime = ""
        if isinstance(post, Mapping):
            mime = str(post.get("mimeType") or "")
            if "text" in post:
                body = body_bytes(post.get("text"), post.get("_encoding") or post.get("encoding"))
            elif "params" in post:
                params = _pairs(post.get("params"), f"{where}.request.postData.params")
                body = urlencode(params).encode()
        content = response.get("content") or {}
        started = raw.get("startedDateTime")
        try:
            started_at = parse_iso(started) if isinstance(started, str) else None
        except ValueError as exc:
            raise HarFormatError(f"{where}.startedDateTime: {exc}") from exc
        response_headers: dict[str, str] = {}
        for name, value in _pairs(response.get("headers"), f"{where}.response.headers"):
            key = name.lower()
            response_headers[key] = (
                f"{response_headers[key]}, {value}" if key in response_headers else value
            )
        try:
            status = int(response.get("status") or 0)
        except (TypeError, ValueError) as exc:
            raise HarFormatError(f"{where}.response.status: not a number") from exc
        if error is None and status == 0:
            raise HarFormatError(
                f"{where}: response.status 0 needs _error ({', '.join(ERROR_KINDS)})"
            )
        entries.append(
            RecordedEntry(
                index=i,
                method=str(request.get("method") or "GET").upper(),
                url=request["url"],
                headers=_pairs(request.get("headers"), f"{where}.request.headers"),
                body=body,
                body_mime=mime,
                started=started_at,
                status=status,
                reason=str(response.get("statusText") or ""),
                response_headers=response_headers,
                response_body=body_bytes(content.get("text"), content.get("encoding")),
                error=error,
                message=raw.get("_message") if isinstance(raw.get("_message"), str) else None,
                auth=bool(raw.get("_auth")),
                service=raw.get("_service") if isinstance(raw.get("_service"), str) else None,
            )
        )
    return entries


def load_har(path: str | os.PathLike[str]) -> list[RecordedEntry]:
    from .codec import json_loads  # orjson when installed: recordings can be large

    with open(path, "rb") as handle:
        raw = handle.read()
    try:
        data = json_loads(raw)
    except ValueError as exc:
        raise HarFormatError(f"not valid JSON: {exc}") from exc
    del raw
    return read_entries(data)
