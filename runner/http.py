"""Per-service aiohttp sessions: timeouts, retries and backoff, rate limits, redirects."""

from __future__ import annotations

import asyncio
import email.utils
import functools
import json
import mimetypes
import os
import random
import re
import ssl
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import unquote_plus
from urllib.request import proxy_bypass

import aiohttp
from aiohttp.helpers import ProxyInfo, proxies_from_env
from multidict import CIMultiDictProxy
from yarl import URL

from runner.decode import BodyLimit, body_excerpt
from runner.errors import (
    BODY_KEEP_CHARS,
    DecodeError,
    RenderError,
    RunError,
    SecurityError,
    UnavailableError,
    UsageError,
)

# Re-exported: the transport's data types live in messages.py, which imports no aiohttp.
from runner.messages import PreparedRequest as PreparedRequest
from runner.messages import Response as Response
from runner.messages import RetryPolicy as RetryPolicy
from runner.messages import Stats as Stats
from runner.messages import Timeouts as Timeouts
from runner.messages import TlsOptions as TlsOptions
from runner.messages import is_loopback as is_loopback
from runner.redact import Redactor


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most `requests` requests in any window of `per_seconds` seconds."""

    requests: int
    per_seconds: float

    def __post_init__(self) -> None:
        if self.requests < 1 or self.per_seconds <= 0:
            raise UsageError(
                f"rate_limit needs requests >= 1 and per_seconds > 0, got {self.requests} "
                f"per {self.per_seconds} s"
            )


class Authorize(Protocol):
    """Credentials for one attempt, provided by the auth layer."""

    async def apply(self, request: PreparedRequest) -> PreparedRequest:
        """A copy of the request with credentials, their header names in sensitive_headers."""
        ...

    async def refresh(self, failed: PreparedRequest) -> bool:
        """Called on a 401: True if the credentials were refreshed (the request is resent once)."""
        ...


class TransportError(UnavailableError):
    """A request that never got a response after all its attempts."""


RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
NOT_PAUSED = float("-inf")
_NO_EXTRA: dict[str, Any] = {}
MAX_REDIRECTS = 10
CHUNK_SIZE = 65536
# X-RateLimit-Reset above this is an epoch time, below it seconds to wait.
EPOCH_THRESHOLD = 1e9
# Never sent to another origin, whatever the auth layer marked.
ALWAYS_SENSITIVE = frozenset({"authorization", "cookie", "proxy-authorization"})
_BODY_HEADERS = frozenset({"content-type", "content-length", "content-encoding"})
_TRANSPORT_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError)


# ---------------------------------------------------------------- URLs and bodies


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


def encode_multipart(parts: Mapping[str, Any]) -> tuple[bytes, str]:
    """The body and its Content-Type; file parts are read now, so every attempt sends these bytes.

    A part is a string or `{file, filename, content_type}`; numbers and booleans are sent as
    text (`true`/`false`), a null part is left out.
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
                with open(path, "rb") as handle:
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


def _check_scheme(url: URL, shown: str, allow_insecure_http: bool) -> None:
    if url.scheme == "https":
        return
    if url.scheme != "http":
        raise SecurityError(f"unsupported URL scheme '{url.scheme}'", url=shown)
    if not allow_insecure_http and not is_loopback(url.host or ""):
        raise SecurityError(
            "plain http:// to a host that is not loopback refused "
            "(set allow_insecure_http: true on the service to allow it)",
            url=shown,
        )


def _full_url(request: PreparedRequest) -> URL:
    try:
        url = URL(request.url, encoded=True)
        return url.extend_query(request.query) if request.query else url
    except (ValueError, TypeError) as exc:
        raise RunError(f"invalid URL: {exc}", url=request.url) from exc


def _strip_query(url: URL, names: set[str]) -> URL:
    """The URL without the named parameters, the others left byte for byte."""
    raw = url.raw_query_string
    if not raw or not names:
        return url
    kept = [pair for pair in raw.split("&") if unquote_plus(pair.split("=", 1)[0]) not in names]
    bare = url.with_query(None)
    return URL(f"{bare}?{'&'.join(kept)}", encoded=True) if kept else bare


def redirect_request(
    request: PreparedRequest,
    status: int,
    location: str,
    *,
    allow_insecure_http: bool = False,
    same_origin: bool = False,
) -> PreparedRequest:
    """The next hop of a redirect, following browsers and RFC 9110.

    303 (and 301/302 after a POST) become a GET without body; 307 and 308 keep both. A hop to
    another origin loses every credential: Authorization, Cookie, Proxy-Authorization, the
    headers marked sensitive, the cookies and the credential query parameters.
    """
    current = _full_url(request)
    try:
        target = current.join(URL(location)).with_fragment(None)
    except (ValueError, TypeError) as exc:
        raise RunError(f"invalid redirect Location {location!r}: {exc}", url=str(current)) from exc
    shown = str(target)
    if current.scheme == "https" and target.scheme == "http":
        raise SecurityError(f"redirect from https to http refused: {shown}", url=str(current))
    _check_scheme(target, shown, allow_insecure_http)
    method = request.method
    body = request.body
    headers = dict(request.headers)
    if (status == 303 and method != "HEAD") or (status in (301, 302) and method == "POST"):
        method, body = "GET", None
        headers = {k: v for k, v in headers.items() if k.lower() not in _BODY_HEADERS}
    cookies = request.cookies
    sensitive_headers = request.sensitive_headers
    sensitive_query = request.sensitive_query
    if _origin(target, shown) != _origin(current, str(current)):
        if same_origin:
            raise SecurityError(
                f"redirect to another origin refused ({status} to "
                f"{target.with_query(None)}): its credentials may not follow",
                url=str(current),
                status=status,
            )
        dropped = ALWAYS_SENSITIVE | {name.lower() for name in sensitive_headers}
        headers = {k: v for k, v in headers.items() if k.lower() not in dropped}
        target = _strip_query(target, sensitive_query)
        cookies, sensitive_headers, sensitive_query = {}, set(), set()
    # The hop's URL keeps the server's query as sent, so `query` stays empty.
    return PreparedRequest(
        method=method,
        url=str(target),
        query=[],
        headers=headers,
        body=body,
        cookies=dict(cookies),
        sensitive_headers=set(sensitive_headers),
        sensitive_query=set(sensitive_query),
    )


# ---------------------------------------------------------------- timing


def backoff_delay(policy: RetryPolicy, attempt: int, rng: random.Random | None = None) -> float:
    """Full jitter: uniform in [0, min(max_delay, initial_delay * multiplier ** (attempt - 1))]."""
    ceiling = min(policy.max_delay, policy.initial_delay * policy.multiplier ** (attempt - 1))
    return (rng or random).uniform(0, ceiling)


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or HTTP date); None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP date is always GMT
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


_RATELIMIT_FIELD = re.compile(r"([A-Za-z-]+)\s*=\s*\"?([0-9.]+)")


def _number(value: str) -> float | None:
    """A header's number; None for anything else (`1.2.3`, `.`): a server's garbage is ignored."""
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return None if number != number else number  # NaN


def _reset_seconds(value: str, now: float) -> float | None:
    reset = _number(value)
    if reset is None:
        return None
    return max(0.0, reset - now) if reset > EPOCH_THRESHOLD else max(0.0, reset)


def rate_limit_wait(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds until the quota resets when the headers say none is left, else None.

    Reads `X-RateLimit-Remaining`/`-Reset`, the IETF draft `RateLimit-Remaining`/`-Reset`, and
    the combined `RateLimit: limit=10, remaining=0, reset=5` (or `r=0;t=5`). A reset above 10^9
    is an epoch time, else seconds. `headers` has lower-case names.
    """
    wall = time.time() if now is None else now
    for prefix in ("x-ratelimit-", "ratelimit-"):
        remaining = headers.get(prefix + "remaining")
        reset = headers.get(prefix + "reset")
        if remaining is not None and reset is not None and remaining.strip() in ("0", "0.0"):
            return _reset_seconds(reset, wall)
    combined = headers.get("ratelimit")
    if combined:
        fields = {k.lower(): v for k, v in _RATELIMIT_FIELD.findall(combined)}
        remaining = fields.get("remaining", fields.get("r"))
        reset = fields.get("reset", fields.get("t"))
        if remaining is not None and reset is not None and _number(remaining) == 0:
            return _reset_seconds(reset, wall)
    return None


Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class SlidingWindow:
    """At most `requests` acquisitions in any window of `per_seconds`: a log of send times."""

    def __init__(self, limit: RateLimit, clock: Clock, sleep: Sleep) -> None:
        self._limit = limit
        self._clock = clock
        self._sleep = sleep
        self._sent: list[list[float]] = []  # one [time] per slot; settle() may move it later
        self._lock = asyncio.Lock()

    async def acquire(self) -> list[float]:
        """Waits for a slot; returns it, to be passed to `settle` when the response begins."""
        # Waiters queue on the lock, so slots are granted in arrival order.
        async with self._lock:
            per = self._limit.per_seconds
            while True:
                now = self._clock()
                self._sent = sent = [slot for slot in self._sent if slot[0] > now - per]
                if len(sent) < self._limit.requests:
                    slot = [now]
                    sent.append(slot)
                    return slot
                await self._sleep(min(slot[0] for slot in sent) + per - now)

    def settle(self, slot: list[float]) -> None:
        """Moves a slot to when its response began. The server counts a request when it
        arrives, some time after it was granted (a new connection takes a while): measuring
        the window from the response keeps the server's count within the limit too."""
        slot[0] = max(slot[0], self._clock())


# ---------------------------------------------------------------- the client


def _ssl_context(tls: TlsOptions) -> ssl.SSLContext | bool:
    if not tls.verify:
        return False
    if tls == TlsOptions():
        return True  # the default: each https request gets default_tls_context()
    try:
        context = ssl.create_default_context(cafile=tls.ca_file)
        if tls.client_cert:
            context.load_cert_chain(tls.client_cert, tls.client_key)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load TLS files: {exc}") from exc
    return context


@functools.cache
def default_tls_context() -> ssl.SSLContext:
    """Verifying, with the system's CAs, for the services with default TLS options; one per
    process, made on its first https request: loading the CA bundle takes ~20 ms that a run
    of plain http:// services need not pay. Passed with each https request, so the runner
    never relies on the contexts aiohttp builds at import (see cli.py)."""
    context = ssl.create_default_context()
    context.set_alpn_protocols(["http/1.1"])  # as aiohttp's own
    return context


def _response_headers(raw: CIMultiDictProxy[str]) -> dict[str, str]:
    headers = {name.lower(): value for name, value in raw.items()}
    if len(headers) == len(raw):
        return headers
    headers = {}  # a repeated header: its values joined in order
    for name, value in raw.items():
        key = name.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return headers


def _describe(exc: BaseException, timeouts: Timeouts) -> str:
    """Names the cause of a transport failure in words an integrator acts on."""
    if isinstance(exc, aiohttp.SocketTimeoutError):
        return f"timed out after {timeouts.read:g} s waiting for data (read timeout)"
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return f"timed out after {timeouts.connect:g} s connecting (connect timeout)"
    if isinstance(exc, aiohttp.ServerTimeoutError):
        return f"timed out after {timeouts.read:g} s waiting for data (read timeout)"
    if isinstance(exc, TimeoutError):
        return f"timed out after {timeouts.total:g} s (total timeout per attempt)"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return f"response body cut short: {exc}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "server disconnected without a response"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {exc}"
    return f"connection failed: {exc or type(exc).__name__}"


class _Attempt(Exception):
    """Internal: a transport failure of one attempt, already described and counted."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ServiceClient:
    """One per service for a run: a ClientSession with its own connector, limits and state."""

    def __init__(
        self,
        name: str,
        *,
        rate_limit: RateLimit | None = None,
        max_concurrency: int | None = None,
        tls: TlsOptions = TlsOptions(),
        cookies: bool = False,
        stats: Stats,
        redactor: Redactor,
        allow_insecure_http: bool = False,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        wall_clock: Clock = time.time,
    ) -> None:
        self.name = name
        self.stats = stats
        self._redactor = redactor
        self._allow_insecure_http = allow_insecure_http
        self._clock = clock
        self._sleep = sleep
        self._wall_clock = wall_clock
        self._ssl = _ssl_context(tls)  # here, so a bad CA file fails before any request
        self._cookies = cookies
        self._max_concurrency = max_concurrency
        self._semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        self._window = SlidingWindow(rate_limit, clock, sleep) if rate_limit else None
        self._paused_until = NOT_PAUSED
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[Timeouts, aiohttp.ClientTimeout] = {}
        self._checked_origins: set[str] = set()
        self._proxies: dict[str, ProxyInfo] = {}  # from the environment, with the session

    def _get_session(self) -> aiohttp.ClientSession:
        # Created on first use: aiohttp wants a running event loop.
        if self._session is None:
            self._proxies = proxies_from_env()
            connector = aiohttp.TCPConnector(limit=self._max_concurrency or 0, ssl=self._ssl)
            # unsafe: internal services are often reached by IP address.
            jar: aiohttp.abc.AbstractCookieJar = (
                aiohttp.CookieJar(unsafe=True) if self._cookies else aiohttp.DummyCookieJar()
            )
            # auto_decompress off: aiohttp accepts a gzip body cut short as complete, and a
            # truncated body must be retried; _read_body inflates and checks the stream's end.
            # trust_env off: it would also add ~/.netrc credentials to any request without
            # an Authorization header (auth: none, a cross-origin hop) and fail one with it.
            # Proxies from the environment are applied by _proxy instead.
            # Accept-Encoding: only what _read_body inflates (aiohttp would offer br and zstd);
            # a request's own header still wins.
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=jar,
                trust_env=False,
                auto_decompress=False,
                headers={"Accept-Encoding": _ACCEPT_ENCODING},
            )
        return self._session

    def _proxy(self, url: URL) -> tuple[URL | None, aiohttp.BasicAuth | None]:
        """The proxy for a URL from HTTP_PROXY, HTTPS_PROXY and NO_PROXY, as trust_env does."""
        info = self._proxies.get(url.scheme)
        if info is None or (url.host is not None and proxy_bypass(url.host)):
            return None, None
        return info.proxy, info.proxy_auth

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def pause_until(self, when: float) -> None:
        """Pauses every request of this service until `when` (on the client's monotonic clock)."""
        self._paused_until = max(self._paused_until, when)

    def _check_scheme_once(self, request: PreparedRequest) -> None:
        """The scheme rule, checked once per scheme://host:port: the same origins come back
        on every request."""
        url = request.url
        scheme_end = url.find("://")
        path_start = url.find("/", scheme_end + 3) if scheme_end >= 0 else -1
        key = url if path_start < 0 else url[:path_start]
        if key not in self._checked_origins:
            _check_scheme(_full_url(request), url, self._allow_insecure_http)
            self._checked_origins.add(key)

    def _client_timeout(self, t: Timeouts) -> aiohttp.ClientTimeout:
        timeout = self._timeouts.get(t)
        if timeout is None:
            # sock_read must be set: without it a server that stalls after headers hangs to total.
            # `connect` goes to sock_connect only: aiohttp's own `connect` would add a timer to
            # every request, reused connections included (the wait for a free connection is
            # bounded by max_concurrency and `total` anyway).
            timeout = aiohttp.ClientTimeout(total=t.total, sock_connect=t.connect, sock_read=t.read)
            self._timeouts[t] = timeout
        return timeout

    async def send(
        self,
        request: PreparedRequest,
        *,
        retry: RetryPolicy,
        timeouts: Timeouts,
        retry_unsafe: bool = False,
        max_body_bytes: int,
        first_attempt: int = 1,
        initial_wait: float | None = None,
        authorize: Authorize | None = None,
        same_origin: bool = False,
    ) -> Response:
        """Sends with retries, redirects, rate limit and 401 refresh; returns the final response.

        A retryable status left after the last attempt is returned as is (the engine's rules
        decide); a transport failure after the last attempt raises TransportError.
        `same_origin`: a redirect to another origin fails (SecurityError) instead of being
        followed without credentials, for requests whose body is the credential.
        """
        started = self._clock()
        attempt = first_attempt
        try:
            self._check_scheme_once(request)
            can_retry = (
                retry_unsafe
                or request.method.upper() in IDEMPOTENT_METHODS
                or any(k.lower() == "idempotency-key" for k in request.headers)
            )
            timeout = self._client_timeout(timeouts)
            wait = initial_wait
            refreshed = False
            resend = first_attempt > 1
            while True:
                if wait:
                    await self._sleep(wait)
                if resend:
                    self.stats.retries += 1
                resend = True
                sent = await authorize.apply(request) if authorize is not None else request
                try:
                    response = await self._follow(
                        sent, retry, timeout, timeouts, max_body_bytes, same_origin
                    )
                except _Attempt as failure:
                    if not can_retry or attempt >= retry.max_attempts:
                        raise TransportError(
                            failure.message, attempts=attempt, elapsed_s=self._since(started)
                        ) from failure.__cause__
                    wait = backoff_delay(retry, attempt)
                    attempt += 1
                    continue
                response.attempts = attempt
                if response.status == 401 and authorize is not None and not refreshed:
                    refreshed = True
                    if await authorize.refresh(sent):
                        wait = None
                        continue  # this resend is not counted toward max_attempts
                if response.status in RETRY_STATUSES and can_retry and attempt < retry.max_attempts:
                    wait = self._retry_wait(response, retry, attempt)
                    attempt += 1
                    continue
                response.elapsed_s = self._since(started)
                return response
        except RunError as exc:
            raise self._located(exc, request, attempt, started) from exc.__cause__

    def _since(self, started: float) -> float:
        return max(0.0, self._clock() - started)

    def _located(
        self, exc: RunError, request: PreparedRequest, attempt: int, started: float
    ) -> RunError:
        if exc.url is None:
            exc.url = str(_safe_url(request))
        exc.redacted(self._redactor.redact)
        return exc.in_context(
            method=request.method, attempts=attempt, elapsed_s=self._since(started)
        )

    def _retry_wait(self, response: Response, retry: RetryPolicy, attempt: int) -> float:
        retry_after = retry_after_seconds(response.headers.get("retry-after"), self._wall_clock())
        if retry_after is None:
            return backoff_delay(retry, attempt)
        if retry_after > retry.max_retry_after:
            raise UnavailableError(
                f"Retry-After of {retry_after:g} s exceeds max_retry_after "
                f"({retry.max_retry_after:g} s)",
                url=response.url,
                status=response.status,
                reason=response.reason,
                body=body_excerpt(response.body, BODY_KEEP_CHARS),
            )
        return retry_after

    async def _follow(
        self,
        request: PreparedRequest,
        retry: RetryPolicy,
        timeout: aiohttp.ClientTimeout,
        timeouts: Timeouts,
        max_body_bytes: int,
        same_origin: bool = False,
    ) -> Response:
        """One attempt: the request and its redirect hops, each hop a request of its own."""
        hops = 0
        while True:
            if self._semaphore is None:
                response = await self._request_now(
                    request, retry, timeout, timeouts, max_body_bytes
                )
            else:
                async with self._semaphore:  # max_concurrency: one hop holds one slot
                    response = await self._request_now(
                        request, retry, timeout, timeouts, max_body_bytes
                    )
            if response.status not in REDIRECT_STATUSES:
                return response
            location = response.headers.get("location")
            if not location:
                return response
            if hops == MAX_REDIRECTS:
                raise RunError(
                    f"too many redirects ({MAX_REDIRECTS})",
                    url=response.url,
                    status=response.status,
                    reason=response.reason,
                )
            hops += 1
            request = redirect_request(
                request,
                response.status,
                location,
                allow_insecure_http=self._allow_insecure_http,
                same_origin=same_origin,
            )

    async def _wait_for_pause(self, retry: RetryPolicy) -> None:
        while (wait := self._paused_until - self._clock()) > 0:
            if wait > retry.max_retry_after:
                raise UnavailableError(
                    f"service '{self.name}' is rate limited for {wait:.0f} s, more than "
                    f"max_retry_after ({retry.max_retry_after:g} s)"
                )
            await self._sleep(wait)

    async def _request_now(
        self,
        request: PreparedRequest,
        retry: RetryPolicy,
        timeout: aiohttp.ClientTimeout,
        timeouts: Timeouts,
        max_body_bytes: int,
    ) -> Response:
        if self._paused_until > NOT_PAUSED and self._paused_until > self._clock():
            await self._wait_for_pause(retry)
        window = self._window
        slot = await window.acquire() if window is not None else None
        url = _full_url(request)
        session = self._session or self._get_session()
        counted = False  # a response whose body then fails is still one request, counted once
        proxy, proxy_auth = self._proxy(url) if self._proxies else (None, None)
        # Only what differs from aiohttp's defaults: each keyword costs a scan of its ~35.
        extra: dict[str, Any] = _NO_EXTRA
        if request.body is not None or request.cookies or proxy is not None:
            extra = {
                "data": request.body,
                "cookies": request.cookies or None,
                "proxy": proxy,
                "proxy_auth": proxy_auth,
            }
        if self._ssl is True and url.scheme == "https":
            extra = {**extra, "ssl": default_tls_context()}
        try:
            async with session.request(
                request.method,
                url,
                headers=request.headers,
                allow_redirects=False,
                timeout=timeout,
                **extra,
            ) as resp:
                if window is not None and slot is not None:
                    window.settle(slot)
                    slot = None
                status, reason, final_url = resp.status, resp.reason or "", str(resp.url)
                self.stats.count_response(status)
                counted = True
                headers = _response_headers(resp.headers)
                self._observe_limits(status, headers, retry)
                length = resp.content_length
                if (
                    length is not None
                    and length <= max_body_bytes
                    and "Content-Encoding" not in resp.headers
                ):
                    # Plain, of announced size within the limit: one read (aiohttp raises
                    # ClientPayloadError if it ends short of its Content-Length).
                    body = await resp.read()
                else:
                    body = await _read_body(resp, max_body_bytes, final_url, status)
        except aiohttp.ClientConnectorCertificateError as exc:
            self.stats.requests += 1
            raise SecurityError(
                f"TLS certificate verification failed: {exc.certificate_error}", url=str(url)
            ) from exc
        except _TRANSPORT_ERRORS as exc:
            self.stats.requests += not counted
            raise _Attempt(_describe(exc, timeouts)) from exc
        except aiohttp.ClientError as exc:
            self.stats.requests += not counted
            raise RunError(f"invalid HTTP response: {exc}", url=str(url)) from exc
        finally:
            if window is not None and slot is not None:
                window.settle(slot)  # no response, but the request may have reached the server
        return Response(status=status, reason=reason, headers=headers, body=body, url=final_url)

    def _observe_limits(self, status: int, headers: dict[str, str], retry: RetryPolicy) -> None:
        """Pauses the whole service when the server says so, not only this request."""
        wait: float | None = None
        if status in (429, 503):
            wait = retry_after_seconds(headers.get("retry-after"), self._wall_clock())
            if wait is not None and wait > retry.max_retry_after:
                wait = None  # this request fails on it; the others need not stall
        if wait is None and (
            "x-ratelimit-remaining" in headers
            or "ratelimit" in headers
            or "ratelimit-remaining" in headers
        ):
            wait = rate_limit_wait(headers, self._wall_clock())
        if wait:
            self.pause_until(self._clock() + wait)


def _safe_url(request: PreparedRequest) -> str:
    try:
        return str(_full_url(request))
    except RunError:
        return request.url


async def _read_body(
    resp: aiohttp.ClientResponse, max_body_bytes: int, url: str, status: int
) -> bytes:
    """The decompressed body, counted while it arrives so that a gzip bomb stops early.

    A compressed stream that ends before its end marker raises ClientPayloadError, like any
    body cut short, so that it is retried.
    """
    inflater = _inflater(resp.headers.get("Content-Encoding"), url, status)
    limit = BodyLimit(max_body_bytes)
    chunks: list[bytes] = []
    try:
        async for chunk in resp.content.iter_chunked(CHUNK_SIZE):
            if inflater is None:
                limit.add(chunk)
                chunks.append(chunk)
                continue
            if not chunks and inflater.wbits == 15 and chunk[0] & 0x0F != 8:
                # "deflate" sent raw, without its zlib header, as some servers do.
                inflater = _Inflater(-zlib.MAX_WBITS)
            data = chunk
            while data and not inflater.eof:
                # max_length bounds each piece, so a bomb never inflates past the limit + 64 KiB.
                out = inflater.decompress(data, CHUNK_SIZE)
                limit.add(out)
                chunks.append(out)
                data = inflater.unconsumed_tail
        if inflater is not None and chunks and not inflater.eof:
            raise aiohttp.ClientPayloadError("compressed body ended before its end marker")
    except zlib.error as exc:
        raise DecodeError(
            f"response body is not valid {resp.headers.get('Content-Encoding')}: {exc}",
            url=url,
            status=status,
            reason=resp.reason,
        ) from exc
    except DecodeError as exc:
        raise exc.in_context(url=url, status=status, reason=resp.reason) from None
    return b"".join(chunks)


class _Inflater:
    """zlib's decompressor with the window bits it was made with."""

    __slots__ = ("_obj", "wbits")

    def __init__(self, wbits: int) -> None:
        self.wbits = wbits
        self._obj = zlib.decompressobj(wbits)

    @property
    def eof(self) -> bool:
        return self._obj.eof

    @property
    def unconsumed_tail(self) -> bytes:
        return self._obj.unconsumed_tail

    def decompress(self, data: bytes, max_length: int) -> bytes:
        return self._obj.decompress(data, max_length)


# Only what _read_body can inflate is asked for (aiohttp would add br and zstd).
_ACCEPT_ENCODING = "gzip, deflate"
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def _inflater(encoding: str | None, url: str, status: int) -> _Inflater | None:
    name = (encoding or "").strip().lower()
    if name in ("", "identity"):
        return None
    wbits = _WBITS.get(name)
    if wbits is None:
        raise DecodeError(f"unsupported Content-Encoding {encoding!r}", url=url, status=status)
    return _Inflater(wbits)
