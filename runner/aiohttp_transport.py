"""The real transport: one aiohttp session per service client, one attempt of one hop per send.

Implements `runner.transport.Transport`: TLS, proxies from the environment, the cookie jar,
timeouts, the body read while counting it, and Content-Encoding decoded with the stream's
end checked. Retries, redirects, rate limits and auth stay above, in `ServiceClient`.
"""

from __future__ import annotations

import functools
import ssl
import zlib
from typing import Any
from urllib.request import proxy_bypass

import aiohttp
from aiohttp.helpers import ProxyInfo, proxies_from_env
from multidict import CIMultiDictProxy
from yarl import URL

from runner.decode import BodyLimit
from runner.errors import DecodeError, RunError, SecurityError, UsageError
from runner.messages import PreparedRequest, Response, Timeouts, TlsOptions
from runner.transport import FailureKind, TransportFailure, TransportOptions, full_url

CHUNK_SIZE = 65536
_NO_EXTRA: dict[str, Any] = {}
_TRANSPORT_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError)


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


class AiohttpTransport:
    """One service's connections: a ClientSession with its own connector, jar and proxies."""

    def __init__(self, options: TransportOptions) -> None:
        self.options = options
        self._ssl = _ssl_context(options.tls)  # here, so a bad CA file fails before any request
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[Timeouts, aiohttp.ClientTimeout] = {}
        self._proxies: dict[str, ProxyInfo] = {}  # from the environment, with the session
        self._jars: dict[tuple[str, str, int], aiohttp.CookieJar] = {}

    def _get_session(self) -> aiohttp.ClientSession:
        # Created on first use: aiohttp wants a running event loop.
        if self._session is None:
            self._proxies = proxies_from_env()
            connector = aiohttp.TCPConnector(limit=self.options.max_connections or 0, ssl=self._ssl)
            # The session keeps no cookies: `send` keeps them, one jar per origin (aiohttp's
            # jar scopes them by host, so a cookie would go to the same host on another port).
            jar = aiohttp.DummyCookieJar()
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

    def _jar(self, url: URL) -> aiohttp.CookieJar:
        """The cookies of one origin: a cookie goes back only to where it came from."""
        key = (url.scheme, url.host or "", url.port or 0)
        jar = self._jars.get(key)
        if jar is None:
            # unsafe: internal services are often reached by IP address.
            jar = self._jars[key] = aiohttp.CookieJar(unsafe=True)
        return jar

    def _proxy(self, url: URL) -> tuple[URL | None, aiohttp.BasicAuth | None]:
        """The proxy for a URL from HTTP_PROXY, HTTPS_PROXY and NO_PROXY, as trust_env does."""
        info = self._proxies.get(url.scheme)
        if info is None or (url.host is not None and proxy_bypass(url.host)):
            return None, None
        return info.proxy, info.proxy_auth

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

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(
        self, request: PreparedRequest, timeouts: Timeouts, max_body_bytes: int
    ) -> Response:
        url = full_url(request)
        session = self._session or self._get_session()
        status: int | None = None  # set once the response has begun
        headers: dict[str, str] | None = None
        proxy, proxy_auth = self._proxy(url) if self._proxies else (None, None)
        cookies = request.cookies
        jar = self._jar(url) if self.options.cookies else None
        if jar is not None:
            kept = jar.filter_cookies(url)
            if kept:
                cookies = {**{name: m.value for name, m in kept.items()}, **cookies}
        # Only what differs from aiohttp's defaults: each keyword costs a scan of its ~35.
        extra: dict[str, Any] = _NO_EXTRA
        if request.body is not None or cookies or proxy is not None:
            extra = {
                "data": request.body,
                "cookies": cookies or None,
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
                timeout=self._client_timeout(timeouts),
                **extra,
            ) as resp:
                status, reason, final_url = resp.status, resp.reason or "", str(resp.url)
                headers = _response_headers(resp.headers)
                if jar is not None and resp.cookies:
                    jar.update_cookies(resp.cookies, resp.url)
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
            raise SecurityError(
                f"TLS certificate verification failed: {exc.certificate_error}", url=str(url)
            ) from exc
        except _TRANSPORT_ERRORS as exc:
            raise TransportFailure(
                _kind(exc), _describe(exc, timeouts), status=status, headers=headers
            ) from exc
        except aiohttp.ClientError as exc:
            raise RunError(f"invalid HTTP response: {exc}", url=str(url)) from exc
        return Response(status=status, reason=reason, headers=headers, body=body, url=final_url)


def _response_headers(raw: CIMultiDictProxy[str]) -> dict[str, str]:
    headers = {name.lower(): value for name, value in raw.items()}
    if len(headers) == len(raw):
        return headers
    headers = {}  # a repeated header: its values joined in order
    for name, value in raw.items():
        key = name.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return headers


def _kind(exc: BaseException) -> FailureKind:
    if isinstance(exc, TimeoutError):  # aiohttp's timeouts are TimeoutErrors too
        return "timeout"
    if isinstance(exc, aiohttp.ClientConnectorError):  # connect and DNS
        return "refused"
    return "reset"


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
