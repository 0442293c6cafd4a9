"""Sending for a run: one `ServiceClient` per service (http.py) and one `ServiceAuth` per
service or step override (auth.py), the credentials chosen for each request, and the
`auth.<service>` scope kept up to date with the token responses."""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING, Any

from .clock import Clock
from .errors import RenderError
from .http import Authorize, RateLimit, ServiceClient
from .messages import PreparedRequest, Response, RetryPolicy, Stats, Timeouts, TlsOptions
from .model import Flow, StepSpec
from .redact import Redactor
from .transport import TransportFactory
from .wire import origin

if TYPE_CHECKING:
    from .auth import RefreshTokenStore, ServiceAuth

log = logging.getLogger("runner")


class Sender:
    """The clients and credentials of one run's services; made before the first request,
    closed at its end."""

    def __init__(
        self,
        flow: Flow,
        *,
        stats: Stats,
        redactor: Redactor,
        auth_scope: dict[str, Any],
        refresh_token_store: RefreshTokenStore | None,
        transport: TransportFactory,
        clock: Clock,
        rng: random.Random | None,
    ) -> None:
        self.flow = flow
        self.stats = stats
        self.redactor = redactor
        self.auth_scope = auth_scope
        self.refresh_token_store = refresh_token_store
        self.transport = transport
        self.clock = clock
        self.rng = rng
        self.clients: dict[str, ServiceClient] = {}
        self.auths: dict[tuple[str, str], ServiceAuth] = {}
        # Some service or step has auth: requests look for an authorizer.
        self.uses_auth = any(s.auth is not None for s in flow.services.values()) or any(
            not isinstance(step.auth, str) for step in flow.all_steps()
        )

    def client(self, service: str | None) -> ServiceClient:
        key = service or ""
        existing = self.clients.get(key)
        if existing is not None:
            return existing
        spec = self.flow.services.get(service) if service else None
        if spec is None:
            made = ServiceClient(
                "(no service)",
                stats=self.stats,
                redactor=self.redactor,
                clock=self.clock,
                rng=self.rng,
                transport=self.transport,
            )
        else:
            made = ServiceClient(
                spec.name,
                rate_limit=RateLimit(*spec.rate_limit) if spec.rate_limit else None,
                max_concurrency=spec.max_concurrency,
                tls=spec.tls,
                cookies=spec.cookies,
                stats=self.stats,
                redactor=self.redactor,
                allow_insecure_http=spec.allow_insecure_http,
                clock=self.clock,
                rng=self.rng,
                transport=self.transport,
            )
        self.clients[key] = made
        return made

    def service_auth(self, service: str, step: StepSpec | None) -> ServiceAuth:
        if step is None:
            service = self.flow.auth_owner(service)  # `auth: {use: S}`: S's tokens
        key = (service, step.id if step is not None else "")
        existing = self.auths.get(key)
        if existing is not None:
            return existing
        from .auth import ServiceAuth  # only flows with auth need it (~5 ms of start-up)

        spec = self.flow.services.get(service)
        made = ServiceAuth(
            service,
            stats=self.stats,
            redactor=self.redactor,
            tls=spec.tls if spec else TlsOptions(),
            timeouts=spec.timeout if spec else Timeouts(),
            retry=spec.retry if spec else RetryPolicy(),
            refresh_token_store=self.refresh_token_store,
            allow_insecure_http=spec.allow_insecure_http if spec else False,
            clock=self.clock,
            rng=self.rng,
            transport=self.transport,
        )
        self.auths[key] = made
        return made

    async def close(self) -> None:
        for auth in self.auths.values():
            await auth.close()
        for client in self.clients.values():
            await client.close()

    async def obtain_token(self, service_name: str, scope: dict[str, Any]) -> None:
        """Fetch the service's token now, for a base_url that reads `auth.<service>` (the
        Salesforce instance URL): the token response must exist before base_url renders."""
        service = self.flow.services[service_name]
        if service.auth is None:
            return
        config = service.auth.render(scope)
        authorizer = self.service_auth(service_name, None).authorizer(config, None)
        try:
            # The token is cached by the authorizer; this request is never sent.
            await authorizer.apply(PreparedRequest("GET", "https://token.invalid/"))
        finally:
            self._refresh_auth_scope()

    def _authorizer(
        self, step: StepSpec, request: PreparedRequest, scope: dict[str, Any]
    ) -> Authorize | None:
        spec = step.request
        assert spec is not None
        if step.auth == "none" or spec.service is None:
            return None
        service = self.flow.services[spec.service]
        if step.auth != "inherit" and not isinstance(step.auth, str):
            config = step.auth.render(scope)
            auth = self.service_auth(spec.service, step)
        elif service.auth is not None:
            config = service.auth.render(scope)
            auth = self.service_auth(spec.service, None)
        else:
            return None
        base_url = _as_str(service.base_url.render(scope), "base_url") if service.base_url else None
        # Credentials go only to the service's own origin: an absolute `url` elsewhere, or a
        # next page on another host (allow_cross_host), gets none.
        if base_url and origin(request.url) != origin(base_url):
            return None
        return auth.authorizer(config, base_url)

    async def send(
        self,
        step: StepSpec,
        request: PreparedRequest,
        scope: dict[str, Any],
        *,
        first_attempt: int = 1,
        initial_wait: float | None = None,
    ) -> Response:
        """The step's request through its service's client, with the step's credentials,
        retry policy, timeouts and body limit; the final response, not yet decoded."""
        assert step.request is not None
        client = self.client(step.request.service)
        authorize = self._authorizer(step, request, scope) if self.uses_auth else None
        try:
            response = await client.send(
                request,
                retry=step.retry,
                timeouts=step.timeout,
                retry_unsafe=step.retry_unsafe,
                max_body_bytes=step.response.max_body_bytes,
                first_attempt=first_attempt,
                initial_wait=initial_wait,
                authorize=authorize,
            )
        finally:
            if self.auths:
                self._refresh_auth_scope()
        return response  # -v logs each attempt in the client

    def _refresh_auth_scope(self) -> None:
        for (service, step_id), auth in self.auths.items():
            if not step_id and auth.token_response is not None:
                self.auth_scope[service] = auth.token_response
        for name, spec in self.flow.services.items():
            if spec.auth_use is not None and spec.auth_use in self.auth_scope:
                self.auth_scope[name] = self.auth_scope[spec.auth_use]


def _as_str(value: Any, what: str) -> str:
    if value is None:
        raise RenderError(f"{what} rendered to null")
    return value if isinstance(value, str) else str(value)
