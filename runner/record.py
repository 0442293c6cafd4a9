"""`runner run --record F.har`: a transport around the real one that keeps every exchange.

Every attempt of every hop passes the transport seam, token and login requests included, so
wrapping the run's transports sees all of them, in the order sent, failures included.
"""

from __future__ import annotations

import itertools
import os

from .clock import SYSTEM_CLOCK, Clock
from .errors import RunError
from .har import Exchange, HarWriter
from .messages import PreparedRequest, Response, Timeouts
from .redact import Redactor
from .transport import Transport, TransportFactory, TransportFailure, TransportOptions, full_url


class Recorder:
    """Collects a run's exchanges into a HAR file; `close` writes it (on every exit)."""

    def __init__(
        self, path: str | os.PathLike[str], redactor: Redactor, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        self._writer = HarWriter(path, redactor)
        self._clock = clock
        self._sequence = itertools.count()

    def wrap(self, inner: TransportFactory) -> TransportFactory:
        """A transport factory whose transports record what `inner`'s send and receive."""

        def factory(options: TransportOptions) -> Transport:
            return _RecordingTransport(inner(options), options, self)

        return factory

    def close(self) -> None:
        self._writer.close()

    async def _send(
        self,
        inner: Transport,
        options: TransportOptions,
        request: PreparedRequest,
        timeouts: Timeouts,
        max_body_bytes: int,
    ) -> Response:
        seq = next(self._sequence)  # taken when sent: entries are kept in the order sent
        started = self._clock.now()
        began = self._clock.monotonic()
        exchange = Exchange(
            seq=seq,
            started=started,
            elapsed_ms=0.0,
            request=request,
            url=str(full_url(request)),
            service=options.service,
            auth=options.auth,
        )
        try:
            response = await inner.send(request, timeouts, max_body_bytes)
        except TransportFailure as failure:
            exchange.error, exchange.message = failure.kind, failure.message
            raise
        except RunError as exc:  # a refused certificate, a body over its limit
            exchange.error, exchange.message = "failed", exc.message
            raise
        else:
            exchange.response = response
            return response
        finally:
            if exchange.response is None and exchange.error is None:
                exchange.error, exchange.message = "reset", "cancelled before a response"
            exchange.elapsed_ms = (self._clock.monotonic() - began) * 1000
            self._writer.add(exchange)


class _RecordingTransport:
    """One service's real transport, watched."""

    def __init__(self, inner: Transport, options: TransportOptions, recorder: Recorder) -> None:
        self._inner = inner
        self._options = options
        self._recorder = recorder

    async def send(
        self, request: PreparedRequest, timeouts: Timeouts, max_body_bytes: int
    ) -> Response:
        return await self._recorder._send(
            self._inner, self._options, request, timeouts, max_body_bytes
        )

    async def close(self) -> None:
        await self._inner.close()
