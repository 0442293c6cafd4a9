"""`runner test`: find test files, run each case through the engine with its recording and a
virtual clock, compare, update snapshots on request, and gather the results."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import random
import re
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from runner.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Problem
from runner.redact import Redactor
from runner.rendering import using_uuid4

from . import expect as expectations
from .replay import Cassette
from .report import ERROR, FAIL, PASS, CaseResult
from .spec import DEFAULT_SECRET, Case, TestFile, find_test_files, load_test_file
from .update import Path, rewrite_test_file, write_snapshot_file
from .vclock import VirtualClock

# `now()` of a case with neither `now` nor a recorded entry: fixed, so that runs agree.
DEFAULT_NOW = datetime(2024, 1, 1, tzinfo=UTC)
JITTER_SEED = 0


@dataclass(slots=True)
class SuiteResult:
    """Every case's result and the exit code of `runner test`."""

    results: list[CaseResult] = field(default_factory=list)
    invalid: bool = False

    @property
    def exit_code(self) -> int:
        if self.invalid:
            return EXIT_USAGE
        if any(r.status != PASS for r in self.results):
            return EXIT_FAILED
        return EXIT_OK


def run_suite(paths: list[str], *, update: bool = False) -> SuiteResult:
    suite = SuiteResult()
    files, missing = find_test_files(paths or ["."])
    for problem in missing:
        suite.invalid = True
        suite.results.append(CaseResult(problem.file, 1, "(path)", ERROR, [str(problem)]))
    if not files and not missing:
        suite.invalid = True
        where = ", ".join(paths or ["."])
        suite.results.append(
            CaseResult(where, 1, "(path)", ERROR, [f"{where}: no *.test.yaml files found"])
        )
    for path in files:
        test = load_test_file(path, update=update)
        if test.problems:
            suite.invalid = True
            suite.results += _invalid_file(test)
            continue
        replacements: list[tuple[Path, Any]] = []
        for case in test.cases:
            try:
                suite.results.append(run_case(test, case, update, replacements))
            except Exception as exc:  # a bug of ours: this case errs, the others still run
                logging.getLogger("runner").debug("internal error", exc_info=True)
                message = f"internal error: {type(exc).__name__}: {exc}"
                suite.results.append(CaseResult(path, case.line, case.name, ERROR, [message]))
        if replacements:
            rewrite_test_file(path, replacements)
    return suite


def _invalid_file(test: TestFile) -> list[CaseResult]:
    """Each case of an invalid file is an error carrying the file's problems."""
    shown = [str(p) for p in test.problems]
    data = test.document.data if test.document is not None else None
    cases = data.get("cases") if isinstance(data, dict) else None
    named = [
        (i, c["name"]) for i, c in enumerate(cases or []) if isinstance(c, dict) and "name" in c
    ]
    if not named or test.document is None:
        line = test.problems[0].line if test.problems else 1
        return [CaseResult(test.path, line, "(test file)", ERROR, shown)]
    doc = test.document
    return [
        CaseResult(test.path, doc.locate(["cases", i])[0], str(n), ERROR, shown) for i, n in named
    ]


# ------------------------------------------------------------------------------ one case


def _start(case: Case) -> datetime:
    if case.now is not None:
        return case.now
    for entry in case.entries:
        if entry.started is not None:
            return entry.started
    return DEFAULT_NOW


def _case_seed(test: TestFile, case: Case) -> str:
    return hashlib.sha256(f"{os.path.basename(test.path)}\0{case.name}".encode()).hexdigest()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """A case's run logs nothing: its verdict is the report."""
    logger = logging.getLogger("runner")
    level, handlers, propagate = logger.level, logger.handlers[:], logger.propagate
    logger.handlers[:] = [logging.NullHandler()]
    logger.propagate = False
    try:
        yield
    finally:
        logger.setLevel(level)
        logger.handlers[:] = handlers
        logger.propagate = propagate


def _deterministic_uuids(seed: str) -> Callable[[], str]:
    counter = 0

    def next_uuid() -> str:
        nonlocal counter
        counter += 1
        return str(
            uuid.UUID(hashlib.sha256(f"{seed}:{counter}".encode()).hexdigest()[:32], version=4)
        )

    return next_uuid


def run_case(
    test: TestFile, case: Case, update: bool, replacements: list[tuple[Path, Any]]
) -> CaseResult:
    from runner.run import run_flow

    assert test.flow is not None
    flow = test.flow
    result = CaseResult(test.path, case.line, case.name, PASS)
    clock = VirtualClock(_start(case))
    masker = Redactor()
    environ = dict(case.env)
    for name in sorted(set(flow.secrets) | set(case.secrets)):
        value = case.secrets.get(name, DEFAULT_SECRET)
        environ[name] = value
        masker.add(value)
    cassette = Cassette(case.entries, case.match, masker, clock)
    seed = _case_seed(test, case)
    run_id = clock.now().strftime("%Y%m%dT%H%M%SZ") + "-" + seed[:6]
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="runner-test-") as tmp:
        state_path = os.path.join(tmp, "state.json")
        if case.state is not None:
            with open(state_path, "w", encoding="utf-8") as handle:
                json.dump({"version": 1, **case.state}, handle)
        output_dir = os.path.join(tmp, "out")
        with _quiet(), using_uuid4(_deterministic_uuids(seed)):
            run = run_flow(
                flow,
                case.inputs,
                output_dir=output_dir,
                state=state_path,
                environ=environ,
                stdout=io.StringIO(),
                transport=cassette.factory,
                clock=clock,
                rng=random.Random(JITTER_SEED),
                loop_factory=clock.new_event_loop,
                run_id=run_id,
                shard=case.shard,
            )
        # Compared while the run's files exist; a snapshot file equal byte for byte to the
        # stream's file needs no parsing (50,000 records compare in milliseconds).
        files = _output_files(output_dir, run_id)
        expected: dict[str, list[Any] | None] = {}
        actual: dict[str, list[Any]] = {}
        unreadable: list[str] = []
        for stream, want in case.outputs.items():
            path = files.get(stream)
            if want.file is not None and want.exists and path and _same_bytes(want.file, path):
                continue
            actual[stream] = _read_jsonl(path) if path else []
            if want.file is None:
                expected[stream] = want.records
            elif not want.exists:
                expected[stream] = None
            else:
                try:
                    expected[stream] = _read_jsonl(want.file)
                except (OSError, ValueError) as exc:
                    unreadable.append(f"outputs.{stream}: {want.file} is not JSONL: {exc}")
                    expected[stream] = None
        outcome = expectations.Outcome(run.exit_code, run.summary, actual, _read_state(state_path))
    result.wall_s = time.perf_counter() - wall
    result.virtual_s = clock.elapsed
    if cassette.mismatch is not None:
        result.status = FAIL
        step = (run.summary.get("error") or {}).get("step")
        lines = cassette.mismatch.lines()
        if step:
            lines[0] = f"step '{step}': {lines[0]}"
        result.differences = lines
        return result
    if update:
        result.updated = _update(case, expected, outcome, replacements)
        expected = {stream: outcome.outputs[stream] for stream in expected}
        unreadable = []
    diffs = unreadable + expectations.differences(
        {k: v for k, v in case.expect.items() if not (update and k == "state")}, expected, outcome
    )
    if not case.match.allow_unused:
        diffs += [
            f"recorded entry #{e.index} not used: {e.method} {e.url}" for e in cassette.unused()
        ]
    if diffs:
        result.status = FAIL
        result.differences = diffs
    return result


def _update(
    case: Case,
    expected: dict[str, list[Any] | None],
    outcome: expectations.Outcome,
    replacements: list[tuple[Path, Any]],
) -> list[str]:
    """Rewrites the case's snapshots (outputs and state) from its run; what changed.
    `expected` holds the streams whose snapshot may differ (the others matched byte for byte)."""
    changed: list[str] = []
    for stream, records in expected.items():
        actual = outcome.outputs[stream]
        if records is not None and expectations.same_records(records, actual):
            continue
        before = "none" if records is None else str(len(records))
        file = case.outputs[stream].file
        if file is not None:
            write_snapshot_file(file, actual)
            shown = os.path.relpath(file)
            changed.append(f"outputs.{stream}: {shown} ({before} -> {len(actual)} records)")
        else:
            replacements.append((["cases", case.index, "expect", "outputs", stream], actual))
            changed.append(f"outputs.{stream}: inline ({before} -> {len(actual)} records)")
    if "state" in case.expect:
        actual_state = {k: v for k, v in outcome.state.items() if k not in ("version", "auth")}
        if list(expectations.subset_differences(case.expect["state"], outcome.state)):
            replacements.append((["cases", case.index, "expect", "state"], actual_state))
            changed.append("state: inline")
    return changed


def _same_bytes(a: str, b: str) -> bool:
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as one, open(b, "rb") as two:
        while True:
            x, y = one.read(1 << 20), two.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


_PARTIAL = re.compile(r"\.(?P<stream>.+)\.jsonl\.(?P<run>[^.]+)\.partial$")


def _read_jsonl(path: str) -> list[Any]:
    from runner.codec import json_loads

    with open(path, "rb") as handle:
        return [json_loads(line) for line in handle if line.strip()]


def _output_files(directory: str, run_id: str) -> dict[str, str]:
    """Each stream's records as emitted: its committed file, or a failed run's partial."""
    files: dict[str, str] = {}
    if not os.path.isdir(directory):
        return files
    for name in sorted(os.listdir(directory)):
        found = _PARTIAL.match(name)
        if found and found.group("run") == run_id:
            files.setdefault(found.group("stream"), os.path.join(directory, name))
        elif name.endswith(".jsonl") and not name.startswith("."):
            files[name[: -len(".jsonl")]] = os.path.join(directory, name)
    return files


def _read_state(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


__all__ = ["Problem", "SuiteResult", "run_suite"]
