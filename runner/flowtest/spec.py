"""Test files (`*.test.yaml`): their JSON Schema, their cases, and every problem located at
its file, line and column before any case runs."""

from __future__ import annotations

import functools
import json
import os
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from runner.errors import FlowError, Problem, UsageError
from runner.har import HarFormatError, RecordedEntry, load_har, parse_iso
from runner.loader import Document, load_document
from runner.shard import Shard, parse_shard

if TYPE_CHECKING:
    from jsonschema import Draft202012Validator

    from runner.model import Flow

TEST_SCHEMA_RESOURCE = "test.schema.json"
TEST_SUFFIXES = (".test.yaml", ".test.yml")
DEFAULT_SECRET = "test-secret"


@functools.cache
def test_schema() -> dict[str, Any]:
    """The JSON Schema of test files, shipped beside the flow schema."""
    data = pkgutil.get_data("runner.schemas", TEST_SCHEMA_RESOURCE)
    if data is None:  # pragma: no cover - a broken installation
        raise OSError(f"no {TEST_SCHEMA_RESOURCE} in runner.schemas")
    schema: dict[str, Any] = json.loads(data)
    return schema


@functools.cache
def _validator() -> Draft202012Validator:
    from jsonschema import Draft202012Validator

    return Draft202012Validator(test_schema())


@functools.cache
def _fast_check() -> Callable[[Any], bool] | None:
    try:
        import jsonschema_rs
    except ImportError:
        return None
    check: Callable[[Any], bool] = jsonschema_rs.validator_for(test_schema()).is_valid
    return check


def _surely_valid(data: Any) -> bool:
    """jsonschema-rs (the `fast` extra) says "valid" in microseconds; jsonschema, ~150 ms
    to import, is needed only to word the problems of a file that has some."""
    check = _fast_check()
    try:
        return check is not None and check(data)
    except Exception:  # a value it cannot convert: jsonschema words the verdict
        return False


@dataclass(frozen=True, slots=True)
class Match:
    """A case's `match`: what else is compared, and what is ignored."""

    headers: tuple[str, ...] = ()
    ignore_query: frozenset[str] = frozenset()
    ignore_headers: frozenset[str] = frozenset()
    ignore_body: tuple[str, ...] = ()
    allow_unused: bool = False


@dataclass(slots=True)
class Case:
    """One case of a test file, its paths resolved against the file's folder."""

    name: str
    index: int
    line: int  # of its `- name:` item
    recording: str | None
    entries: list[RecordedEntry]
    inputs: dict[str, Any]
    env: dict[str, str]
    secrets: dict[str, str]
    state: dict[str, Any] | None
    now: datetime | None
    shard: Shard | None
    match: Match
    expect: dict[str, Any]
    outputs: dict[str, Expected] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Expected:
    """A stream's expected records: a JSONL file (read when compared) or an inline list."""

    file: str | None
    records: list[Any] | None  # inline
    exists: bool = True  # the file is there (--update writes a missing one)


@dataclass(slots=True)
class TestFile:
    """A loaded test file: its flow, its cases, or the problems that keep it from running."""

    __test__ = False  # not a pytest class

    path: str
    flow: Flow | None = None
    flow_path: str | None = None
    cases: list[Case] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    document: Document | None = None


def find_test_files(paths: list[str]) -> tuple[list[str], list[Problem]]:
    """Test files under the paths (folders searched recursively, hidden folders skipped)."""
    found: list[str] = []
    problems: list[Problem] = []
    for path in paths:
        if os.path.isfile(path):
            found.append(path)
        elif os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found += [os.path.join(root, f) for f in sorted(files) if f.endswith(TEST_SUFFIXES)]
        else:
            problems.append(Problem(path, 1, 1, "", "no such file or folder"))
    return list(dict.fromkeys(found)), problems


def load_test_file(path: str, *, update: bool = False) -> TestFile:
    """A test file with its flow and recordings loaded; problems collected, never raised."""
    from runner.schema import _problems

    test = TestFile(path)
    try:
        doc = load_document(path)
    except FlowError as exc:
        test.problems = list(exc.problems)
        return test
    test.document = doc
    if not isinstance(doc.data, dict):
        test.problems = [Problem(path, 1, 1, "", "a test file is a mapping: version, flow, cases")]
        return test
    if not _surely_valid(doc.data):
        test.problems = _problems(doc, _validator(), doc.data)
    if test.problems:
        return test
    folder = os.path.dirname(path)
    data = doc.data
    flow_path = os.path.join(folder, data["flow"])
    test.flow_path = flow_path
    if not os.path.isfile(flow_path):
        test.problems.append(doc.problem(["flow"], f"no flow file {flow_path}"))
    else:
        from runner.run import load_flow

        try:
            test.flow = load_flow(flow_path)
        except FlowError as exc:
            test.problems += list(exc.problems)
    names: dict[str, int] = {}
    sharded = test.flow.sharded if test.flow is not None else None
    for index, raw in enumerate(data["cases"]):
        case = _case(doc, folder, index, raw, test.problems, update, sharded)
        if raw["name"] in names:
            test.problems.append(
                doc.problem(["cases", index, "name"], f"a second case named {raw['name']!r}")
            )
        names[raw["name"]] = index
        if case is not None:
            test.cases.append(case)
    return test


def _case(
    doc: Document, folder: str, index: int, raw: dict[str, Any], problems: list[Problem],
    update: bool, sharded: bool | None,
) -> Case | None:  # fmt: skip
    where: list[str | int] = ["cases", index]
    before = len(problems)
    recording = None
    entries: list[RecordedEntry] = []
    if "recording" in raw:
        recording = os.path.join(folder, raw["recording"])
        if not os.path.isfile(recording):
            problems.append(doc.problem([*where, "recording"], f"no recording file {recording}"))
        else:
            try:
                entries = load_har(recording)
            except (HarFormatError, OSError) as exc:
                problems.append(doc.problem([*where, "recording"], f"{recording}: {exc}"))
    now = None
    if "now" in raw:
        try:
            now = parse_iso(raw["now"])
        except ValueError:
            message = f"not an ISO 8601 date-time: {raw['now']!r}"
            problems.append(doc.problem([*where, "now"], message))
    shard = None
    if "shard" in raw:
        try:
            shard = parse_shard(str(raw["shard"]), "shard")
        except UsageError as exc:
            problems.append(doc.problem([*where, "shard"], exc.message.removeprefix("shard ")))
        else:
            if sharded is False:
                message = "the flow has no for_each step with shard: true"
                problems.append(doc.problem([*where, "shard"], message))
    expect = dict(raw.get("expect") or {})
    outputs: dict[str, Expected] = {}
    for stream, value in (expect.get("outputs") or {}).items():
        if isinstance(value, list):
            outputs[stream] = Expected(None, value)
            continue
        file = os.path.join(folder, value)
        exists = os.path.isfile(file)
        if not exists and not update:
            problems.append(
                doc.problem(
                    [*where, "expect", "outputs", stream],
                    f"no file {file} (runner test --update writes it)",
                )
            )
        outputs[stream] = Expected(file, None, exists)
    match = raw.get("match") or {}
    if len(problems) > before:
        return None
    return Case(
        name=raw["name"],
        index=index,
        line=doc.locate(where)[0],
        recording=recording,
        entries=entries,
        inputs=dict(raw.get("inputs") or {}),
        env=dict(raw.get("env") or {}),
        secrets=dict(raw.get("secrets") or {}),
        state=raw.get("state"),
        now=now,
        shard=shard,
        match=Match(
            headers=tuple(match.get("headers") or ()),
            ignore_query=frozenset(match.get("ignore_query") or ()),
            ignore_headers=frozenset(h.lower() for h in match.get("ignore_headers") or ()),
            ignore_body=tuple(match.get("ignore_body") or ()),
            allow_unused=bool(match.get("allow_unused", False)),
        ),
        expect=expect,
        outputs=outputs,
    )
