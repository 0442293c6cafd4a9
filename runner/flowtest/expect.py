"""A case's run against its expectations: the exit code, outputs (records in order, as JSON
values), and subsets of the state, the summary and its error; each difference in words."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from runner.words import plural

_ABSENT = object()
SHOWN_CHARS = 300


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a case's run produced."""

    exit_code: int
    summary: dict[str, Any]
    outputs: dict[str, list[Any]]  # stream -> records as emitted
    state: dict[str, Any]


def show(value: Any) -> str:
    if value is _ABSENT:
        return "(absent)"
    text = json.dumps(value, ensure_ascii=False, sort_keys=False)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def subset_differences(expected: Any, actual: Any, path: str = "") -> Iterator[str]:
    """An object's keys that the expectation names are compared, recursively; lists and
    scalars compare whole (numbers by value: 1 equals 1.0, but true is not 1)."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            yield f"{path or '(root)'}: expected an object {show(expected)}, got {show(actual)}"
            return
        for key, value in expected.items():
            got = actual.get(key, _ABSENT)
            if got is _ABSENT:
                yield f"{_join(path, key)}: expected {show(value)}, got (absent)"
            else:
                yield from subset_differences(value, got, _join(path, key))
        return
    if not _equal(expected, actual):
        yield f"{path or '(root)'}: expected {show(expected)}, got {show(actual)}"


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def same_records(expected: list[Any], actual: list[Any]) -> bool:
    return len(expected) == len(actual) and all(
        _equal(a, b) for a, b in zip(expected, actual, strict=True)
    )


def record_differences(stream: str, expected: list[Any], actual: list[Any]) -> list[str]:
    """The first differing record, field by field, and the counts if they differ."""
    out: list[str] = []
    for index, (want, got) in enumerate(zip(expected, actual, strict=False)):
        if _equal(want, got):
            continue
        head = f"outputs.{stream}[{index}]"
        if isinstance(want, dict) and isinstance(got, dict):
            for key in list(want) + [k for k in got if k not in want]:
                a, b = want.get(key, _ABSENT), got.get(key, _ABSENT)
                if a is _ABSENT or b is _ABSENT or not _equal(a, b):
                    out.append(f"{head}.{key}: expected {show(a)}, got {show(b)}")
        else:
            out.append(f"{head}: expected {show(want)}, got {show(got)}")
        break
    if len(expected) != len(actual):
        out.append(
            f"outputs.{stream}: expected {plural(len(expected), 'record')}, got {len(actual)}"
        )
        if not out[:-1]:
            shorter = min(len(expected), len(actual))
            extra = (actual if len(actual) > len(expected) else expected)[shorter]
            which = "first extra record" if len(actual) > len(expected) else "first missing record"
            out.append(f"outputs.{stream}[{shorter}]: {which} {show(extra)}")
    return out


def differences(
    expect: dict[str, Any], outputs: dict[str, list[Any] | None], outcome: Outcome
) -> list[str]:
    """Every way the outcome misses the case's expectations (empty: the case passes).
    `outputs` holds each expected stream's records (None: a snapshot not written yet)."""
    out: list[str] = []
    want_exit = expect.get("exit_code", 0)
    if outcome.exit_code != want_exit:
        error = outcome.summary.get("error") or {}
        why = f" ({error.get('message')})" if error.get("message") else ""
        out.append(f"exit_code: expected {want_exit}, got {outcome.exit_code}{why}")
    for stream, records in outputs.items():
        actual = outcome.outputs.get(stream, [])
        if records is None:
            out.append(f"outputs.{stream}: no snapshot yet (runner test --update writes it)")
        else:
            out += record_differences(stream, records, actual)
    if "state" in expect:
        out += [f"state.{d}" for d in subset_differences(expect["state"], outcome.state)]
    if "summary" in expect:
        out += [f"summary.{d}" for d in subset_differences(expect["summary"], outcome.summary)]
    if "error" in expect:
        want, got = expect["error"], outcome.summary.get("error")
        if want is None:
            if got is not None:
                out.append(f"error: expected none, got {show(got)}")
        elif got is None:
            out.append(f"error: expected {show(want)}, got none")
        else:
            out += [f"error.{d}" for d in subset_differences(want, got)]
    return out
