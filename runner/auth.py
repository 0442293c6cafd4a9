"""Auth strategies: static credentials, OAuth2 tokens and session logins, applied to requests.

One `ServiceAuth` per service (or step override) caches its tokens for the run; token and
login requests go through its own `ServiceClient`, counted in the run's `Stats`, with the
run's transport (marked `auth` in its options) and clock (token expiry).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qsl, quote_plus, urlencode, urlsplit, urlunsplit

from runner.clock import SYSTEM_CLOCK, Clock
from runner.errors import (
    BODY_KEEP_CHARS,
    DecodeError,
    RunError,
    SecurityError,
    UnavailableError,
    UsageError,
)
from runner.expressions import Expression, compile_expression
from runner.http import (
    PreparedRequest,
    Response,
    RetryPolicy,
    ServiceClient,
    Stats,
    Timeouts,
    TlsOptions,
    aiohttp_transport,
    build_url,
    encode_query,
)
from runner.redact import Redactor
from runner.transport import TransportFactory

if TYPE_CHECKING:
    from runner.http import Authorize

# Token and login responses are small; a larger one is a misconfigured URL.
MAX_TOKEN_BODY_BYTES = 1024 * 1024
MAX_REFRESH_MARGIN_S = 30.0
REFRESH_MARGIN_FRACTION = 0.1
# Statuses that the run treats as "the service is unavailable" once retries are spent.
_UNAVAILABLE_STATUSES = frozenset({408, 429})
# Keys of a token response whose values are credentials.
_SECRET_TOKEN_KEYS = ("access_token", "refresh_token", "id_token")
# A service rarely renders more than one or two distinct auth configs in a run.
_MAX_CACHED_AUTHORIZERS = 16
_FORM = "application/x-www-form-urlencoded"
_DEFAULT_TLS = TlsOptions()
_DEFAULT_TIMEOUTS = Timeouts()
_DEFAULT_RETRY = RetryPolicy()
_LINE_BREAK = re.compile(r"[\r\n\x00]")


class RefreshTokenStore(Protocol):
    """Keeps rotated refresh tokens across runs (the state file's `auth` part)."""

    def refresh_token(self, service: str) -> str | None: ...

    def save_refresh_token(self, service: str, token: str) -> None: ...


class ServiceAuth:
    """The credentials of one service (or one step override) for a run."""

    def __init__(
        self,
        service: str,
        *,
        stats: Stats,
        redactor: Redactor,
        tls: TlsOptions = _DEFAULT_TLS,
        refresh_token_store: RefreshTokenStore | None = None,
        timeouts: Timeouts = _DEFAULT_TIMEOUTS,
        retry: RetryPolicy = _DEFAULT_RETRY,
        allow_insecure_http: bool = False,
        clock: Clock = SYSTEM_CLOCK,
        rng: random.Random | None = None,
        transport: TransportFactory = aiohttp_transport,
    ) -> None:
        self.service = service
        self._stats = stats
        self._redactor = redactor
        self._tls = tls
        self._store = refresh_token_store
        self._timeouts = timeouts
        self._retry = retry
        self._allow_insecure_http = allow_insecure_http
        self._clock = clock
        self._rng = rng
        self._transport = transport
        self._client: ServiceClient | None = None
        self._authorizers: list[tuple[dict[str, Any], _Authorizer]] = []
        self._token_response: dict[str, Any] | None = None

    def authorizer(self, config: Mapping[str, Any], base_url: str | None) -> Authorize:
        """The authorizer for an auth mapping whose templates are rendered.

        The engine renders services for each request, so the same config comes back again
        and again: it gets the same authorizer, and with it the cached token.
        """
        # Only a session login reads base_url: an OAuth2 token fetched before base_url could
        # be rendered (base_url read from `auth.<service>`) must be the one used afterwards.
        key = {
            "config": dict(config),
            "base_url": base_url if config.get("type") == "session" else None,
        }
        for seen, found in self._authorizers:
            if seen == key:
                return found
        created = self._create(config, base_url)
        if len(self._authorizers) >= _MAX_CACHED_AUTHORIZERS:
            self._authorizers.pop(0)
        self._authorizers.append((key, created))
        return created

    @property
    def token_response(self) -> dict[str, Any] | None:
        """The body of the last token (or login) response, for the scope's `auth.<service>`."""
        return self._token_response

    async def close(self) -> None:
        for _, authorizer in self._authorizers:
            await authorizer.cancel()
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    def _create(self, config: Mapping[str, Any], base_url: str | None) -> _Authorizer:
        kind = config.get("type")
        where = f"services.{self.service}.auth"
        if kind == "basic":
            username = _text(config, "username", where)
            password = _optional_text(config, "password", where) or ""
            credentials = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
            self._secret(password, credentials, f"Basic {credentials}")
            return _StaticAuthorizer(_Placement("header", "Authorization", "Basic "), credentials)
        if kind == "bearer":
            token = _text(config, "token", where)
            self._secret(token, f"Bearer {token}")
            return _StaticAuthorizer(_Placement("header", "Authorization", "Bearer "), token)
        if kind == "api_key":
            value = _text(config, "value", where)
            self._secret(value)
            placement = _Placement(
                _choice(config, "in", ("header", "query", "cookie"), "header", where),
                _text(config, "name", where),
                "",
            )
            return _StaticAuthorizer(placement, value)
        if kind == "oauth2_client_credentials":
            return _OAuth2Authorizer(self, _oauth2_settings(config, where, refresh=False))
        if kind == "oauth2_refresh_token":
            if self._store is None:
                raise UsageError(
                    "oauth2_refresh_token needs --state to keep rotated refresh tokens"
                )
            settings = _oauth2_settings(config, where, refresh=True)
            self._secret(settings.refresh_token)
            return _OAuth2Authorizer(self, settings)
        if kind == "session":
            return _SessionAuthorizer(self, _session_settings(config, base_url, where))
        raise UsageError(f"{where}.type: unknown auth type {kind!r}")

    def _secret(self, *values: str | None) -> None:
        for value in values:
            self._redactor.add(value)

    def _http(self) -> ServiceClient:
        # Created on first use: an aiohttp session needs the running loop.
        if self._client is None:
            self._client = ServiceClient(
                f"{self.service} auth",
                tls=self._tls,
                stats=self._stats,
                redactor=self._redactor,
                allow_insecure_http=self._allow_insecure_http,
                clock=self._clock,
                rng=self._rng,
                transport=self._transport,
                service=self.service,
                auth=True,
            )
        return self._client

    async def _post(self, request: PreparedRequest, what: str) -> Response:
        """Send a token or login request; a final non-2xx fails the run."""
        response = await self._http().send(
            request,
            retry=self._retry,
            timeouts=self._timeouts,
            retry_unsafe=True,  # token and login requests are safe to repeat
            max_body_bytes=MAX_TOKEN_BODY_BYTES,
            same_origin=True,  # the body holds the credentials: never sent elsewhere
        )
        if 200 <= response.status < 300:
            return response
        error = UnavailableError if _unavailable(response.status) else RunError
        raise error(
            f"{what} failed: {response.status} {response.reason}".rstrip(),
            method=request.method,
            url=self._redactor.redact(request.url),
            status=response.status,
            reason=response.reason,
            body=self._redactor.excerpt(response.body, BODY_KEEP_CHARS),
            attempts=response.attempts,
            elapsed_s=response.elapsed_s,
        )

    def _remember(self, body: Any) -> None:
        self._token_response = body if isinstance(body, dict) else None


def _unavailable(status: int) -> bool:
    return status >= 500 or status in _UNAVAILABLE_STATUSES


# -- where a credential goes ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Placement:
    """A credential's place in a request: a header, a query parameter or a cookie."""

    location: str  # "header" | "query" | "cookie"
    name: str
    prefix: str

    def put(self, request: PreparedRequest, credential: str) -> PreparedRequest:
        # Replacing (not adding) keeps apply() idempotent on a request already authorized.
        value = self.prefix + credential
        if _LINE_BREAK.search(value):
            # A header split in two would smuggle another header (or a second request).
            raise SecurityError(
                f"the credential for {self.location} '{self.name}' contains a line break "
                "(CR, LF or NUL): refused"
            )
        if self.location == "header":
            lower = self.name.lower()
            headers = {k: v for k, v in request.headers.items() if k.lower() != lower}
            headers[self.name] = value
            return replace(
                request, headers=headers, sensitive_headers=request.sensitive_headers | {self.name}
            )
        if self.location == "query":
            query = [(k, v) for k, v in request.query if k != self.name]
            query.append((self.name, value))
            return replace(
                request, query=query, sensitive_query=request.sensitive_query | {self.name}
            )
        return replace(request, cookies={**request.cookies, self.name: value})

    def get(self, request: PreparedRequest) -> str | None:
        """The credential a request was sent with, to tell a stale token from a fresh one."""
        value: str | None = None
        if self.location == "header":
            lower = self.name.lower()
            value = next((v for k, v in request.headers.items() if k.lower() == lower), None)
        elif self.location == "query":
            value = next((v for k, v in reversed(request.query) if k == self.name), None)
        else:
            value = request.cookies.get(self.name)
        if value is not None and value.startswith(self.prefix):
            return value[len(self.prefix) :]
        return value


# -- authorizers ---------------------------------------------------------------------------


class _Authorizer:
    """Implements `runner.http.Authorize`."""

    async def apply(self, request: PreparedRequest) -> PreparedRequest:
        raise NotImplementedError

    async def refresh(self, failed: PreparedRequest) -> bool:
        return False

    async def cancel(self) -> None:
        return None


class _StaticAuthorizer(_Authorizer):
    """basic, bearer and api_key: a fixed credential, nothing to refresh."""

    def __init__(self, placement: _Placement, credential: str) -> None:
        self._placement = placement
        self._credential = credential

    async def apply(self, request: PreparedRequest) -> PreparedRequest:
        return self._placement.put(request, self._credential)


@dataclass(frozen=True, slots=True)
class _Token:
    """A credential obtained by a request, and when to renew it."""

    credential: str
    refresh_at: float | None  # clock time from which the token is renewed before use


class _TokenAuthorizer(_Authorizer):
    """A credential obtained by a request, cached, renewed before expiry and after a 401.

    Concurrent callers share one pending request: the first starts it, the others await it.
    """

    def __init__(self, owner: ServiceAuth, placement: _Placement) -> None:
        self._owner = owner
        self._placement = placement
        self._token: _Token | None = None
        self._pending: asyncio.Task[_Token] | None = None

    async def apply(self, request: PreparedRequest) -> PreparedRequest:
        token = self._token
        if token is None or self._stale(token):
            token = await self._obtain(rejected=None)
        return self._placement.put(request, token.credential)

    async def refresh(self, failed: PreparedRequest) -> bool:
        await self._obtain(rejected=self._placement.get(failed))
        return True

    async def cancel(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None and not pending.done():
            pending.cancel()
            # The run is ending; the request's own error, if any, went to its waiters.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pending

    def _stale(self, token: _Token) -> bool:
        return token.refresh_at is not None and self._owner._clock.monotonic() >= token.refresh_at

    async def _obtain(self, *, rejected: str | None) -> _Token:
        if self._pending is None:
            token = self._token
            # Another task may have renewed the token since this caller looked (or since the
            # rejected request was authorized): then it is the one to use.
            if token is not None and not self._stale(token) and token.credential != rejected:
                return token
            self._pending = asyncio.get_running_loop().create_task(self._renew())
        # Shielded: a cancelled caller must not cancel the request the others wait for.
        return await asyncio.shield(self._pending)

    async def _renew(self) -> _Token:
        try:
            token = await self._fetch()
            self._token = token
            return token
        finally:
            self._pending = None

    async def _fetch(self) -> _Token:
        raise NotImplementedError

    def _expiry(self, expires_in: Any) -> float | None:
        seconds = _seconds(expires_in)
        if seconds is None:
            return None
        margin = min(MAX_REFRESH_MARGIN_S, REFRESH_MARGIN_FRACTION * seconds)
        return self._owner._clock.monotonic() + seconds - margin


@dataclass(frozen=True, slots=True)
class _OAuth2Settings:
    """An OAuth2 token request, rendered: endpoint, client and grant."""

    token_url: str
    client_id: str | None
    client_secret: str | None
    client_auth: str  # "basic" | "body"
    scope: str | None
    audience: str | None
    params: tuple[tuple[str, str], ...]
    refresh_token: str | None  # None for client credentials


class _OAuth2Authorizer(_TokenAuthorizer):
    """oauth2_client_credentials and oauth2_refresh_token."""

    def __init__(self, owner: ServiceAuth, settings: _OAuth2Settings) -> None:
        super().__init__(owner, _Placement("header", "Authorization", "Bearer "))
        self._settings = settings
        self._token_url, self._token_query = _split_url(settings.token_url)
        client_header = None
        if settings.client_auth == "basic" and settings.client_secret is not None:
            # RFC 6749 2.3.1: both parts form-urlencoded before base64.
            pair = f"{quote_plus(settings.client_id or '')}:{quote_plus(settings.client_secret)}"
            encoded = base64.b64encode(pair.encode()).decode("ascii")
            client_header = f"Basic {encoded}"
            owner._secret(encoded, client_header)
        owner._secret(settings.client_secret)
        self._client_header = client_header

    async def _fetch(self) -> _Token:
        settings = self._settings
        form: list[tuple[str, str]] = []
        refresh_token = None
        if settings.refresh_token is None:
            form.append(("grant_type", "client_credentials"))
        else:
            store = self._owner._store
            saved = store.refresh_token(self._owner.service) if store is not None else None
            refresh_token = saved or settings.refresh_token
            self._owner._secret(refresh_token)
            form += [("grant_type", "refresh_token"), ("refresh_token", refresh_token)]
        if settings.scope is not None:
            form.append(("scope", settings.scope))
        if settings.audience is not None:
            form.append(("audience", settings.audience))
        form.extend(settings.params)
        headers = {"Content-Type": _FORM, "Accept": "application/json"}
        if self._client_header is not None:
            headers["Authorization"] = self._client_header
        elif settings.client_id is not None:
            form.append(("client_id", settings.client_id))
            if settings.client_secret is not None:
                form.append(("client_secret", settings.client_secret))
        request = PreparedRequest(
            "POST",
            self._token_url,
            query=list(self._token_query),
            headers=headers,
            body=urlencode(form).encode("ascii"),
            sensitive_headers={"Authorization"},
        )
        response = await self._owner._post(request, "token request")
        body = _json_body(response, self._owner._redactor.redact(request.url), "token response")
        if not isinstance(body, dict) or not isinstance(body.get("access_token"), str):
            raise DecodeError(
                "token response has no access_token",
                method="POST",
                url=request.url,
                status=response.status,
            )
        for key in _SECRET_TOKEN_KEYS:
            self._owner._secret(body.get(key) if isinstance(body.get(key), str) else None)
        rotated = body.get("refresh_token")
        if refresh_token is not None and isinstance(rotated, str) and rotated != refresh_token:
            # The server has spent the old token: keep the new one now, whatever happens next.
            store = self._owner._store
            if store is not None:
                store.save_refresh_token(self._owner.service, rotated)
        self._owner._remember(body)
        return _Token(body["access_token"], self._expiry(body.get("expires_in")))


@dataclass(frozen=True, slots=True)
class _SessionSettings:
    """A `session` login request, rendered, and where its token goes."""

    method: str
    url: str
    query: tuple[tuple[str, str], ...]
    headers: tuple[tuple[str, str], ...]
    body: bytes | None
    token: Expression
    token_source: str
    placement: _Placement


class _SessionAuthorizer(_TokenAuthorizer):
    """session: log in with a request, take the token out of its response."""

    def __init__(self, owner: ServiceAuth, settings: _SessionSettings) -> None:
        super().__init__(owner, settings.placement)
        self._settings = settings

    async def _fetch(self) -> _Token:
        settings = self._settings
        request = PreparedRequest(
            settings.method,
            settings.url,
            query=list(settings.query),
            headers=dict(settings.headers),
            body=settings.body,
        )
        response = await self._owner._post(request, "session login")
        body = _json_body(response, self._owner._redactor.redact(request.url), "login response")
        data = {
            "status": response.status,
            "headers": response.headers,
            "body": body,
            "url": response.url,
        }
        try:
            found = settings.token.search(data)
        except RunError:
            raise
        except Exception as exc:  # a JMESPath runtime error, from a custom function say
            raise RunError(
                f"session login: token expression {settings.token_source!r} failed: {exc}",
                method=request.method,
                url=self._owner._redactor.redact(request.url),
            ) from exc
        if isinstance(found, bool) or not isinstance(found, (str, int, float)) or found == "":
            raise RunError(
                f"session login: token expression {settings.token_source!r} "
                f"gave {json.dumps(found)[:100]}, not a token",
                method=request.method,
                url=self._owner._redactor.redact(request.url),
                status=response.status,
            )
        credential = str(found)
        self._owner._secret(credential, settings.placement.prefix + credential)
        self._owner._remember(body)
        return _Token(credential, None)


# -- reading the config --------------------------------------------------------------------


def _optional_text(config: Mapping[str, Any], key: str, where: str) -> str | None:
    value = config.get(key)
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    raise UsageError(f"{where}.{key}: expected a string, got {type(value).__name__}")


def _text(config: Mapping[str, Any], key: str, where: str) -> str:
    value = _optional_text(config, key, where)
    if value is None:
        raise UsageError(f"{where}.{key} is required")
    return value


def _choice(
    config: Mapping[str, Any], key: str, allowed: tuple[str, ...], default: str, where: str
) -> str:
    value = config.get(key)
    if value is None:
        return default
    if value not in allowed:
        raise UsageError(f"{where}.{key}: {value!r} is not one of {', '.join(allowed)}")
    return str(value)


def _oauth2_settings(config: Mapping[str, Any], where: str, *, refresh: bool) -> _OAuth2Settings:
    scope = config.get("scope")
    if isinstance(scope, list):
        scope = " ".join(str(s) for s in scope)  # RFC 6749 3.3: space-delimited
    params = config.get("params") or {}
    if not isinstance(params, Mapping):
        raise UsageError(f"{where}.params: expected a mapping")
    return _OAuth2Settings(
        token_url=_text(config, "token_url", where),
        client_id=_optional_text(config, "client_id", where),
        client_secret=_optional_text(config, "client_secret", where),
        client_auth=_choice(config, "client_auth", ("basic", "body"), "basic", where),
        scope=_optional_text({"scope": scope}, "scope", where),
        audience=_optional_text(config, "audience", where),
        params=tuple(encode_query(params)),
        refresh_token=_text(config, "refresh_token", where) if refresh else None,
    )


def _session_settings(
    config: Mapping[str, Any], base_url: str | None, where: str
) -> _SessionSettings:
    login = config.get("request")
    if not isinstance(login, Mapping):
        raise UsageError(f"{where}.request is required")
    request_where = f"{where}.request"
    url = _optional_text(login, "url", request_where)
    if url is None:
        path = _text(login, "path", request_where)
        if base_url is None:
            raise UsageError(f"{request_where}.path needs the service's base_url")
        url = build_url(base_url, path)
    url, url_query = _split_url(url)
    query = list(url_query) + encode_query(login.get("query") or {})
    headers = {str(k): str(v) for k, v in (login.get("headers") or {}).items()}
    lower = {k.lower() for k in headers}
    body: bytes | None = None
    if login.get("json") is not None:
        body = json.dumps(login["json"], ensure_ascii=False, separators=(",", ":")).encode()
        if "content-type" not in lower:
            headers["Content-Type"] = "application/json"
    elif login.get("form") is not None:
        body = urlencode(encode_query(login["form"])).encode("ascii")
        if "content-type" not in lower:
            headers["Content-Type"] = _FORM
    if "accept" not in lower:
        headers["Accept"] = "application/json"
    source = _text(config, "token", where)
    location = _choice(config, "in", ("header", "query", "cookie"), "header", where)
    return _SessionSettings(
        method=(_optional_text(login, "method", request_where) or "POST").upper(),
        url=url,
        query=tuple(query),
        headers=tuple(headers.items()),
        body=body,
        token=compile_expression(source),
        token_source=source,
        placement=_Placement(
            location,
            _optional_text(config, "name", where) or "Authorization",
            _optional_text(config, "prefix", where) or "",
        ),
    )


# -- small helpers -------------------------------------------------------------------------


def _split_url(url: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """A URL without its query, and the query's pairs (PreparedRequest keeps them apart)."""
    parts = urlsplit(url)
    if not parts.query:
        return url, ()
    bare = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    return bare, tuple(parse_qsl(parts.query, keep_blank_values=True))


def _seconds(value: Any) -> float | None:
    """`expires_in` as seconds; some servers send it as a string."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if value > 0 else None
    if isinstance(value, str):
        try:
            seconds = float(value)
        except ValueError:
            return None
        return seconds if seconds > 0 else None
    return None


def _json_body(response: Response, url: str, what: str) -> Any:
    if not response.body.strip():
        return None
    try:
        return json.loads(response.body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DecodeError(
            f"{what} is not JSON: {exc}",
            url=url,
            status=response.status,
            reason=response.reason,
        ) from exc
