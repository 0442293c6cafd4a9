"""`runner run --dry-run`: the first request of each step, rendered from what exists before
the run (inputs, env, secrets as ***, state, run); nothing is sent or written."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any, TextIO

from . import clock
from .context import Context, RunInfo
from .engine import FlowRun
from .errors import RunError, UsageError
from .incremental import state_scope as state_view
from .model import Flow, StepSpec
from .outputs import StateStore, StdoutOutputs
from .paginate import Pagination
from .redact import MASK, Redactor
from .secrets import Secrets
from .shard import Shard, cursors_for

# Scope names whose values exist before the first request.
STATIC_NAMES = frozenset({"inputs", "env", "secrets", "state", "run"})


async def show_dry_run(
    flow: Flow,
    inputs: dict[str, Any],
    environ: dict[str, str],
    out: TextIO,
    state_path: str | None,
    shard: Shard | None = None,
) -> None:
    saved: dict[str, Any] = {}
    if state_path and os.path.exists(state_path):
        saved = StateStore(state_path).load()
    streams = cursors_for(saved, shard, flow.outputs)
    state_scope = state_view(flow.outputs, streams, set(flow.streams) | set(streams))
    started = clock.current().now()
    run = FlowRun(
        flow=flow,
        inputs=inputs,
        environ=environ,
        secrets=Secrets(environ, Redactor(), masked=True),
        state=state_scope,
        outputs=StdoutOutputs({}, out),
        redactor=Redactor(),
        info=RunInfo("dry-run", started, flow.name),
    )
    root = run.root_context()
    blocks = [
        await _block(run, step, ctx, waits)
        for step, ctx, waits in _steps_with_context(run, flow.steps, root, "")
    ]
    incremental = _state_lines(flow, state_scope, streams)
    if incremental:
        blocks.append("\n".join(["state:", *incremental]))
    out.write("\n\n".join(blocks) + "\n")
    out.flush()


def _steps_with_context(
    run: FlowRun, steps: tuple[StepSpec, ...], ctx: Context | None, waits: str
) -> Iterator[tuple[StepSpec, Context | None, str]]:
    """Each request step with the context of its first request: inside a for_each whose list
    is known before the run, the first item; otherwise None and what the list waits for."""
    for step in steps:
        inner, inner_waits = ctx, waits
        if step.for_each is not None and ctx is not None:
            expr = step.for_each
            inner = None
            if _is_static(expr.root_names, expr.step_refs):
                items = expr.search(run.scope(ctx))
                if isinstance(items, list) and items:
                    inner = ctx.child(items[0], 0, ctx.sink, step.steps)
                else:
                    inner_waits = f"items (for_each {expr.source} is empty)"
            else:
                refs = sorted(f"steps.{ref}" for ref in expr.step_refs) or [expr.source]
                inner_waits = ", ".join(refs) + " (for_each)"
        if step.request is not None:
            yield step, inner, inner_waits
        yield from _steps_with_context(run, step.steps, inner, inner_waits)


def _is_static(names: frozenset[str], step_refs: frozenset[str]) -> bool:
    return not step_refs and names <= STATIC_NAMES


async def _block(run: FlowRun, step: StepSpec, ctx: Context | None, waits: str) -> str:
    lines = [f"step {step.id}:"]
    if ctx is None:
        lines.append(f"  needs {waits}")
        return "\n".join(lines)
    needs = sorted(_needs(run.flow, step, with_item=ctx.in_item))
    if needs:
        lines.append("  needs " + ", ".join(needs))
        return "\n".join(lines)
    pager = Pagination(step.paginate)
    try:
        request = await run.builder.request(step, run.scope(ctx, pager.scope()), pager)
    except RunError as exc:
        raise UsageError(f"--dry-run: step '{step.id}': {exc.message}") from exc
    query = "&".join(f"{k}={v}" for k, v in request.query)
    lines.append(f"  {request.method} {request.url}" + (f"?{query}" if query else ""))
    if ctx.in_item:
        lines.append("  (the for_each's first item)")
    for name, value in request.headers.items():
        lines.append(f"  {name}: {value}")
    lines.extend(f"  {line}" for line in _credentials(run.flow, step))
    if request.body is not None:
        lines.append("  body: " + request.body.decode("utf-8", "replace")[:2000])
    mapping = _mapping_line(run.flow, step)
    if mapping:
        lines.append(mapping)
    return "\n".join(lines)


def _mapping_line(flow: Flow, step: StepSpec) -> str | None:
    """The step's mapping, in the order it runs: records, filter, fields, add_fields,
    drop_fields, rename_keys, skip_seen, emit."""
    if step.records is None:
        return None
    parts = [f"records {step.records.source}"]
    if step.filter is not None:
        parts.append(f"filter {step.filter.source}")
    if step.fields is not None:
        parts.append("fields " + ", ".join(f.name for f in step.fields))
    if step.add_fields:
        parts.append("add_fields " + ", ".join(f.name for f in step.add_fields))
    if step.drop_fields:
        parts.append("drop_fields " + ", ".join(step.drop_fields))
    if step.rename_keys is not None:
        rename = step.rename_keys
        shown = (
            rename if isinstance(rename, str) else ", ".join(f"{a}->{b}" for a, b in rename.items())
        )
        parts.append(f"rename_keys {shown}")
    if step.emit:
        spec = flow.outputs.get(step.emit)
        if spec is not None and spec.skip_seen:
            parts.append("skip_seen")
        parts.append(f"emit {step.emit}")
    return "  map: " + " -> ".join(parts)


def _state_lines(flow: Flow, scope: dict[str, dict[str, Any]], saved: dict[str, Any]) -> list[str]:
    """Per stream with a cursor: what templates read as state.<stream>, and where it comes
    from (the state file, or `start`), with skip_seen's keys at the stored value."""
    lines = []
    for name in sorted(flow.outputs):
        spec = flow.outputs[name]
        if spec.cursor_field is None:
            continue
        entry = saved.get(name)
        stored = entry.get("cursor") if isinstance(entry, dict) else None
        view = scope.get(name, {})
        origin = "stored" if stored is not None else ("start" if spec.cursor_start else "none")
        line = (
            f"  {name}: cursor {json.dumps(view.get('cursor'))}, since "
            f"{json.dumps(view.get('since'))} ({origin}"
        )
        if spec.cursor_lookback is not None:
            line += f", lookback {spec.cursor_lookback}"
        if spec.skip_seen:
            seen = entry.get("seen") if isinstance(entry, dict) else None
            count = len(seen) if isinstance(seen, list) else 0
            line += f", skip_seen: {count} keys seen at the cursor"
        lines.append(line + ")")
    return lines


def _auth_config(flow: Flow, step: StepSpec) -> Any:
    if step.auth == "none":
        return "none"
    if not isinstance(step.auth, str):
        return step.auth.source
    assert step.request is not None
    service = flow.services.get(step.request.service) if step.request.service else None
    if service is not None and service.auth is not None:
        return service.auth.source
    return None


def _credentials(flow: Flow, step: StepSpec) -> list[str]:
    """How the credentials would be sent, with every value masked."""
    config = _auth_config(flow, step)
    if config is None or config == "none":
        return ["auth: none"] if config == "none" else []
    kind = config.get("type")
    if kind == "basic":
        return ["Authorization: Basic ***"]
    if kind == "bearer":
        return ["Authorization: Bearer ***"]
    if kind == "api_key":
        where = config.get("in", "header")
        name = config.get("name", "")
        return [f"{name}: {MASK}" if where == "header" else f"api key in {where} {name}={MASK}"]
    if kind == "session":
        return ["auth: session (token from the login request, at the first request)"]
    return [f"auth: {kind} (token from {config.get('token_url')}, at the first request)"]


def _needs(flow: Flow, step: StepSpec, *, with_item: bool) -> set[str]:
    """What a step's first request needs beyond the static names: `steps.X`, `item`, ..."""
    spec = step.request
    assert spec is not None
    names: set[str] = set()
    step_refs: set[str] = set()
    parts: list[Any] = [spec.path, spec.url, spec.query, spec.headers, spec.body,
                        spec.body_template, spec.content_type]  # fmt: skip
    service = flow.services.get(spec.service) if spec.service else None
    if service is not None:
        parts += [service.base_url, service.headers]
    for part in parts:
        if part is not None:
            names |= set(part.names)
            step_refs |= set(part.step_refs)
    needs = {f"steps.{ref}" for ref in step_refs}
    known = STATIC_NAMES | {"steps", "page"} | ({"item", "item_index"} if with_item else set())
    return needs | (names - known)
