"""The command line: `runner run`, `runner validate`, `runner schema`; exit codes and logging."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .errors import EXIT_OK, EXIT_SIGINT, EXIT_USAGE, InterruptedRun, RunnerError, UsageError
from .redact import Redactor

SINK_VARIABLE = "RUNNER_SINK"
SHARD_VARIABLE = "RUNNER_SHARD"

if TYPE_CHECKING:
    import ssl

    from .model import Flow
    from .record import Recorder
    from .shard import Shard

log = logging.getLogger("runner")


def setup_logging(fmt: str, redactor: Redactor, verbose: bool = False) -> None:
    from .logs import setup

    setup(fmt, redactor, verbose)


# -- --input k=v --------------------------------------------------------------------------


def _read_value_file(path: str) -> Any:
    from .codec import json_loads

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        if path.endswith((".jsonl", ".ndjson")):
            return [json_loads(line) for line in text.splitlines() if line.strip()]
        return json_loads(text)
    except ValueError as exc:
        raise UsageError(f"{path}: not valid JSON: {exc}") from exc


def coerce_input(name: str, raw: str, schema: Mapping[str, Any]) -> Any:
    """`--input k=v`: v coerced to the type the inputs schema gives k."""
    from .codec import json_loads

    if raw.startswith("@"):
        return _read_value_file(raw[1:])
    props = schema.get("properties") if isinstance(schema, Mapping) else None
    sub = props.get(name) if isinstance(props, Mapping) else None
    kind = sub.get("type") if isinstance(sub, Mapping) else None
    kinds = kind if isinstance(kind, list) else [kind]
    try:
        if "integer" in kinds:
            return int(raw)
        if "number" in kinds:
            return float(raw) if any(c in raw for c in ".eE") else int(raw)
        if "boolean" in kinds:
            if raw.lower() in ("true", "1", "yes"):
                return True
            if raw.lower() in ("false", "0", "no"):
                return False
            raise ValueError(f"{raw!r} is not a boolean (true or false)")
        if "array" in kinds or "object" in kinds:
            return json_loads(raw)
    except ValueError as exc:
        raise UsageError(
            f"--input {name}: cannot read {raw!r} as {'/'.join(map(str, kinds))}: {exc}"
        ) from exc
    return raw


def parse_inputs(
    pairs: Sequence[str], inputs_file: str | None, schema: Mapping[str, Any]
) -> dict[str, Any]:
    from .loader import load_data_file

    values: dict[str, Any] = {}
    if inputs_file:
        data = load_data_file(inputs_file)
        if not isinstance(data, dict):
            raise UsageError(f"{inputs_file}: inputs must be a mapping of names to values")
        values.update(data)
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or not name:
            raise UsageError(f"--input expects k=v, got {pair!r}")
        values[name] = coerce_input(name, raw, schema)
    return values


# -- commands -----------------------------------------------------------------------------


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """For imports and the flow's model: ~35,000 objects that all live to the end of the
    process. Collecting while they are made only scans them again and again (about 10 ms of
    start-up); afterwards they are frozen out of the collector's reach, so that the full
    collections a run's records trigger do not scan them either (about 6 % of a 50,000-record
    run). The CLI only: run_flow called from a host process leaves its collector alone."""
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def _import_aiohttp_without_loading_cas() -> None:
    """aiohttp builds two TLS contexts as it is imported, each loading the system's CA bundle:
    ~40 ms, a fifth of a short run. The runner uses neither (aiohttp_transport.py passes its
    own context, made on the first https request), so the CLI, which owns its process,
    imports aiohttp with that loading skipped. The two contexts then trust no CA: a request
    that reached one by mistake would fail verification, never pass it unchecked. A host
    process calling run_flow imports aiohttp as it likes."""
    if "aiohttp" in sys.modules:
        return
    import ssl

    own = vars(ssl.SSLContext).get("set_default_verify_paths")  # None: inherited from C
    ssl.SSLContext.set_default_verify_paths = _skip_verify_paths  # type: ignore[method-assign]
    try:
        import aiohttp  # noqa: F401
    finally:
        if own is None:
            del ssl.SSLContext.set_default_verify_paths
        else:
            ssl.SSLContext.set_default_verify_paths = own  # type: ignore[method-assign]


def _skip_verify_paths(self: ssl.SSLContext) -> None:
    return None


def _interrupt(signum: int, frame: object) -> None:
    # Until the run's event loop takes the signals over: loading a large flow, reading inputs.
    raise InterruptedRun(signal.Signals(signum).name)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block is done: an import stopped halfway leaves its
    module half made, and the summary written after it would need that module again. Held
    signals arrive as the block ends, a fraction of a second later."""
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def cmd_run(args: argparse.Namespace) -> int:
    redactor = Redactor()
    args.redactor = redactor
    setup_logging(args.log_format, redactor, args.verbose)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    flow_name = str(args.flow)
    try:
        with _collector_paused():
            with _signals_held():
                _import_aiohttp_without_loading_cas()
                from .run import failure_before_run, load_flow, write_summary

            flow = load_flow(args.flow, args.services)
        flow_name = flow.name
    except RunnerError as exc:
        if args.summary and not args.dry_run:
            # Imported here: a signal may have interrupted the import above.
            from .run import failure_before_run, write_summary

            write_summary(args.summary, failure_before_run(flow_name, exc, redactor))
        raise
    # Once the flow is loaded the recording is written on every exit, a failure included.
    recorder = _recorder(args.record, redactor) if args.record and not args.dry_run else None
    try:
        return _run_loaded(args, flow, redactor, recorder)
    finally:
        if recorder is not None:
            recorder.close()


def _recorder(path: str, redactor: Redactor) -> Recorder:
    from .record import Recorder

    try:
        return Recorder(path, redactor)
    except OSError as exc:
        raise UsageError(f"--record {path}: {exc.strerror or exc}") from exc


def _run_loaded(
    args: argparse.Namespace, flow: Flow, redactor: Redactor, recorder: Recorder | None
) -> int:
    from .http import aiohttp_transport
    from .run import failure_before_run, run_flow, write_summary

    flow_name = flow.name
    try:
        inputs = parse_inputs(args.input or [], args.inputs_file, flow.inputs_schema)
        if args.output is not None and args.output != "-":
            raise UsageError(
                "--output takes only '-' (NDJSON on stdout); use --output-dir for files"
            )
        sink = args.sink
        if sink is not None and args.output_dir is not None:
            raise UsageError("--sink and --output-dir both choose where records go: give one")
        if sink is None and args.output is None and args.output_dir is None:
            sink = os.environ.get(SINK_VARIABLE) or None  # a flag beats the variable
        shard: Shard | None = None
        given = args.shard if args.shard is not None else os.environ.get(SHARD_VARIABLE) or None
        if given is not None:
            from .shard import parse_shard

            shard = parse_shard(given, "--shard" if args.shard is not None else SHARD_VARIABLE)
    except RunnerError as exc:
        if args.summary and not args.dry_run:
            # The summary is written on every exit but --dry-run, so also for a bad flow or bad
            # inputs found here, before run_flow starts.
            write_summary(args.summary, failure_before_run(flow_name, exc, redactor))
        raise
    from .progress import wanted

    draw = wanted(sys.stderr, args.log_format, args.no_progress, os.environ)
    if draw and (args.output == "-" or sink == "singer") and sys.stdout.isatty():
        draw = False  # records on the same terminal: a redrawn line would cut into them
    result = run_flow(
        flow,
        inputs,
        output_dir=args.output_dir,
        output=args.output,
        sink=sink,
        state=args.state,
        dry_run=args.dry_run,
        summary=args.summary,
        timeout=args.timeout,
        progress=sys.stderr if draw and not args.dry_run else None,
        handle_signals=True,
        redactor=redactor,
        transport=aiohttp_transport if recorder is None else recorder.wrap(aiohttp_transport),
        files_dir=args.files_dir,
        shard=shard,
    )
    return result.exit_code


def cmd_validate(args: argparse.Namespace) -> int:
    with _collector_paused():
        from .validate import check_paths, closing_line, format_problems

    problems, flows = check_paths(args.paths, args.exclude or [], args.services)
    errors = [p for p in problems if p.severity == "error"]
    warnings = [p for p in problems if p.severity != "error"]
    shown = problems
    if args.format == "text":
        if shown:
            sys.stderr.write(format_problems(shown, "text") + "\n")
    else:
        sys.stdout.write(format_problems(shown, args.format) + "\n")
    # On stderr in every format: stdout of json and github stays one document.
    sys.stderr.write(closing_line(problems, flows) + "\n")
    if errors or (args.strict and warnings):
        return EXIT_USAGE
    return EXIT_OK


def cmd_test(args: argparse.Namespace) -> int:
    """`runner test`: every case of every test file, replayed offline; the report on stdout."""
    with _collector_paused():
        _import_aiohttp_without_loading_cas()
        from .flowtest import report
        from .flowtest.suite import run_suite

    suite = run_suite(args.paths, update=args.update)
    formats = {"text": report.text_report, "json": report.json_report,
               "github": report.github_report}  # fmt: skip
    sys.stdout.write(formats[args.format](suite.results) + "\n")
    if args.junit:
        from .outputs import atomic_write

        try:
            atomic_write(args.junit, report.junit_xml(suite.results).encode("utf-8"))
        except OSError as exc:
            raise UsageError(f"cannot write {args.junit}: {exc.strerror or exc}") from exc
    return suite.exit_code


def cmd_schema(args: argparse.Namespace) -> int:
    from .schema import flow_schema

    sys.stdout.write(json.dumps(flow_schema(), indent=2, ensure_ascii=False) + "\n")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="runner", description="Run declarative YAML integration flows against REST services."
    )
    parser.add_argument("--version", action="version", version=f"runner {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run a flow")
    run.add_argument("flow", metavar="FLOW")
    run.add_argument("--input", action="append", metavar="K=V", help="a run input (repeatable)")
    run.add_argument("--inputs-file", metavar="F", help="inputs as JSON or YAML")
    run.add_argument("--services", metavar="F", help="service settings that override the flow's")
    target = run.add_mutually_exclusive_group()
    target.add_argument(
        "--output-dir",
        metavar="D",
        help="JSONL files in D (default: out/, with --shard out/{shard}/; {shard} is I)",
    )
    target.add_argument("--output", metavar="-", help="'-': NDJSON records on stdout")
    run.add_argument(
        "--sink",
        metavar="URL",
        help="sqlite:///path.db, postgresql://user@host/db?schema=s or singer "
        f"(default: ${SINK_VARIABLE}, else the files of --output-dir)",
    )
    run.add_argument(
        "--state", metavar="F", help="the state file (cursors, refresh tokens; {shard} is I)"
    )
    run.add_argument(
        "--shard",
        metavar="I/N",
        help="run shard I of N: the items of shard: true steps whose hash is I mod N "
        f"(default: ${SHARD_VARIABLE})",
    )
    run.add_argument("--dry-run", action="store_true", help="render first requests, send none")
    run.add_argument("--record", metavar="F.har", help="keep every exchange in a HAR 1.2 file")
    run.add_argument("--summary", metavar="F", help="write the run summary (JSON) to F")
    run.add_argument("--timeout", type=float, metavar="S", help="bound the whole run (seconds)")
    run.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="json: one object a line, with run_id, step, url, status, ... as fields",
    )
    run.add_argument(
        "--files-dir",
        action="append",
        metavar="D",
        help="a folder multipart files may be uploaded from, besides the flow's (repeatable)",
    )
    run.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress line (it is drawn only when stderr is a terminal)",
    )
    run.add_argument(
        "-v", "--verbose", action="store_true", help="log every attempt of every request"
    )
    run.set_defaults(handler=cmd_run)

    validate = sub.add_parser("validate", help="check flows offline (for CI)")
    validate.add_argument("paths", nargs="+", metavar="PATH")
    validate.add_argument("--services", metavar="F")
    validate.add_argument("--exclude", action="append", metavar="GLOB")
    validate.add_argument("--format", choices=["text", "json", "github"], default="text")
    validate.add_argument("--strict", action="store_true", help="warnings fail too (exit 2)")
    validate.set_defaults(handler=cmd_validate)

    test = sub.add_parser("test", help="run flows' test cases offline, from recordings")
    test.add_argument("paths", nargs="*", metavar="PATH", help="test files or folders (default .)")
    test.add_argument("--update", action="store_true", help="rewrite outputs and state snapshots")
    test.add_argument("--junit", metavar="F", help="also write JUnit XML to F")
    test.add_argument("--format", choices=["text", "json", "github"], default="text")
    test.set_defaults(handler=cmd_test)

    schema = sub.add_parser("schema", help="print the flow JSON Schema")
    schema.set_defaults(handler=cmd_schema)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: usage errors exit 2, --help exits 0
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    redact = _redact_with(args)
    try:
        code: int = args.handler(args)
    except RunnerError as exc:
        text = redact(str(exc))
        if getattr(args, "log_format", None) == "json":
            # Found before the run started (the flow, the inputs): still one JSON line.
            from .logs import error_fields

            log.error("%s", text, extra=error_fields(exc, text))
        else:
            sys.stderr.write(f"runner: {text}\n")
        return exc.code if isinstance(exc, InterruptedRun) else exc.exit_code
    except KeyboardInterrupt:
        return EXIT_SIGINT
    except Exception as exc:  # a bug of ours: one line, not a traceback (-v logs it)
        log.debug("internal error", exc_info=True)
        sys.stderr.write(f"runner: internal error: {redact(f'{type(exc).__name__}: {exc}')}\n")
        return 1
    return code


def _redact_with(args: argparse.Namespace) -> Callable[[str], str]:
    """The run's redactor, once the command has made one (it learns secrets as they come)."""

    def redact(text: str) -> str:
        redactor = getattr(args, "redactor", None)
        return redactor.redact(text) if redactor is not None else text

    return redact


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
