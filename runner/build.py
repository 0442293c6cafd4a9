"""Building: a step's request rendered from its scope (URL, query, headers, body, the page
token), the request for a next-page URL, and the scheme and origin checks they pass."""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from .errors import RenderError, RunError, SecurityError
from .http import without_credentials
from .messages import PreparedRequest, is_loopback
from .model import ServiceSpec, StepSpec
from .paginate import Pagination
from .redact import Redactor
from .wire import build_url, encode_multipart, encode_query, origin

# What a base_url of text and lookups may read to be rendered once per run: names whose
# values never change during it.
RUN_CONSTANT_NAMES = frozenset({"env", "inputs", "secrets", "run"})
CONTENT_TYPES = {".xml": "application/xml", ".json": "application/json", ".html": "text/html"}

# Fetches a service's token before its base_url renders, when the base_url reads
# `auth.<service>` (sending's business: the builder only asks for it).
ObtainToken = Callable[[str, dict[str, Any]], Awaitable[None]]


class Builder:
    """Builds the requests of one run; remembers what needs doing once per run (base URLs
    of run constants, origins whose scheme was checked)."""

    __slots__ = (
        "_auth_scope",
        "_checked_origins",
        "_fixed_base_urls",
        "_obtain_token",
        "_upload_roots",
        "redactor",
        "services",
    )

    def __init__(
        self,
        services: Mapping[str, ServiceSpec],
        redactor: Redactor,
        obtain_token: ObtainToken,
        auth_scope: Mapping[str, Any],
        upload_roots: tuple[str, ...] = (),
    ) -> None:
        self.services = services
        self.redactor = redactor
        self._obtain_token = obtain_token
        self._auth_scope = auth_scope
        self._fixed_base_urls: dict[str, str] = {}  # rendered once per run
        self._checked_origins: set[tuple[str, bool]] = set()
        # The flow's folder, then the --files-dir folders: where multipart files may be.
        self._upload_roots = tuple(os.path.realpath(root) for root in upload_roots)

    async def request(
        self, step: StepSpec, scope: dict[str, Any], pager: Pagination
    ) -> PreparedRequest:
        """The step's request for this scope, with the page token where `paginate.in` says."""
        spec = step.request
        assert spec is not None
        service = self.services.get(spec.service) if spec.service else None
        headers: dict[str, str] = {}
        base_url = ""
        if service is not None:
            if service.base_url is not None:
                base_url = self._fixed_base_urls.get(service.name) or await self._base_url(
                    service, scope
                )
            if service.headers is not None:
                headers.update(_header_values(service.headers.render(scope)))
        if spec.url is not None:
            url = _as_str(spec.url.render(scope), "url")
        else:
            path = _as_str(spec.path.render(scope), "path") if spec.path is not None else ""
            url = build_url(base_url, path)
        self._check_scheme(url, service.allow_insecure_http if service else False)
        if spec.headers is not None:
            headers.update(_header_values(spec.headers.render(scope)))
        query_data = dict(spec.query.render(scope)) if spec.query is not None else {}
        body: bytes | None = None
        json_body: Any = None
        if spec.body_kind == "json":
            assert spec.body is not None
            json_body = spec.body.render(scope)
        elif spec.body_kind == "form":
            assert spec.body is not None
            body = _form_bytes(spec.body.render(scope))
            _default_content_type(headers, "application/x-www-form-urlencoded")
        elif spec.body_kind == "multipart":
            assert spec.body is not None
            body, content_type = encode_multipart(spec.body.render(scope), self._upload_path)
            headers["Content-Type"] = content_type
        elif spec.body_kind == "body":
            assert spec.body is not None
            body = str(spec.body.render(scope)).encode("utf-8")
            ctype = spec.content_type.render(scope) if spec.content_type else "text/plain"
            _default_content_type(headers, str(ctype))
        elif spec.body_kind == "body_file":
            assert spec.body_template is not None and spec.body_file is not None
            body = str(spec.body_template.render(scope)).encode("utf-8")
            suffix = os.path.splitext(spec.body_file)[1].lower()
            default_type = CONTENT_TYPES.get(suffix, "text/plain")
            ctype = spec.content_type.render(scope) if spec.content_type else default_type
            _default_content_type(headers, str(ctype))
        # The page token goes where `paginate.in` says.
        location = step.paginate.location if step.paginate else "query"
        for param, value in pager.tokens() if step.paginate is not None else ():
            if location == "query":
                query_data[param] = value
            elif location == "header":
                headers[param] = _header_value(value)
            elif location == "body":
                json_body = _set_body_path(json_body, param, value)
        if spec.body_kind == "json" or (json_body is not None and spec.body_kind is None):
            body = json.dumps(json_body, ensure_ascii=False, separators=(",", ":")).encode()
            _default_content_type(headers, "application/json")
        request = PreparedRequest(
            method=spec.method,
            url=url,
            query=encode_query(query_data) if query_data else [],
            headers=headers,
            body=body,
        )
        if base_url and spec.url is not None and origin(url) != origin(base_url):
            # A `url` outside the service's origin (taken from a response, say) gets none of
            # the service's credentials: no auth (sending checks it too), no header holding a
            # secret.
            request = without_credentials(request, self._contains_secret)
        return request

    def next_page(self, step: StepSpec, previous: PreparedRequest, url: str) -> PreparedRequest:
        """The request for a next URL: same method, body, headers and auth; the URL as given."""
        name = step.request.service if step.request else None
        service = self.services.get(name) if name else None
        allowed = service is not None and service.allow_cross_host
        if origin(url) != origin(previous.url) and not allowed:
            raise SecurityError(
                f"next page URL {self.redactor.redact(url)} is on another origin than "
                f"{self.redactor.redact(previous.url)}; set allow_cross_host: true on the "
                "service to follow it",
                method=previous.method,
            )
        request = PreparedRequest(
            method=previous.method,
            url=url,
            query=[],
            headers=dict(previous.headers),
            body=previous.body,
            cookies=dict(previous.cookies),
            sensitive_headers=set(previous.sensitive_headers),
        )
        if origin(url) != origin(previous.url):
            # allow_cross_host follows the data, not the credentials: the flow's own
            # Authorization and every header holding a secret stay behind.
            request = without_credentials(request, self._contains_secret)
        return request

    def _contains_secret(self, text: str) -> bool:
        return bool(self.redactor) and self.redactor.redact(text) != text

    def _upload_path(self, path: str) -> str:
        """A multipart `file:` as a path to read: relative to the flow's folder, and inside it
        or a folder named with --files-dir (symbolic links resolved), never elsewhere."""
        if not self._upload_roots:
            return path  # a Builder made without a flow (tests of building alone)
        full = os.path.realpath(os.path.join(self._upload_roots[0], path))
        if not any(os.path.commonpath([root, full]) == root for root in self._upload_roots):
            raise SecurityError(
                f"multipart file {path!r} is outside the flow's folder"
                + (" and --files-dir" if len(self._upload_roots) > 1 else "")
                + ": name its folder with --files-dir to upload it"
            )
        return full

    async def _base_url(self, service: ServiceSpec, scope: dict[str, Any]) -> str:
        """The service's base_url, rendered; kept for the run when nothing in it can change."""
        template = service.base_url
        assert template is not None
        if "auth" in template.names and service.name not in self._auth_scope:
            await self._obtain_token(service.name, scope)
        base_url = _as_str(template.render(scope), "base_url")
        if template.lookups_only and template.names <= RUN_CONSTANT_NAMES:
            self._fixed_base_urls[service.name] = base_url
        return base_url

    def _check_scheme(self, url: str, allow_insecure: bool) -> None:
        # Checked once per scheme://host[:port] prefix: the same few origins come back on
        # every request.
        scheme_end = url.find("://")
        path_start = url.find("/", scheme_end + 3) if scheme_end >= 0 else -1
        key = (url if path_start < 0 else url[:path_start], allow_insecure)
        if key in self._checked_origins:
            return
        self._check_scheme_now(url, allow_insecure)
        self._checked_origins.add(key)

    def _check_scheme_now(self, url: str, allow_insecure: bool) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RunError(f"not an absolute http(s) URL: {self.redactor.redact(url)!r}")
        if parts.scheme == "http" and not allow_insecure and not is_loopback(parts.hostname):
            raise SecurityError(
                f"plain http:// to {parts.hostname} is refused: use https, or set "
                "allow_insecure_http: true on the service",
                url=self.redactor.redact(url),
            )


def type_name(value: Any) -> str:
    """`null`, `an object`, `a list`...: a JSON value's type in an error message."""
    if value is None:
        return "null"
    return {dict: "an object", str: "a string", bool: "a boolean"}.get(
        type(value), f"a {type(value).__name__}"
    )


def _as_str(value: Any, what: str) -> str:
    if value is None:
        raise RenderError(f"{what} rendered to null")
    return value if isinstance(value, str) else str(value)


def _header_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _default_content_type(headers: dict[str, str], value: str) -> None:
    """Content-Type for the body, unless the flow's headers set one (in any letter case)."""
    if not any(name.lower() == "content-type" for name in headers):
        headers["Content-Type"] = value


def _header_values(headers: Any) -> dict[str, str]:
    if not isinstance(headers, Mapping):
        raise RenderError(f"headers rendered to {type_name(headers)}, not an object")
    return {str(k): _header_value(v) for k, v in headers.items() if v is not None}


def _form_bytes(data: Any) -> bytes:
    from urllib.parse import urlencode

    if not isinstance(data, Mapping):
        raise RenderError(f"form rendered to {type_name(data)}, not an object")
    return urlencode(encode_query(data)).encode("ascii")


def _set_body_path(body: Any, path: str, value: Any) -> Any:
    """Set `a.b.c` in a JSON body (for `paginate.in: body`), creating objects on the way."""
    root = dict(body) if isinstance(body, Mapping) else {}
    node = root
    parts = path.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        child = dict(child) if isinstance(child, Mapping) else {}
        node[part] = child
        node = child
    node[parts[-1]] = value
    return root
