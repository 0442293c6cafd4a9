"""The replay transport: each attempt is answered from a recording instead of the network.

It plugs into the transport seam (runner/transport.py), so the engine, the client's retries,
redirects, rate limits and auth run exactly as online. A request is masked as recordings are
(the case's secrets, in every encoding, become `***`), then takes the first unused entry
that matches, in recorded order; each entry answers once. Token and login requests are
matched on demand: a refresh beyond the recording reuses the last matching token entry.
A fault entry (`_error: timeout | reset | refused`) raises the transport failure it names;
a timeout first waits the attempt's read timeout on the (virtual) clock.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import format_datetime, parsedate_to_datetime

from runner.clock import Clock
from runner.errors import DecodeError, RunError
from runner.har import RecordedEntry
from runner.messages import PreparedRequest, Response, Timeouts
from runner.redact import Redactor
from runner.transport import Transport, TransportFailure, TransportOptions, full_url

from .match import Shape, differences, entry_shape, format_differences, nearest, shape
from .spec import Match

_FAILURE_WORDS = {
    "timeout": "timed out after {read:g} s waiting for data (read timeout, recorded fault)",
    "reset": "server disconnected without a response (recorded fault)",
    "refused": "cannot connect (recorded fault)",
}
# Response headers whose absolute times are read relative to the entry's startedDateTime.
_DATE_HEADERS = ("retry-after",)
_EPOCH_HEADERS = ("x-ratelimit-reset", "ratelimit-reset")
_EPOCH_THRESHOLD = 1e9


class ReplayMismatch(RunError):
    """A request that no unused recorded entry answers; it ends the case at once."""


@dataclass(slots=True)
class Mismatch:
    """The first request that matched nothing, with the nearest entry and what differs."""

    method: str
    url: str
    nearest_index: int | None
    differences: list[str]

    def lines(self) -> list[str]:
        out = [f"no recorded entry matches {self.method} {self.url}"]
        if self.nearest_index is None:
            out.append("  the recording has no entry left to compare with")
        else:
            out.append(f"  nearest: entry #{self.nearest_index}; differences:")
            out += [f"    {d}" for d in self.differences] or ["    (none: already used)"]
        return out


@dataclass(slots=True)
class Cassette:
    """A case's recorded entries and which of them have answered."""

    entries: list[RecordedEntry]
    match: Match
    masker: Redactor
    clock: Clock
    used: list[bool] = field(init=False)
    shapes: list[Shape] = field(init=False)
    mismatch: Mismatch | None = None
    answered: int = 0
    _buckets: dict[tuple[object, ...], list[int]] = field(init=False)

    def __post_init__(self) -> None:
        self.used = [False] * len(self.entries)
        self.shapes = [entry_shape(e, self.match) for e in self.entries]
        # Entries by method, URL and compared headers, in recorded order: a request looks at
        # its few candidates, not at every entry (a 500-page recording stays linear).
        self._buckets = {}
        for i, recorded in enumerate(self.shapes):
            self._buckets.setdefault(recorded.route, []).append(i)

    def factory(self, options: TransportOptions) -> Transport:
        """The `TransportFactory` of the run: one replay transport per service client."""
        return ReplayTransport(self, options)

    def unused(self) -> list[RecordedEntry]:
        """Entries that never answered; token and login entries are matched on demand."""
        return [
            e for e, used in zip(self.entries, self.used, strict=True) if not used and not e.auth
        ]

    def take(self, request: PreparedRequest, auth: bool) -> RecordedEntry:
        sent = self._masked_shape(request)
        last_token: int | None = None
        for i in self._buckets.get(sent.route, ()):
            if not self.shapes[i].same_request(sent):
                continue
            if not self.used[i]:
                self.used[i] = True
                self.answered += 1
                return self.entries[i]
            if self.entries[i].auth and auth:
                last_token = i
        if last_token is not None:
            return self.entries[last_token]  # a refresh beyond the recording
        candidates = list(zip(self.entries, self.shapes, self.used, strict=True))
        best = nearest(sent, candidates)
        mismatch = Mismatch(
            sent.method,
            sent.url,
            best[0].index if best is not None else None,
            format_differences(differences(best[1], sent)) if best is not None else [],
        )
        if self.mismatch is None:
            self.mismatch = mismatch
        raise ReplayMismatch("\n".join(mismatch.lines()), method=sent.method, url=sent.url)

    def _masked_shape(self, request: PreparedRequest) -> Shape:
        mask = self.masker.redact
        headers = [(k, mask(v)) for k, v in request.headers.items()]
        if request.cookies:
            headers.append(("Cookie", "; ".join(f"{k}={v}" for k, v in request.cookies.items())))
        body = request.body
        if body is not None:
            with contextlib.suppress(UnicodeDecodeError):  # binary: compared as is
                body = mask(body.decode("utf-8")).encode("utf-8")
        url = mask(str(full_url(request)))
        return shape(request.method, url, headers, body, self.match)


class ReplayTransport:
    """One service client's transport under `runner test`."""

    def __init__(self, cassette: Cassette, options: TransportOptions) -> None:
        self._cassette = cassette
        self._options = options

    async def send(
        self, request: PreparedRequest, timeouts: Timeouts, max_body_bytes: int
    ) -> Response:
        # A turn of the loop, as a network round trip would give: concurrent items interleave
        # the same way on every run.
        await asyncio.sleep(0)
        entry = self._cassette.take(request, self._options.auth)
        url = str(full_url(request))
        if entry.error is not None:
            if entry.error == "timeout":
                await self._cassette.clock.sleep(timeouts.read)
            if entry.error in _FAILURE_WORDS:
                raise TransportFailure(
                    entry.error,  # type: ignore[arg-type]
                    _FAILURE_WORDS[entry.error].format(read=timeouts.read),
                )
            raise RunError(entry.message or f"recorded failure: {entry.error}", url=url)
        if len(entry.response_body) > max_body_bytes:
            raise DecodeError(
                f"response body larger than max_body_bytes ({max_body_bytes} bytes)",
                url=url,
                status=entry.status,
            )
        headers = self._shifted(entry)
        return Response(
            status=entry.status,
            reason=entry.reason,
            headers=headers,
            body=entry.response_body,
            url=url,
        )

    def _shifted(self, entry: RecordedEntry) -> dict[str, str]:
        """Absolute times in the headers moved by as much as the clock has moved from the
        entry's startedDateTime: what was 30 s away when recorded is 30 s away now."""
        headers = entry.response_headers
        if entry.started is None:
            return headers
        now = self._cassette.clock.now()
        shift = now - entry.started
        out = dict(headers)
        for name in _DATE_HEADERS:
            value = headers.get(name)
            if value and not value.strip().isdigit():
                try:
                    when: datetime = parsedate_to_datetime(value)
                except (TypeError, ValueError, IndexError):
                    continue
                out[name] = format_datetime(when + shift, usegmt=True)
        for name in _EPOCH_HEADERS:
            value = headers.get(name)
            try:
                number = float(value) if value else None
            except ValueError:
                continue
            if number is not None and number > _EPOCH_THRESHOLD:
                out[name] = str(int(number + shift.total_seconds()))
        return out

    async def close(self) -> None:
        return None
