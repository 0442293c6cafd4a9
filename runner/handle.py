"""Handling: what a step does with its final response (or transport failure): the first
matching `on_status` rule and its action (retry included), `expect`, `set`, and the
failure that names step, request and response."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from .context import END, MAP, NEXT, STOP, Context, Goto, Outcome, RunState
from .errors import BODY_KEEP_CHARS, ExpectError, RunError, UnavailableError, format_path
from .http import TransportError, backoff_delay, retry_after_seconds
from .mapping import field_value
from .messages import PreparedRequest, Response
from .model import RuleSpec, SetSpec, StepSpec
from .redact import Redactor
from .words import plural

log = logging.getLogger("runner")

UNAVAILABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})

# The engine's resend for the `retry` action: the request again, counted from
# `first_attempt`, after `initial_wait` seconds; decoded, or the transport failure.
Resend = Callable[
    [StepSpec, PreparedRequest, dict[str, Any], int, float],
    Awaitable[tuple[Response | None, TransportError | None]],
]


def is_unavailable_status(status: int | None) -> bool:
    return status is not None and (status in UNAVAILABLE_STATUSES or 500 <= status <= 599)


class Handler:
    """Applies a step's rules, expectations and `set` to its responses, for one run."""

    __slots__ = ("_resend", "redactor", "state")

    def __init__(self, state: RunState, resend: Resend) -> None:
        self.state = state
        self.redactor = state.redactor
        self._resend = resend

    async def handle(
        self,
        step: StepSpec,
        ctx: Context,
        scope: dict[str, Any],
        request: PreparedRequest,
        response: Response | None,
        failure: TransportError | None,
    ) -> tuple[Outcome, dict[str, Any]]:
        """The outcome of the final response and the scope it was judged in: MAP (ok: map
        its records) or END (`end`: map them, then finish), else a Goto, STOP or NEXT
        (`skip`) with nothing to map. A `fail` raises; `retry` resends first."""
        while True:
            rscope = response_scope(scope, response, request)
            rule = self.match_rule(step, rscope) if step.on_status else None
            if rule is None:
                if failure is not None:
                    raise failure
                assert response is not None
                action = "ok" if 200 <= response.status < 300 else "fail"
            else:
                action = rule.action
                self._rule_effects(step, ctx, rule, rscope)
            if response is not None and step.referenced:
                kept = response_dict(response)
                ctx.sink.step_response(step.id, kept)
                local = self.state.keep_local(ctx, step.id)
                if local is not None:
                    local["response"] = kept
            if action != "retry":
                break
            assert rule is not None
            response, failure = await self._retry(
                step, request, scope, rule, rscope, response, failure
            )
        if action == "fail":
            raise self._failure(rule, rscope, request, response, failure)
        if action == "goto":
            assert rule is not None and rule.goto is not None
            return Goto(rule.goto), rscope
        if action == "stop":
            self.state.reports[step.id].stopped += 1
            self._log_rule(step, ctx, rule, rscope, request)
            return STOP, rscope
        if action == "skip":
            self.state.reports[step.id].skipped += 1
            self._log_rule(step, ctx, rule, rscope, request)
            return NEXT, rscope
        # ok and end: expect and set, then the records are mapped.
        if step.expect:
            self._check_expect(step, rscope, request, response)
        if step.set:
            self.apply_set(step, ctx, step.set, rscope)
        return (END if action == "end" else MAP), rscope

    def match_rule(self, step: StepSpec, rscope: dict[str, Any]) -> RuleSpec | None:
        status = rscope["status"]
        for rule in step.on_status:
            if not rule.matches_status(status):
                continue
            if rule.when is not None and not rule.when.holds(rscope):
                continue
            return rule
        return None

    def _log_rule(
        self,
        step: StepSpec,
        ctx: Context,
        rule: RuleSpec | None,
        rscope: dict[str, Any],
        request: PreparedRequest,
    ) -> None:
        """A `skip` or `stop`: its `message` at info (it was written to be read), else a
        debug line naming the rule."""
        assert rule is not None
        status = rscope["status"]
        after = f"after {status}" if status is not None else "after a transport error"
        where = f"step {step.id}" + (f" (item {ctx.item_index})" if ctx.in_item else "")
        fields: dict[str, Any] = {
            "method": request.method,
            "url": self.redactor.redact(rscope["url"]),
        }
        if status is not None:
            fields["status"] = status
        if rule.message is not None:
            text = message(self.redactor, rule.message, rscope, f"({format_path(rule.path)})")
            log.info("%s: %s %s: %s", where, rule.action, after, text, extra=fields)
        elif log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s: %s %s (%s)", where, rule.action, after, format_path(rule.path), extra=fields
            )

    async def _retry(
        self,
        step: StepSpec,
        request: PreparedRequest,
        scope: dict[str, Any],
        rule: RuleSpec,
        rscope: dict[str, Any],
        response: Response | None,
        failure: TransportError | None,
    ) -> tuple[Response | None, TransportError | None]:
        """The `retry` action: resend, sharing max_attempts with the transport's retries."""
        attempts = response.attempts if response else (failure.attempts if failure else None) or 1
        redactor = self.redactor
        if attempts >= step.retry.max_attempts:
            status = response.status if response is not None else None
            error_class = UnavailableError if is_unavailable_status(status) else RunError
            raise error_class(
                message(
                    redactor,
                    rule.message,
                    rscope,
                    f"retry attempts exhausted ({plural(attempts, 'attempt')})",
                ),
                kind=rule.kind or ("unavailable" if error_class is UnavailableError else "http"),
                **request_fields(redactor, request, response),
            )
        delay: float | None = None
        if rule.delay is not None:
            delay = self._rule_delay(step, rule, rscope, request, response)
        if delay is None and response is not None:
            delay = retry_after_seconds(
                response.headers.get("retry-after"), self.state.clock.time()
            )
            if delay is not None and delay > step.retry.max_retry_after:
                raise UnavailableError(
                    f"Retry-After of {delay:g} s exceeds max_retry_after "
                    f"({step.retry.max_retry_after:g} s)",
                    **request_fields(redactor, request, response),
                )
        if delay is None:
            delay = backoff_delay(step.retry, attempts, self.state.rng)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "step %s: on_status retry (%s): attempt %d of %d in %.2f s",
                step.id, format_path(rule.path), attempts + 1, step.retry.max_attempts, delay,
                extra={"attempt": attempts + 1, "delay_s": round(delay, 3)},
            )  # fmt: skip
        # The client counts this resend (first_attempt > 1) in stats.retries.
        return await self._resend(step, request, scope, attempts + 1, delay)

    def _rule_delay(
        self,
        step: StepSpec,
        rule: RuleSpec,
        rscope: dict[str, Any],
        request: PreparedRequest,
        response: Response | None,
    ) -> float | None:
        """A retry rule's `delay`: a finite number of seconds >= 0, at most max_retry_after;
        null or "" read from the response falls back to Retry-After and backoff."""
        assert rule.delay is not None
        source = str(rule.delay) if isinstance(rule.delay, float) else rule.delay.source
        value = rule.delay if isinstance(rule.delay, float) else rule.delay.search(rscope)
        if value is None or value == "":
            return None
        delay: float | None = None
        if isinstance(value, int | float | str) and not isinstance(value, bool):
            try:
                delay = float(value)
            except (ValueError, OverflowError):
                delay = None
        if delay is None or not math.isfinite(delay) or delay < 0:
            shown = json.dumps(value)[:100] if not isinstance(value, float) else repr(value)
            raise RunError(
                f"retry delay ({source}) gave {shown}: not a finite number of seconds >= 0",
                **request_fields(self.redactor, request, response),
            )
        if delay > step.retry.max_retry_after:
            raise UnavailableError(
                f"retry delay of {delay:g} s ({source}) exceeds max_retry_after "
                f"({step.retry.max_retry_after:g} s)",
                **request_fields(self.redactor, request, response),
            )
        return delay

    def _failure(
        self,
        rule: RuleSpec | None,
        rscope: dict[str, Any],
        request: PreparedRequest,
        response: Response | None,
        failure: TransportError | None,
    ) -> RunError:
        redactor = self.redactor
        if failure is not None and response is None:
            if rule is not None and rule.message is not None:
                failure.message = message(redactor, rule.message, rscope, failure.message)
            return failure
        assert response is not None
        status = response.status
        if rule is None:
            unavailable = is_unavailable_status(status)
            default = (
                "the service stayed unavailable (try again later)"
                if unavailable
                else f"status {status} is not 2xx and no on_status rule matched it"
            )
            cls = UnavailableError if unavailable else RunError
            return cls(
                default,
                kind="unavailable" if unavailable else "http",
                **request_fields(redactor, request, response),
            )
        default = f"status {status} matched a fail rule"
        text = message(redactor, rule.message, rscope, default)
        kind = rule.kind or "http"
        cls = UnavailableError if kind == "unavailable" else RunError
        return cls(text, kind=kind, **request_fields(redactor, request, response))

    def _check_expect(
        self,
        step: StepSpec,
        rscope: dict[str, Any],
        request: PreparedRequest,
        response: Response | None,
    ) -> None:
        failed = []
        for expect in step.expect:
            if not expect.that.holds(rscope):
                failed.append(
                    message(
                        self.redactor,
                        expect.message,
                        rscope,
                        f"expectation failed: {expect.that.source}",
                    )
                )
        if failed:
            raise ExpectError("; ".join(failed), **request_fields(self.redactor, request, response))

    def apply_set(
        self, step: StepSpec, ctx: Context, sets: tuple[SetSpec, ...], rscope: dict[str, Any]
    ) -> None:
        """A step's (or a rule's) `set`: `steps.<id>.vars`, secret values redacted."""
        if not sets:
            return
        values = {}
        for spec in sets:
            value = spec.expression.search(rscope)
            if spec.secret:
                self._add_secret(value)
            values[spec.name] = value
        ctx.sink.step_vars(step.id, values)
        local = self.state.keep_local(ctx, step.id)
        if local is not None:
            local["vars"].update(values)

    def _add_secret(self, value: Any) -> None:
        if isinstance(value, str):
            self.redactor.add(value)
        elif value is not None:
            self.redactor.add(json.dumps(value, ensure_ascii=False, separators=(",", ":")))

    def _rule_effects(
        self, step: StepSpec, ctx: Context, rule: RuleSpec, rscope: dict[str, Any]
    ) -> None:
        """A rule's own `set` and `emit` run whatever its action."""
        self.apply_set(step, ctx, rule.set, rscope)
        if rule.emit and self.state.writes(step):
            if rule.fields is None:
                record = rscope["body"]
            else:
                record = {f.name: field_value(f, rscope, rscope) for f in rule.fields}
            ctx.sink.emit(rule.emit, record if isinstance(record, dict) else {"value": record})


# -- the response as the scope sees it, and as an error shows it -----------------------------


def response_dict(response: Response) -> dict[str, Any]:
    """The response's keys in a scope and in `steps.<id>.response`."""
    return {
        "status": response.status,
        "reason": response.reason,
        "headers": response.headers,
        "body": response.data,
        "url": response.url,
    }


def response_scope(
    scope: dict[str, Any], response: Response | None, request: PreparedRequest
) -> dict[str, Any]:
    """The step's scope with the response's keys (null ones after a transport failure)."""
    if response is None:
        return {
            **scope,
            "status": None,
            "reason": None,
            "headers": {},
            "body": None,
            "url": request.url,
        }
    return {**scope, **response_dict(response)}


def request_fields(
    redactor: Redactor, request: PreparedRequest, response: Response | None
) -> dict[str, Any]:
    """What a failure names of the exchange: method, URL, status, body excerpt, attempts."""
    fields: dict[str, Any] = {
        "method": request.method,
        "url": redactor.redact(response.url if response else request.url),
    }
    if response is not None:
        fields.update(
            status=response.status,
            reason=response.reason,
            body=redactor.excerpt(response.body, BODY_KEEP_CHARS),
            attempts=response.attempts,
            elapsed_s=response.elapsed_s,
        )
    return fields


def message(redactor: Redactor, template: Any, scope: dict[str, Any], default: str) -> str:
    """A rule's or poll's `message`; one that fails to render falls back to the default."""
    if template is None:
        return default
    try:
        return redactor.redact(str(template.render(scope)))
    except RunError:
        return default
