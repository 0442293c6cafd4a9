"""The transport seam: what sends one attempt of one request hop and returns its response.

Above it, `ServiceClient` (http.py) does everything a run decides: retries and backoff,
rate limits and pauses, redirects (each hop is a send of its own), auth and its refresh,
counting, and the scheme rule. Below it is the wire. A transport only sends: it never
retries, follows a redirect or adds a credential, so that another transport (a replay of
recorded exchanges, a recorder around the real one) plugs in and the engine behaves the
same. Token and login requests of the auth layer go through a transport too
(`TransportOptions.auth`).

A run makes one transport per service client with its `TransportFactory`
(`run_flow(transport=...)`, `FlowRun.transport`); the default is `http.aiohttp_transport`.
This module imports no aiohttp: a transport that does not need it does not load it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from yarl import URL

from runner.errors import RunError
from runner.messages import PreparedRequest, Response, Timeouts, TlsOptions

FailureKind = Literal["timeout", "reset", "refused"]


class TransportFailure(Exception):
    """One attempt that got no complete response; the client may retry it.

    `kind`: `timeout` (connect, read or total timeout), `reset` (the connection dropped or
    the body was cut short), `refused` (the connection could not be made, DNS included).
    `message` names the cause in words an integrator acts on. `status` and `headers`
    are set when the response had begun before it failed (the request is then counted
    with its status, and its rate-limit headers are still obeyed).

    A transport raises a `RunError` (errors.py) instead for what retrying cannot fix: a
    refused certificate (`SecurityError`), an invalid response, a body over
    `max_body_bytes` or in an unknown Content-Encoding (`DecodeError`).
    """

    def __init__(
        self,
        kind: FailureKind,
        message: str,
        *,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.kind: FailureKind = kind
        self.message = message
        self.status = status
        self.headers = headers


@dataclass(frozen=True, slots=True)
class TransportOptions:
    """What a transport is made for: one service's connections, fixed for the run."""

    service: str  # the service's name ("(no service)" for steps without one)
    tls: TlsOptions = TlsOptions()
    cookies: bool = False  # keep the cookies the service sets, send them back
    max_connections: int | None = None  # the service's max_concurrency
    auth: bool = False  # the service's token and login requests, not its own


class Transport(Protocol):
    """Sends one attempt of one hop; made by a `TransportFactory`, closed at the end of a run."""

    async def send(
        self, request: PreparedRequest, timeouts: Timeouts, max_body_bytes: int
    ) -> Response:
        """Sends `request` once, as it is (`url` plus `query`, `headers`, `body`, `cookies`),
        without following a redirect, and returns the response with its body read in full,
        decoded from its Content-Encoding: `status`, `reason`, `headers` (names lower case,
        a repeated header's values joined with ", "), `body` and the final `url`.

        `timeouts` bound the connection, each read and the whole attempt; a body that grows
        past `max_body_bytes` (after decoding) raises DecodeError. A failure of the
        exchange raises TransportFailure.
        """
        ...

    async def close(self) -> None:
        """Releases connections; the transport is not used afterwards."""
        ...


TransportFactory = Callable[[TransportOptions], Transport]


def full_url(request: PreparedRequest) -> URL:
    """The URL a request is sent to: its `url` (already encoded) with its `query` added."""
    try:
        url = URL(request.url, encoded=True)
        return url.extend_query(request.query) if request.query else url
    except (ValueError, TypeError) as exc:
        raise RunError(f"invalid URL: {exc}", url=request.url) from exc
