"""Requests, responses and transport settings as plain data, and the loopback rule; no
aiohttp here, so that loading and validating a flow stays fast."""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """A step's `retry`: attempts, exponential backoff, and the longest Retry-After obeyed."""

    max_attempts: int = 4
    initial_delay: float = 0.5
    multiplier: float = 2.0
    max_delay: float = 30.0
    max_retry_after: float = 120.0


@dataclass(frozen=True, slots=True)
class Timeouts:
    """A step's `timeout`, in seconds: connect, read (between bytes) and total per attempt."""

    connect: float = 10.0
    read: float = 60.0
    total: float = 300.0  # per attempt


@dataclass(frozen=True, slots=True)
class TlsOptions:
    """A service's `tls`: verification, a CA file, a client certificate and key."""

    verify: bool = True
    ca_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = None


@dataclass(slots=True)
class PreparedRequest:
    """A request ready to send: rendered once, resent byte for byte on every attempt."""

    method: str
    url: str  # absolute, path already encoded, without the query
    query: list[tuple[str, str]] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None  # with its Content-Type in headers
    cookies: dict[str, str] = field(default_factory=dict)
    # Header names whose values are credentials: never sent to another origin.
    sensitive_headers: set[str] = field(default_factory=set)
    # Query parameter names whose values are credentials (api_key in: query): same rule.
    sensitive_query: set[str] = field(default_factory=set)


@dataclass(slots=True)
class Response:
    """The final response of a send, its body read in full; `data` is the decoded body."""

    status: int
    reason: str
    headers: dict[str, str]  # names lower case; repeated headers joined with ", "
    body: bytes
    url: str  # the final URL, after redirects
    attempts: int = 1
    elapsed_s: float = 0.0  # the whole send: every attempt, hop and wait
    data: Any = None  # the decoded body, filled in by the engine

    @property
    def content_type(self) -> str | None:
        return self.headers.get("content-type")


@dataclass(slots=True)
class Stats:
    """Counters for the summary; `requests` counts every attempt, redirect hop and token request."""

    requests: int = 0
    retries: int = 0
    status_counts: dict[str, int] = field(default_factory=dict)

    def count_response(self, status: int) -> None:
        self.requests += 1
        key = str(status)
        self.status_counts[key] = self.status_counts.get(key, 0) + 1


@functools.lru_cache(maxsize=1024)
def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost: the hosts where plain http:// is allowed."""
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
