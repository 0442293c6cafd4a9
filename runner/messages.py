"""Requests, responses and transport settings as plain data, and the loopback rule; no
aiohttp here, so that loading and validating a flow stays fast."""

from __future__ import annotations

import codecs
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


# -- a step's `response` settings -------------------------------------------------------------

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
FORMATS = ("auto", "json", "xml", "csv", "ndjson", "text")
XML_NAMESPACES = ("strip", "keep")
COMPRESSIONS = ("auto", "gzip", "none")


class _LocalNames:
    """`key in names` by local name, for `namespaces: keep` where keys are `prefix:name`."""

    __slots__ = ("_names",)

    def __init__(self, names: frozenset[str]) -> None:
        self._names = names

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.rpartition(":")[2] in self._names


@dataclass(frozen=True, slots=True)
class DecodeOptions:
    """How a step's response bodies are decoded: its `response` settings."""

    format: str = "auto"  # auto | json | xml | csv | ndjson | text
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    xml_force_list: tuple[str, ...] = ()  # local element names that are always lists
    xml_namespaces: str = "strip"  # strip | keep
    xml_attr_prefix: str = "@"
    xml_text_key: str = "#text"
    csv_delimiter: str = ","
    csv_encoding: str | None = None  # None: the charset of the Content-Type, else utf-8
    # A compressed payload (beside Content-Encoding, which the transport always undoes):
    # auto | gzip | none.
    compression: str = "auto"
    _force_list: frozenset[str] | _LocalNames | None = field(
        init=False, default=None, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {self.format!r}")
        if isinstance(self.max_body_bytes, bool) or self.max_body_bytes <= 0:
            raise ValueError(f"max_body_bytes must be a positive integer: {self.max_body_bytes}")
        if self.compression not in COMPRESSIONS:
            raise ValueError(
                f"compression must be one of {', '.join(COMPRESSIONS)}, not {self.compression!r}"
            )
        if self.xml_namespaces not in XML_NAMESPACES:
            raise ValueError(f"xml namespaces must be strip or keep, not {self.xml_namespaces!r}")
        if len(self.csv_delimiter) != 1:
            raise ValueError(f"csv delimiter must be one character, not {self.csv_delimiter!r}")
        if self.csv_encoding is not None and text_codec(self.csv_encoding) is None:
            raise ValueError(f"unknown csv encoding {self.csv_encoding!r}")
        object.__setattr__(self, "xml_force_list", tuple(self.xml_force_list))
        names = frozenset(name.rpartition(":")[2] for name in self.xml_force_list)
        force_list: frozenset[str] | _LocalNames | None = None
        if names:
            force_list = names if self.xml_namespaces == "strip" else _LocalNames(names)
        object.__setattr__(self, "_force_list", force_list)


@functools.lru_cache(maxsize=64)
def text_codec(name: str) -> str | None:
    """The canonical codec name (`UTF8` -> `utf-8`), or None when Python does not know it."""
    try:
        return codecs.lookup(name).name
    except LookupError:
        return None
