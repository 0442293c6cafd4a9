"""Sending: a service's requests with retries and backoff, rate limits, redirects and auth,
each hop handed to the transport (runner/transport.py), every wait timed by the clock."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol
from urllib.parse import unquote_plus

from yarl import URL

from runner import __version__
from runner.clock import SYSTEM_CLOCK, Clock
from runner.decode import body_excerpt
from runner.errors import (
    BODY_KEEP_CHARS,
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
from runner.transport import (
    Transport,
    TransportFactory,
    TransportFailure,
    TransportOptions,
    full_url,
)

# Re-exported: the wire forms of URLs and bodies live in wire.py.
from runner.wire import _origin
from runner.wire import build_url as build_url
from runner.wire import encode_multipart as encode_multipart
from runner.wire import encode_query as encode_query
from runner.wire import origin as origin

log = logging.getLogger("runner")

# Every request says what sent it (token and login requests too); a service's or a step's
# `headers: {User-Agent: ...}` replaces it.
USER_AGENT = f"runner/{__version__}"


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
MAX_REDIRECTS = 10
# X-RateLimit-Reset above this is an epoch time, below it seconds to wait.
EPOCH_THRESHOLD = 1e9
# Never sent to another origin, whatever the auth layer marked.
ALWAYS_SENSITIVE = frozenset({"authorization", "cookie", "proxy-authorization"})
_BODY_HEADERS = frozenset({"content-type", "content-length", "content-encoding"})


# ---------------------------------------------------------------- URLs and bodies (wire.py)


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


_full_url = full_url  # the URL a request is sent to, query included


def _strip_query(url: URL, names: set[str]) -> URL:
    """The URL without the named parameters, the others left byte for byte."""
    raw = url.raw_query_string
    if not raw or not names:
        return url
    kept = [pair for pair in raw.split("&") if unquote_plus(pair.split("=", 1)[0]) not in names]
    bare = url.with_query(None)
    return URL(f"{bare}?{'&'.join(kept)}", encoded=True) if kept else bare


def _never_secret(value: str) -> bool:
    return False


def without_credentials(
    request: PreparedRequest, contains_secret: Callable[[str], bool] = _never_secret
) -> PreparedRequest:
    """The request as it may go to an origin its credentials do not belong to: without
    Authorization, Cookie, Proxy-Authorization, the headers marked sensitive, any header whose
    value holds a secret, the cookies and the credential query parameters."""
    dropped = ALWAYS_SENSITIVE | {name.lower() for name in request.sensitive_headers}
    headers = {
        k: v
        for k, v in request.headers.items()
        if k.lower() not in dropped and not contains_secret(v)
    }
    query = [(k, v) for k, v in request.query if k not in request.sensitive_query]
    return replace(
        request,
        headers=headers,
        query=query,
        cookies={},
        sensitive_headers=set(),
        sensitive_query=set(),
    )


def redirect_request(
    request: PreparedRequest,
    status: int,
    location: str,
    *,
    allow_insecure_http: bool = False,
    same_origin: bool = False,
    contains_secret: Callable[[str], bool] = _never_secret,
) -> PreparedRequest:
    """The next hop of a redirect, following browsers and RFC 9110.

    303 (and 301/302 after a POST) become a GET without body; 307 and 308 keep both. A hop to
    another origin loses every credential (`without_credentials`); a body that holds a
    secret is not sent there at all (SecurityError), nor is any request when `same_origin`.
    A hop on the same origin keeps the credential query parameters the Location left out.
    """
    current = _full_url(request)
    try:
        target = current.join(URL(location)).with_fragment(None)
    except (ValueError, TypeError) as exc:
        raise RunError(f"invalid redirect Location {location!r}: {exc}", url=str(current)) from exc
    if target.raw_user is not None or target.raw_password is not None:
        # aiohttp would turn them into an Authorization header of the server's choosing.
        raise SecurityError(
            f"redirect Location with credentials (user:password@) refused: "
            f"{target.with_user(None)}",
            url=str(current),
            status=status,
        )
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
        if same_origin or (body and contains_secret(body.decode("utf-8", "replace"))):
            raise SecurityError(
                f"redirect to another origin refused ({status} to "
                f"{target.with_query(None)}): the request's credentials may not follow",
                url=str(current),
                status=status,
            )
        dropped = ALWAYS_SENSITIVE | {name.lower() for name in sensitive_headers}
        headers = {
            k: v for k, v in headers.items() if k.lower() not in dropped and not contains_secret(v)
        }
        target = _strip_query(target, sensitive_query)
        cookies, sensitive_headers, sensitive_query = {}, set(), set()
    elif sensitive_query:
        # The Location is the server's URL: put back the key it left out, or the next hop
        # would go unauthenticated.
        missing = [
            (name, value)
            for name in sorted(sensitive_query)
            if name not in target.query
            for value in current.query.getall(name, [])
        ]
        if missing:
            target = target.extend_query(missing)
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


Monotonic = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class SlidingWindow:
    """At most `requests` acquisitions in any window of `per_seconds`: a log of send times."""

    def __init__(self, limit: RateLimit, clock: Monotonic, sleep: Sleep) -> None:
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


def aiohttp_transport(options: TransportOptions) -> Transport:
    """The default TransportFactory: the real network (runner/aiohttp_transport.py), imported
    on first use, so that a run with another transport never loads aiohttp."""
    from runner.aiohttp_transport import AiohttpTransport

    return AiohttpTransport(options)


class ServiceClient:
    """One per service for a run: its transport, limits and state; everything above one hop.

    Sends a request with its retries and backoff, rate limit and pauses, redirects (each hop
    a send of its own through the transport), auth and 401 refresh, counting every attempt in
    `stats`. The transport (runner/transport.py) sends each hop once; the clock
    (runner/clock.py) times every wait.
    """

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
        clock: Clock = SYSTEM_CLOCK,
        rng: random.Random | None = None,
        transport: TransportFactory = aiohttp_transport,
        service: str | None = None,
        auth: bool = False,
    ) -> None:
        """`service` names the service in the transport's options (default: `name`); `auth`
        marks the client of its token and login requests; `rng` draws the backoff jitter."""
        self.name = name
        self.stats = stats
        self._redactor = redactor
        self._allow_insecure_http = allow_insecure_http
        self._clock = clock
        # Bound once: read a few times per request.
        self._monotonic = clock.monotonic
        self._sleep = clock.sleep
        self._rng = rng
        # Made here, so that a bad CA file fails before any request.
        self._transport = transport(
            TransportOptions(
                service=service if service is not None else name,
                tls=tls,
                cookies=cookies,
                max_connections=max_concurrency,
                auth=auth,
            )
        )
        self._semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        self._window = (
            SlidingWindow(rate_limit, clock.monotonic, clock.sleep) if rate_limit else None
        )
        self._paused_until = NOT_PAUSED
        self._checked_origins: set[str] = set()

    async def close(self) -> None:
        await self._transport.close()

    def contains_secret(self, text: str) -> bool:
        """Whether a header value or body holds a secret of the run, in any encoding."""
        return bool(self._redactor) and self._redactor.redact(text) != text

    def pause_until(self, when: float) -> None:
        """Pauses every request of this service until `when` (on the clock's monotonic time)."""
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
        started = self._monotonic()
        attempt = first_attempt
        try:
            self._check_scheme_once(request)
            can_retry = (
                retry_unsafe
                or request.method.upper() in IDEMPOTENT_METHODS
                or any(k.lower() == "idempotency-key" for k in request.headers)
            )
            wait = initial_wait
            refreshed = False
            resend = first_attempt > 1
            _set_user_agent(request.headers)
            while True:
                if wait:
                    await self._sleep(wait)
                if resend:
                    self.stats.retries += 1
                resend = True
                sent = await authorize.apply(request) if authorize is not None else request
                began = self._monotonic()
                try:
                    response = await self._follow(
                        sent, retry, timeouts, max_body_bytes, same_origin
                    )
                except TransportFailure as failure:
                    if not can_retry or attempt >= retry.max_attempts:
                        if log.isEnabledFor(logging.DEBUG):
                            self._log_attempt(
                                sent, None, failure, attempt, retry, began, None, can_retry
                            )
                        raise TransportError(
                            failure.message,
                            attempts=attempt,
                            elapsed_s=self._since(started),
                        ) from failure.__cause__
                    wait = backoff_delay(retry, attempt, self._rng)
                    if log.isEnabledFor(logging.DEBUG):
                        self._log_attempt(sent, None, failure, attempt, retry, began, wait, True)
                    attempt += 1
                    continue
                response.attempts = attempt
                if response.status == 401 and authorize is not None and not refreshed:
                    refreshed = True
                    if await authorize.refresh(sent):
                        if log.isEnabledFor(logging.DEBUG):
                            self._log_attempt(
                                sent, response, None, attempt, retry, began, 0.0, True,
                                "credentials refreshed, sending again",
                            )  # fmt: skip
                        wait = None
                        continue  # this resend is not counted toward max_attempts
                if response.status in RETRY_STATUSES and can_retry and attempt < retry.max_attempts:
                    wait = self._retry_wait(response, retry, attempt)
                    if log.isEnabledFor(logging.DEBUG):
                        self._log_attempt(sent, response, None, attempt, retry, began, wait, True)
                    attempt += 1
                    continue
                if log.isEnabledFor(logging.DEBUG):
                    self._log_attempt(sent, response, None, attempt, retry, began, None, can_retry)
                response.elapsed_s = self._since(started)
                return response
        except RunError as exc:
            raise self._located(exc, request, attempt, started) from exc.__cause__

    def _since(self, started: float) -> float:
        return max(0.0, self._monotonic() - started)

    def _log_attempt(
        self,
        sent: PreparedRequest,
        response: Response | None,
        failure: TransportFailure | None,
        attempt: int,
        retry: RetryPolicy,
        began: float,
        delay: float | None,
        can_retry: bool,
        note: str | None = None,
    ) -> None:
        """-v: one line per attempt, with its outcome and what comes next."""
        url = self._redactor.redact(_safe_url(sent))
        duration_ms = round(self._since(began) * 1000)
        if response is not None:
            outcome = f"{response.status} {response.reason}".rstrip()
            retryable = response.status in RETRY_STATUSES
        else:
            assert failure is not None
            outcome = self._redactor.redact(failure.message)
            retryable = True
        if note is not None:
            then = f"; {note}"
        elif delay is not None:
            then = f"; retrying in {delay:.2f} s"
        elif retryable and not can_retry:
            then = f"; not retried: {sent.method} is not idempotent (see retry_unsafe)"
        elif retryable:
            then = "; no attempts left"
        else:
            then = ""
        fields: dict[str, Any] = {
            "method": sent.method,
            "url": url,
            "attempt": attempt,
            "duration_ms": duration_ms,
        }
        if response is not None:
            fields["status"] = response.status
        if delay is not None:
            fields["delay_s"] = round(delay, 3)
        log.debug(
            "%s %s -> %s in %d ms (%s, attempt %d of %d)%s",
            sent.method, url, outcome, duration_ms, self.name, attempt, retry.max_attempts, then,
            extra=fields,
        )  # fmt: skip

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
        retry_after = retry_after_seconds(response.headers.get("retry-after"), self._clock.time())
        if retry_after is None:
            return backoff_delay(retry, attempt, self._rng)
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
        timeouts: Timeouts,
        max_body_bytes: int,
        same_origin: bool = False,
    ) -> Response:
        """One attempt: the request and its redirect hops, each hop a request of its own."""
        hops = 0
        while True:
            if self._semaphore is None:
                response = await self._request_now(request, retry, timeouts, max_body_bytes)
            else:
                async with self._semaphore:  # max_concurrency: one hop holds one slot
                    response = await self._request_now(request, retry, timeouts, max_body_bytes)
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
                contains_secret=self.contains_secret,
            )

    async def _wait_for_pause(self, retry: RetryPolicy) -> None:
        while (wait := self._paused_until - self._monotonic()) > 0:
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
        timeouts: Timeouts,
        max_body_bytes: int,
    ) -> Response:
        """One hop through the transport, after the pause and the rate limit; counted once,
        with its status when a response began."""
        if self._paused_until > NOT_PAUSED and self._paused_until > self._monotonic():
            await self._wait_for_pause(retry)
        window = self._window
        slot = await window.acquire() if window is not None else None
        try:
            response = await self._transport.send(request, timeouts, max_body_bytes)
        except TransportFailure as failure:
            self._count(failure.status)
            if failure.status is not None and failure.headers is not None:
                self._observe_limits(failure.status, failure.headers, retry)
            raise
        except RunError as exc:  # a refused certificate, a body over the limit
            self._count(exc.status)
            raise
        finally:
            if window is not None and slot is not None:
                # The window is measured from the response (or the failure): the server
                # counts a request when it arrives, some time after the slot was granted.
                window.settle(slot)
        self.stats.count_response(response.status)
        self._observe_limits(response.status, response.headers, retry)
        return response

    def _count(self, status: int | None) -> None:
        if status is None:
            self.stats.requests += 1
        else:
            self.stats.count_response(status)

    def _observe_limits(self, status: int, headers: Mapping[str, str], retry: RetryPolicy) -> None:
        """Pauses the whole service when the server says so, not only this request."""
        wait: float | None = None
        if status in (429, 503):
            wait = retry_after_seconds(headers.get("retry-after"), self._clock.time())
            if wait is not None and wait > retry.max_retry_after:
                wait = None  # this request fails on it; the others need not stall
        if wait is None and (
            "x-ratelimit-remaining" in headers
            or "ratelimit" in headers
            or "ratelimit-remaining" in headers
        ):
            wait = rate_limit_wait(headers, self._clock.time())
        if wait:
            self.pause_until(self._monotonic() + wait)


def _set_user_agent(headers: dict[str, str]) -> None:
    """`User-Agent: runner/<version>` unless the request sets its own (a service's or a
    step's `headers`, a login request's). In place: the request's headers are what is sent,
    on every attempt and page."""
    if "User-Agent" in headers or any(name.lower() == "user-agent" for name in headers):
        return
    headers["User-Agent"] = USER_AGENT


def _safe_url(request: PreparedRequest) -> str:
    try:
        return str(_full_url(request))
    except RunError:
        return request.url
