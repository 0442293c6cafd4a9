"""The wire forms of a request's parts: a base URL joined with a path, query values and
multipart bodies encoded, and a URL's origin. Shared by building (build.py), sending
(http.py) and the auth layer; no I/O here."""

from __future__ import annotations

import json
import mimetypes
import os
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from yarl import URL

from runner.errors import RenderError, RunError


def origin(url: str) -> tuple[str, str, int]:
    """Scheme, host and port of an absolute URL, default ports filled in."""
    try:
        parsed = URL(url)
    except (ValueError, TypeError) as exc:
        raise RunError(f"invalid URL: {exc}", url=url) from exc
    return _origin(parsed, url)


def _origin(parsed: URL, shown: str) -> tuple[str, str, int]:
    if not parsed.absolute or parsed.host is None or parsed.port is None:
        raise RunError("not an absolute URL", url=shown)
    return parsed.scheme.lower(), parsed.host.lower(), parsed.port


def build_url(base_url: str, path: str) -> str:
    """`base_url` without its trailing `/`, then `path` (yarl's join would drop the base path)."""
    if path and not path.startswith("/"):
        path = "/" + path
    return base_url.rstrip("/") + path


def _query_value(value: Any) -> str | None:
    if value is None:
        return None
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return str(value)


def encode_query(query: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Null omitted, booleans `true`/`false`, a list repeats its key, an object as compact JSON."""
    pairs: list[tuple[str, str]] = []
    for key, value in query.items():
        if isinstance(value, (list, tuple)):
            for item in value:
                text = _query_value(item)
                if text is not None:
                    pairs.append((key, text))
        else:
            text = _query_value(value)
            if text is not None:
                pairs.append((key, text))
    return pairs


def _disposition_name(value: str) -> str:
    # What browsers do (WHATWG multipart/form-data encoding).
    return value.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


def _any_path(path: str) -> str:
    return path


def encode_multipart(
    parts: Mapping[str, Any], resolve_file: Callable[[str], str] = _any_path
) -> tuple[bytes, str]:
    """The body and its Content-Type; file parts are read now, so every attempt sends these bytes.

    A part is a string or `{file, filename, content_type}`; numbers and booleans are sent as
    text (`true`/`false`), a null part is left out. `resolve_file` turns a part's `file` into
    the path to read, or refuses it (the builder: inside the flow's folder or --files-dir).
    """
    encoded: list[tuple[bytes, bytes]] = []  # (part headers, content)
    for name, part in parts.items():
        disposition = f'form-data; name="{_disposition_name(name)}"'
        if isinstance(part, Mapping):
            path = part.get("file")
            unknown = set(part) - {"file", "filename", "content_type"}
            if not isinstance(path, str) or unknown:
                raise RenderError(
                    f"multipart part '{name}': a part is a string or "
                    "{file, filename, content_type}"
                )
            try:
                with open(resolve_file(path), "rb") as handle:
                    content = handle.read()
            except OSError as exc:
                raise RenderError(f"multipart part '{name}': cannot read {path}: {exc}") from exc
            filename = str(part.get("filename") or os.path.basename(path))
            content_type = part.get("content_type") or (
                mimetypes.guess_type(filename)[0] or "application/octet-stream"
            )
            head = (
                f'Content-Disposition: {disposition}; filename="{_disposition_name(filename)}"\r\n'
                f"Content-Type: {content_type}\r\n"
            )
        else:
            text = _query_value(part)
            if text is None:
                continue
            content = text.encode("utf-8")
            head = f"Content-Disposition: {disposition}\r\n"
        encoded.append((head.encode("utf-8"), content))
    boundary = uuid.uuid4().hex
    while any(boundary.encode("ascii") in data for _, data in encoded):
        boundary = uuid.uuid4().hex
    delimiter = b"--" + boundary.encode("ascii")
    chunks: list[bytes] = []
    for part_head, part_content in encoded:
        chunks += [delimiter, b"\r\n", part_head, b"\r\n", part_content, b"\r\n"]
    chunks += [delimiter, b"--\r\n"]
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"
