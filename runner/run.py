"""A whole run: inputs, secrets, state lock, outputs, signals and `--timeout` around the engine;
the commit on success, and the summary on every exit."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import os
import random
import secrets as _random
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

from . import clock as clocks
from . import logs
from .authchoice import choose_auth
from .clock import SYSTEM_CLOCK, Clock
from .compiler import compile_document
from .dryrun import STATIC_NAMES, show_dry_run
from .engine import FlowRun, RunInfo
from .errors import (
    EXIT_OK,
    FlowError,
    InterruptedRun,
    RunError,
    RunnerError,
    UnavailableError,
    UsageError,
    did_you_mean,
)
from .http import aiohttp_transport, is_loopback
from .incremental import seen_filters
from .incremental import state_scope as state_view
from .loader import load_document
from .model import NO_INPUTS, Flow, declared_inputs
from .outputs import atomic_write
from .outputs.sinks import make_outputs
from .progress import Progress
from .redact import Redactor
from .secrets import Secrets
from .shard import DEFAULT_OUTPUT_DIR, PLACEHOLDER, Shard, cursors_for, parse_shard
from .transport import TransportFactory
from .validate import load_services_override
from .words import plural

log = logging.getLogger("runner")


@dataclass(frozen=True, slots=True)
class RunResult:
    """What a run ended with: the exit code, its status and the summary."""

    exit_code: int
    status: str  # success | failed | interrupted
    summary: dict[str, Any]


def load_flow(path: str | os.PathLike[str], services: str | os.PathLike[str] | None = None) -> Flow:
    """Load and compile a flow file (the compile pass); FlowError (exit 2) with every error."""
    doc = load_document(path)
    overrides = load_services_override(str(services)).data if services is not None else None
    compiled = compile_document(doc, overrides)
    if compiled.flow is None:
        raise FlowError(compiled.errors)
    return compiled.flow


def new_run_id(started_at: datetime) -> str:
    return started_at.strftime("%Y%m%dT%H%M%SZ") + "-" + _random.token_hex(3)


# -- inputs ----------------------------------------------------------------------------------


def apply_defaults(schema: Mapping[str, Any], value: Any) -> Any:
    """Fill in JSON Schema `default`s of object properties, recursively (jsonschema does not)."""
    if not isinstance(value, dict) or not isinstance(schema, Mapping):
        return value
    properties = schema.get("properties")
    if not isinstance(properties, Mapping):
        return value
    out = dict(value)
    for name, sub in properties.items():
        if not isinstance(sub, Mapping):
            continue
        if name not in out and "default" in sub:
            out[name] = copy.deepcopy(sub["default"])
        if name in out:
            out[name] = apply_defaults(sub, out[name])
    return out


def prepare_inputs(flow: Flow, inputs: Mapping[str, Any] | None) -> dict[str, Any]:
    """The run's inputs with the schema's defaults; UsageError (exit 2) for an input the
    flow does not declare or a value its schema refuses."""
    if flow.inputs_schema == NO_INPUTS:
        return dict(inputs or {})  # any mapping is valid: no need to import jsonschema
    declared = declared_inputs(flow.inputs_schema)
    if declared is not None:
        unknown = [name for name in inputs or {} if name not in declared]
        if unknown:
            lines = [
                f"input '{name}' is not declared by the flow" + did_you_mean(str(name), declared)
                for name in unknown
            ]
            listed = ", ".join(declared) if declared else "none"
            raise UsageError("\n".join(lines) + f"\nthe flow's inputs are: {listed}")
    import jsonschema

    values = apply_defaults(flow.inputs_schema, dict(inputs or {}))
    validator = jsonschema.Draft202012Validator(flow.inputs_schema)
    errors = sorted(validator.iter_errors(values), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for error in errors:
            where = ".".join(str(p) for p in error.absolute_path) or "inputs"
            lines.append(f"input {where}: {error.message}")
        raise UsageError("invalid inputs:\n  " + "\n  ".join(lines))
    if not isinstance(values, dict):
        raise UsageError("inputs must be a mapping of names to values")
    return values


# -- checks before the first request --------------------------------------------------------


def check_environment(flow: Flow, environ: Mapping[str, str]) -> None:
    """Every environment variable the templates read without a default is set; else exit 2,
    naming each missing one and where it is read."""
    missing: dict[str, list[str]] = {}
    for read in flow.env_reads:
        if read.name not in environ:
            missing.setdefault(read.name, []).append(read.where)
    if missing:
        lines = [
            f"environment variable {name} is not set (read at {'; '.join(where)})"
            for name, where in sorted(missing.items())
        ]
        raise UsageError("\n".join(lines))


def _shard_paths(
    flow: Flow, shard: Shard | None, output_dir: str | None, state_path: str | None
) -> tuple[str, str | None]:
    """--output-dir and --state with `{shard}` filled in; exit 2 for `--shard` on a flow
    without a `shard: true` step, or `{shard}` without `--shard`."""
    if shard is None:
        for flag, path in (("--output-dir", output_dir), ("--state", state_path)):
            if path is not None and PLACEHOLDER in path:
                raise UsageError(f"{flag} {path}: {PLACEHOLDER} needs --shard I/N")
        return output_dir if output_dir is not None else "out", state_path
    if not flow.sharded:
        raise UsageError(
            f"--shard {shard.key}: flow '{flow.name}' has no for_each step with shard: true, "
            "so every shard would run all of it; mark the for_each to split with shard: true"
        )
    directory = shard.fill(output_dir if output_dir is not None else DEFAULT_OUTPUT_DIR)
    return directory, shard.fill(state_path) if state_path is not None else None


def sharded_streams(flow: Flow) -> frozenset[str]:
    """The streams that steps inside (or reading) a `shard: true` step emit."""
    names: set[str] = set()
    for step in flow.all_steps():
        if step.in_shard:
            names.update(s for s in (step.emit, *(r.emit for r in step.on_status)) if s)
    return frozenset(names)


def check_services_before_run(flow: Flow, run: FlowRun) -> None:
    """A templated base_url that renders from static names is checked for plain http now."""
    from urllib.parse import urlsplit

    for service in flow.services.values():
        template = service.base_url
        if template is None or (template.is_constant and not template.source):
            continue
        if not template.names <= STATIC_NAMES:
            continue
        try:
            url = str(template.render(run.base_scope))
        except RunError:
            continue
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.scheme == "http" and not service.allow_insecure_http and not is_loopback(host):
            raise UsageError(
                f"service '{service.name}': base_url {run.redactor.redact(url)} is plain http:// "
                f"to {host}: use https, or set allow_insecure_http: true"
            )
        if parts.scheme not in ("http", "https"):
            raise UsageError(
                f"service '{service.name}': base_url {run.redactor.redact(url)!r} is not an "
                "http(s) URL"
            )
    for step in flow.all_steps():
        auth_types = []
        if step.request and step.request.service:
            used = flow.services.get(step.request.service)
            if used and used.auth is not None and step.auth == "inherit":
                auth_types.append(_auth_type(used.auth.source))
        if not isinstance(step.auth, str):
            auth_types.append(_auth_type(step.auth.source))
        if "oauth2_refresh_token" in auth_types and run.refresh_token_store is None:
            raise UsageError(
                "oauth2_refresh_token needs --state or a database sink to keep the rotated "
                "refresh token"
            )


def _auth_type(source: Any) -> str | None:
    return source.get("type") if isinstance(source, Mapping) else None


# -- the run ---------------------------------------------------------------------------------


def run_flow(
    flow: Flow | str | os.PathLike[str],
    inputs: Mapping[str, Any] | None = None,
    *,
    output_dir: str | None = None,
    output: str | None = None,
    sink: str | None = None,
    state: str | None = None,
    dry_run: bool = False,
    summary: str | None = None,
    timeout: float | None = None,
    services: str | None = None,
    environ: Mapping[str, str] | None = None,
    stdout: TextIO | None = None,
    progress: TextIO | None = None,
    handle_signals: bool = False,
    redactor: Redactor | None = None,
    transport: TransportFactory = aiohttp_transport,
    clock: Clock = SYSTEM_CLOCK,
    rng: random.Random | None = None,
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
    run_id: str | None = None,
    files_dir: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    shard: str | Shard | None = None,
) -> RunResult:
    """Run a flow as `runner run` does, in an event loop of its own; never raises for a
    failed run: the outcome is in the returned RunResult.

    flow: a Flow from `load_flow`, or the path of a flow file (loaded with `services`).
    inputs: the run's inputs, checked against the flow's inputs schema (defaults filled in).
    output_dir: where the JSONL files and the manifest go (default `out`, with a shard
        `out/{shard}`); `{shard}` becomes the shard's index.
    output: `"-"` writes the records as NDJSON to `stdout` instead of files.
    sink: a destination URL (`sqlite:///path.db`, `postgresql://...`, `singer`) instead of files.
    state: the state file (cursors, refresh tokens), read at the start, written on success.
    dry_run: render the first request of each step to `stdout`; send nothing, write nothing.
    summary: a path to write the run summary to (JSON), on every exit but a dry run.
    timeout: bound the whole run, in seconds (exit 69 when reached).
    services: a `--services` file overriding service settings (only with a flow path).
    environ: the environment the flow's `env.*` and secrets are read from (default os.environ).
    stdout: where `output="-"` and `dry_run` write (default sys.stdout).
    progress: a terminal stream to draw the progress line on (default: none).
    handle_signals: turn SIGINT/SIGTERM into an interrupted run (exit 130/143); for a
        process that owns its signals, as the CLI does.
    redactor: a Redactor to share with the caller's own output (the CLI's log handler).
    transport: makes the transport of each service (runner/transport.py; default: the
        network through aiohttp).
    clock: times the run and its waits (runner/clock.py; default: the system's clock).
    rng: draws the retries' jitter (default: the `random` module).
    loop_factory: makes the run's event loop (default: by RUNNER_EVENT_LOOP, uvloop when
        installed); `run_flow` only.
    run_id: names the run (default: its start time and a random suffix).
    files_dir: folders besides the flow's own that multipart `file:` parts may read from
        (`--files-dir`).
    shard: `"I/N"` (or a Shard): run shard I of N of the flow's `shard: true` steps
        (`--shard`, docs/SCALING.md); `{shard}` in output_dir and state becomes I.

    Called inside a running event loop it raises RuntimeError: await `run_flow_async` there.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError(
            "runner.run_flow() cannot run inside a running event loop (this thread already "
            "runs one: Jupyter, an async web framework, an async task); use "
            "`await runner.run_flow_async(...)` there, with the same arguments"
        )
    environ = dict(os.environ if environ is None else environ)
    redactor = redactor if redactor is not None else Redactor()
    new_loop = loop_factory
    if new_loop is None and not dry_run:
        try:
            new_loop = _event_loop_for(environ)
        except UsageError as exc:  # a bad RUNNER_EVENT_LOOP: reported as the run's outcome
            return _outcome_before_start(flow, exc, summary, redactor)
    with asyncio.Runner(loop_factory=new_loop) as loop_runner:
        return loop_runner.run(
            run_flow_async(
                flow, inputs, output_dir=output_dir, output=output, sink=sink, state=state,
                dry_run=dry_run, summary=summary, timeout=timeout, services=services,
                environ=environ, stdout=stdout, progress=progress,
                handle_signals=handle_signals, redactor=redactor, transport=transport,
                clock=clock, rng=rng, run_id=run_id, files_dir=files_dir, shard=shard,
            )
        )  # fmt: skip


async def run_flow_async(
    flow: Flow | str | os.PathLike[str],
    inputs: Mapping[str, Any] | None = None,
    *,
    output_dir: str | None = None,
    output: str | None = None,
    sink: str | None = None,
    state: str | None = None,
    dry_run: bool = False,
    summary: str | None = None,
    timeout: float | None = None,
    services: str | None = None,
    environ: Mapping[str, str] | None = None,
    stdout: TextIO | None = None,
    progress: TextIO | None = None,
    handle_signals: bool = False,
    redactor: Redactor | None = None,
    transport: TransportFactory = aiohttp_transport,
    clock: Clock = SYSTEM_CLOCK,
    rng: random.Random | None = None,
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
    run_id: str | None = None,
    files_dir: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    shard: str | Shard | None = None,
) -> RunResult:
    """`run_flow` for hosts that already run an event loop (Jupyter, FastAPI, async Airflow
    tasks): the same parameters and the same RunResult, run in the caller's loop.

    RUNNER_EVENT_LOOP does not apply (the loop is the host's). Loading the flow, opening the
    outputs and the commit are short blocking steps in the loop's thread. Cancelling the
    awaiting task stops the run, commits nothing and re-raises CancelledError.
    `loop_factory` is refused (ValueError): the loop is the caller's.
    """
    if loop_factory is not None:
        raise ValueError(
            "run_flow_async runs in the caller's event loop: loop_factory is for run_flow"
        )
    with clocks.using(clock):
        return await _execute(
            flow, inputs, output_dir=output_dir, output=output, sink=sink, state=state,
            dry_run=dry_run, summary=summary, timeout=timeout, services=services,
            environ=dict(os.environ if environ is None else environ), stdout=stdout,
            progress=progress, handle_signals=handle_signals,
            redactor=redactor if redactor is not None else Redactor(),
            transport=transport, clock=clock, rng=rng, run_id=run_id, files_dir=files_dir,
            shard=shard,
        )  # fmt: skip


def _outcome_before_start(
    flow: Flow | str | os.PathLike[str],
    error: RunnerError,
    summary: str | None,
    redactor: Redactor,
) -> RunResult:
    name = flow.name if isinstance(flow, Flow) else str(flow)
    log.error("%s", redactor.redact(str(error)))
    data = failure_before_run(name, error, redactor)
    if summary:
        write_summary(summary, data)
    return RunResult(data["exit_code"], data["status"], data)


async def _execute(
    flow: Flow | str | os.PathLike[str],
    inputs: Mapping[str, Any] | None,
    *,
    output_dir: str | None,
    output: str | None,
    sink: str | None,
    state: str | None,
    dry_run: bool,
    summary: str | None,
    timeout: float | None,
    services: str | None,
    environ: dict[str, str],
    stdout: TextIO | None,
    progress: TextIO | None,
    handle_signals: bool,
    redactor: Redactor,
    transport: TransportFactory,
    clock: Clock,
    rng: random.Random | None,
    run_id: str | None,
    files_dir: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None,
    shard: str | Shard | None,
) -> RunResult:
    started_at = clock.now()
    run_id = run_id or new_run_id(started_at)
    out = stdout or sys.stdout
    flow_name = str(flow) if not isinstance(flow, Flow) else flow.name
    began = clock.monotonic()
    runner_state: dict[str, Any] = {"run": None}
    part: Shard | None = None
    with logs.run_context(run_id, flow_name) as logged:
        try:
            part = shard if isinstance(shard, Shard) or shard is None else parse_shard(shard)
            logged.shard = part.key if part is not None else None
            if not isinstance(flow, Flow):
                flow = load_flow(flow, services)
            elif services is not None:
                raise UsageError("pass services= together with a flow path, not a loaded Flow")
            flow_name = logged.flow = flow.name
            if dry_run:
                if sink is not None:  # checked, never connected: a dry run writes nothing
                    from .outputs.sinks import check_sink

                    check_sink(sink, output, state, environ, redactor)
                values = prepare_inputs(flow, inputs)
                check_environment(flow, environ)
                _, state = _shard_paths(flow, part, output_dir, state)
                await show_dry_run(
                    choose_auth(flow, values, environ), values, environ, out, state, part
                )
                return RunResult(EXIT_OK, "success", {})
            result = await _run(
                flow, inputs, output_dir, output, sink, state, timeout, environ, out, redactor,
                run_id, started_at, runner_state, handle_signals, progress, transport, clock,
                rng, _folders(files_dir), part,
            )  # fmt: skip
            error = None
            exit_code = result
        except Exception as exc:
            # A bug of ours still ends as a failed run with a summary, never a traceback.
            if not isinstance(exc, RunnerError):
                log.debug("internal error", exc_info=True)
                exc = RunError(f"internal error: {type(exc).__name__}: {exc}", kind="internal")
            if isinstance(exc, RunError):
                exc.redacted(redactor.redact)  # the body before it is cut to its excerpt
            else:
                exc.message = redactor.redact(exc.message)
            error = exc
            exit_code = exc.code if isinstance(exc, InterruptedRun) else exc.exit_code
            text = redactor.redact(str(exc))
            log.error("%s", text, extra=logs.error_fields(exc, text))
        status = (
            "success"
            if exit_code == EXIT_OK
            else ("interrupted" if isinstance(error, InterruptedRun) else "failed")
        )
        run: FlowRun | None = runner_state["run"]
        summary_data = _summary(
            run_id,
            flow_name,
            status,
            exit_code,
            started_at,
            clock.monotonic() - began,
            run,
            error,
            redactor,
            part,
        )
        if summary:
            write_summary(summary, summary_data)
        return RunResult(exit_code, status, summary_data)


def _folders(
    files_dir: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None,
) -> tuple[str, ...]:
    """--files-dir: one folder or several; each must exist (exit 2)."""
    if files_dir is None:
        return ()
    given = [files_dir] if isinstance(files_dir, str | os.PathLike) else list(files_dir)
    folders = tuple(os.fspath(f) for f in given)
    for folder in folders:
        if not os.path.isdir(folder):
            raise UsageError(f"--files-dir {folder}: not a folder")
    return folders


def write_summary(path: str, data: dict[str, Any]) -> None:
    try:
        atomic_write(path, (json.dumps(data, indent=2) + "\n").encode())
    except OSError as exc:
        log.error("cannot write the summary to %s: %s", path, exc)


def failure_before_run(flow_name: str, error: RunnerError, redactor: Redactor) -> dict[str, Any]:
    """The summary of a run that failed before it started (a bad flow, bad inputs)."""
    started = datetime.now(UTC)
    interrupted = isinstance(error, InterruptedRun)
    return _summary(
        new_run_id(started), flow_name, "interrupted" if interrupted else "failed",
        exit_code_of(error), started, 0.0, None, error, redactor,
    )  # fmt: skip


def exit_code_of(error: RunnerError) -> int:
    """The process's exit code for an error: 130 or 143 for a signal, else the class's."""
    return error.code if isinstance(error, InterruptedRun) else error.exit_code


async def _run(
    flow: Flow,
    inputs: Mapping[str, Any] | None,
    output_dir: str | None,
    output: str | None,
    sink: str | None,
    state_path: str | None,
    timeout: float | None,
    environ: dict[str, str],
    out: TextIO,
    redactor: Redactor,
    run_id: str,
    started_at: datetime,
    holder: dict[str, Any],
    handle_signals: bool,
    progress: TextIO | None,
    transport: TransportFactory,
    clock: Clock,
    rng: random.Random | None,
    files_dirs: tuple[str, ...] = (),
    shard: Shard | None = None,
) -> int:
    run_started = clock.monotonic()
    output_dir, state_path = _shard_paths(flow, shard, output_dir, state_path)
    values = prepare_inputs(flow, inputs)
    flow = choose_auth(flow, values, environ)
    check_environment(flow, environ)
    secrets = Secrets(environ, redactor)
    places: dict[str, list[str]] = {}
    for read in flow.secret_reads:
        places.setdefault(read.name, []).append(read.where)
    secrets.resolve(flow.secrets, places)
    outputs = make_outputs(
        sink=sink,
        output=output,
        output_dir=output_dir,
        state_path=state_path,
        flow=flow.name,
        streams=flow.outputs,
        emitted=flow.emitted,
        run_id=run_id,
        started_at=started_at,
        out=out,
        environ=environ,
        redactor=redactor,
        shard=shard.key if shard is not None else None,
    )
    outputs.acquire()
    try:
        saved = outputs.state.load() if outputs.state is not None else {}
        # This run's own cursors; where it has none, the smallest another shard layout kept.
        saved_streams = cursors_for(saved, shard, flow.outputs)
        state_scope = state_view(
            flow.outputs, saved_streams, set(flow.streams) | set(saved_streams)
        )
        run = FlowRun(
            flow=flow,
            inputs=values,
            environ=environ,
            secrets=secrets,
            state=state_scope,
            outputs=outputs,
            redactor=redactor,
            info=RunInfo(run_id, started_at, flow.name),
            refresh_token_store=outputs.state,
            transport=transport,
            clock=clock,
            rng=rng,
            seen_filters=seen_filters(flow.outputs, saved_streams),
            files_dirs=files_dirs,
            shard=shard,
        )
        holder["run"] = run
        if shard is not None:
            for warning in flow.shard_warnings:
                run.warn(warning)
        check_services_before_run(flow, run)
        outputs.open()
        try:
            await _drive(run, timeout, handle_signals, progress)
        except BaseException:
            logs.leave_step()
            outputs.abort()
            raise
        logs.leave_step()  # the lines below are the run's, not its last step's
        # Cursors first: a cursor that cannot be compared fails the run before anything is
        # published. Then the destination commits the records and the new state together.
        # The stored cursors: `cursor.start` is never written to the state by itself.
        old = {
            name: entry.get("cursor") if isinstance(entry, dict) else None
            for name, entry in saved_streams.items()
        }
        cursors: dict[str, Any] = outputs.new_cursors(old)
        for stream in run.cut_short_streams:
            if stream in cursors:
                cursors[stream] = old.get(stream)
        for stream, seen in run.seen_filters.items():
            if cursors.get(stream) is not None:
                cursors[stream] = seen.state(cursors[stream])
        if not run.run_state.writes_outside_shard:
            # Shard 0 keeps the cursors of the streams written outside the sharded steps.
            kept = sharded_streams(flow)
            cursors = {name: cursor for name, cursor in cursors.items() if name in kept}
        outputs.commit(cursors, frozenset(run.cut_short_streams))
        total = sum(outputs.counts.values())
        log.info(
            "run %s succeeded: %s in %s to %s, %s",
            run_id,
            plural(total, "record"),
            plural(len(outputs.counts), "stream"),
            outputs.describe(),
            plural(run.stats.requests, "request"),
            extra={
                "records": total,
                "streams": dict(outputs.counts),
                "requests": run.stats.requests,
                "duration_ms": round((clock.monotonic() - run_started) * 1000),
            },
        )
        return EXIT_OK
    finally:
        outputs.release()


EVENT_LOOP_VARIABLE = "RUNNER_EVENT_LOOP"
EVENT_LOOPS = ("auto", "uvloop", "asyncio")


def loop_factory(environ: Mapping[str, str]) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop for a run: uvloop when installed (not on Windows), else asyncio's.

    uvloop takes about a tenth off the CPU time of many small requests (docs/PERFORMANCE.md).
    RUNNER_EVENT_LOOP=asyncio opts out; =uvloop insists on it.
    """
    choice = environ.get(EVENT_LOOP_VARIABLE) or "auto"
    if choice not in EVENT_LOOPS:
        raise UsageError(
            f"{EVENT_LOOP_VARIABLE}={choice!r}: expected one of {', '.join(EVENT_LOOPS)}"
        )
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise UsageError(
                f"{EVENT_LOOP_VARIABLE}=uvloop, but uvloop is not installed "
                "(pip install uvloop; it has no Windows version)"
            ) from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


_event_loop_for = loop_factory  # for run_flow, whose parameter of that name hides it


async def _drive(
    run: FlowRun, timeout: float | None, handle_signals: bool, progress: TextIO | None
) -> None:
    """Run the engine, turning SIGINT/SIGTERM and --timeout into the project's errors; the
    progress line, if asked for, is drawn meanwhile."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    received: list[str] = []

    def on_signal(name: str) -> None:
        if not received:
            received.append(name)
            log.warning("%s received: stopping, nothing will be committed", name)
            task.cancel()

    if handle_signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig.name)
    drawing = (
        asyncio.create_task(
            Progress(progress, run.stats, run.outputs.counts, run.clock.monotonic).run()
        )
        if progress is not None
        else None
    )
    try:
        try:
            async with clocks.deadline(run.clock, timeout):
                await run.run()
        except TimeoutError as exc:
            raise UnavailableError(
                f"the run took longer than --timeout ({timeout:g} s)", kind="timeout"
            ) from exc
        except asyncio.CancelledError as exc:
            if received:
                raise InterruptedRun(received[0]) from exc
            raise
    finally:
        if drawing is not None:
            drawing.cancel()
            with contextlib.suppress(BaseException):
                await drawing
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(run.close(), 3)
        if handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)


def _summary(
    run_id: str,
    flow_name: str,
    status: str,
    exit_code: int,
    started_at: datetime,
    duration: float,
    run: FlowRun | None,
    error: RunnerError | None,
    redactor: Redactor,
    shard: Shard | None = None,
) -> dict[str, Any]:
    error_data: dict[str, Any] | None = None
    if error is not None:
        if isinstance(error, RunError):
            error_data = error.as_dict()
        else:
            error_data = {
                "kind": error.kind,
                "step": None,
                "item_index": None,
                "method": None,
                "url": None,
                "status": None,
                "message": error.message,
            }
    data: dict[str, Any] = {
        "run_id": run_id,
        "flow": flow_name,
        "shard": shard.key if shard is not None else None,
        "status": status,
        "exit_code": exit_code,
        "started_at": started_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "duration_s": round(duration, 3),
        "requests": run.stats.requests if run else 0,
        "retries": run.stats.retries if run else 0,
        "status_counts": dict(run.stats.status_counts) if run else {},
        "records": dict(run.outputs.counts) if run else {},
        "skipped": {k: v.skipped for k, v in run.reports.items() if v.skipped} if run else {},
        "stopped": {k: v.stopped for k, v in run.reports.items() if v.stopped} if run else {},
        "warnings": list(run.warnings) if run else [],
        "error": error_data,
    }
    redacted = redactor.redact_data(data)
    assert isinstance(redacted, dict)
    return redacted


__all__ = ["RunResult", "load_flow", "run_flow", "run_flow_async"]
