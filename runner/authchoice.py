"""Auth chosen once per run, before secrets are resolved: the first alternative of a service
whose `when` holds (on inputs, env and `has_secret('NAME')`), and the auth a service shares
with `auth: {use: S}`. Secrets and environment variables read only by alternatives not
chosen are not required."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .errors import RenderError, UsageError
from .expressions import SECRET_PRESENCE, Expression, truthy
from .model import AuthAlternative, Flow, ServiceSpec
from .secrets import read_secret
from .templates import Template

__all__ = ["choose_auth"]


def choose_auth(flow: Flow, inputs: Mapping[str, Any], environ: Mapping[str, str]) -> Flow:
    """The flow with one auth per service; UsageError (exit 2) when no alternative applies."""
    services = flow.services
    if not any(s.auth_alternatives or s.auth_use for s in services.values()):
        return flow

    def has_secret(name: Any) -> bool:
        return read_secret(str(name), environ) is not None

    scope = {"inputs": dict(inputs), "env": dict(environ)}
    chosen: dict[str, ServiceSpec] = dict(services)
    secrets = set(flow.secrets)
    passed_over: list[str] = []  # the key paths of the alternatives not chosen
    for name, spec in services.items():
        if not spec.auth_alternatives:
            continue
        alternative = _first(name, spec.auth_alternatives, scope, has_secret)
        chosen[name] = dataclasses.replace(spec, auth=alternative.auth, auth_alternatives=())
        secrets |= alternative.secrets
        passed_over += [
            f"services.{name}.auth[{i}]"
            for i, other in enumerate(spec.auth_alternatives)
            if other is not alternative
        ]
    for name, spec in services.items():
        if spec.auth_use is not None and spec.auth_use in chosen:
            chosen[name] = dataclasses.replace(spec, auth=chosen[spec.auth_use].auth)
    env_reads = tuple(r for r in flow.env_reads if not _inside(r.path, passed_over))
    return dataclasses.replace(
        flow, services=chosen, secrets=frozenset(secrets), env_reads=env_reads
    )


def _inside(path: str, places: list[str]) -> bool:
    return any(path == p or path.startswith((p + ".", p + "[")) for p in places)


def _first(
    service: str,
    alternatives: tuple[AuthAlternative, ...],
    scope: dict[str, Any],
    has_secret: Any,
) -> AuthAlternative:
    token = SECRET_PRESENCE.set(has_secret)
    try:
        for i, alternative in enumerate(alternatives):
            if alternative.when is None:
                return alternative
            try:
                if _holds(alternative.when, scope, has_secret):
                    return alternative
            except RenderError as exc:
                # Before the first request: a usage problem, like a missing input.
                raise UsageError(f"service '{service}': auth[{i}].when: {exc.message}") from exc
    finally:
        SECRET_PRESENCE.reset(token)
    raise UsageError(
        f"service '{service}': no auth alternative applies (the 'when' of each is false)"
    )


def _holds(when: Expression | Template, scope: dict[str, Any], has_secret: Any) -> bool:
    if isinstance(when, Expression):
        return truthy(when.search(scope))
    return truthy(when.render({**scope, "has_secret": has_secret}))
