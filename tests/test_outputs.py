"""Stream files, commit and abort, manifest, schema checks, cursors, state file and its lock."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from runner.errors import (
    EXIT_LOCKED,
    InvalidRecordError,
    LockedError,
    RunError,
    UsageError,
)
from runner.outputs import (
    FileOutputs,
    StateStore,
    StdoutOutputs,
    StreamSpec,
    atomic_write,
)

REPO = Path(__file__).resolve().parent.parent
STARTED = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def file_outputs(
    directory: Path | str,
    run_id: str = "r1",
    streams: dict[str, StreamSpec] | None = None,
    emitted: tuple[str, ...] = ("contacts",),
) -> FileOutputs:
    return FileOutputs(str(directory), run_id, streams or {}, emitted, STARTED)


def run_python(code: str, **kwargs: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kwargs,
    )


def cursors(spec: StreamSpec, values: list[Any], old: Any = None) -> Any:
    outputs = StdoutOutputs({spec.name: spec}, out=io.StringIO())
    for value in values:
        outputs.write(spec.name, {"v": value} if spec.cursor_field == "v" else value)
    return outputs.new_cursors({spec.name: old} if old is not None else {})[spec.name]


# --------------------------------------------------------------------------- JSONL and commit


def test_lines_are_compact_utf8_json_in_record_order(tmp_path: Path) -> None:
    out = file_outputs(tmp_path)
    out.open()
    out.write("contacts", {"z": 1, "a": "Zoë ✓", "n": None, "l": [1.5, True]})
    out.write("contacts", {"bad": "\ud800"})  # a lone surrogate still gives valid JSON
    out.commit()
    raw = (tmp_path / "contacts.jsonl").read_bytes()
    lines = raw.decode("utf-8").splitlines()
    assert lines[0] == '{"z":1,"a":"Zoë ✓","n":null,"l":[1.5,true]}'
    assert json.loads(lines[1]) == {"bad": "\ud800"}
    assert raw.endswith(b"\n")


def test_commit_publishes_files_and_manifest(tmp_path: Path) -> None:
    out = file_outputs(tmp_path, run_id="run-42", emitted=("contacts", "companies"))
    out.open()
    partial = tmp_path / ".contacts.jsonl.run-42.partial"
    assert partial.exists() and not (tmp_path / "contacts.jsonl").exists()
    for i in range(10_000):  # more than one buffer's worth
        out.write("contacts", {"id": i, "name": f"contact {i}" * 5})
    out.write("companies", {"id": 1})
    manifest = out.commit()

    assert not partial.exists()
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    assert manifest["run_id"] == "run-42"
    finished = datetime.fromisoformat(manifest["finished_at"])
    assert manifest["finished_at"].endswith("Z")
    assert abs(finished - datetime.now(UTC)) < timedelta(minutes=1)
    contacts = tmp_path / "contacts.jsonl"
    assert manifest["streams"] == {
        "companies": {
            "file": "companies.jsonl",
            "count": 1,
            "sha256": sha256_of(tmp_path / "companies.jsonl"),
        },
        "contacts": {"file": "contacts.jsonl", "count": 10_000, "sha256": sha256_of(contacts)},
    }
    lines = contacts.read_text("utf-8").splitlines()
    assert [json.loads(line)["id"] for line in lines] == list(range(10_000))
    assert out.counts == {"contacts": 10_000, "companies": 1}
    assert sorted(os.listdir(tmp_path)) == ["companies.jsonl", "contacts.jsonl", "manifest.json"]


def test_every_declared_and_emitted_stream_gets_a_file(tmp_path: Path) -> None:
    streams = {"declared": StreamSpec("declared"), "contacts": StreamSpec("contacts")}
    out = file_outputs(tmp_path, streams=streams, emitted=("contacts", "rejected"))
    out.open()
    manifest = out.commit()
    empty = hashlib.sha256(b"").hexdigest()
    assert set(manifest["streams"]) == {"declared", "contacts", "rejected"}
    for name, entry in manifest["streams"].items():
        assert (tmp_path / f"{name}.jsonl").read_bytes() == b""
        assert entry == {"file": f"{name}.jsonl", "count": 0, "sha256": empty}


def test_output_dir_templates(tmp_path: Path) -> None:
    # 23:30 at -02:00 is the next day in UTC.
    started = datetime(2024, 3, 1, 23, 30, tzinfo=timezone(timedelta(hours=-2)))
    template = str(tmp_path / "runs" / "{date}" / "{run_id}")
    out = FileOutputs(template, "abc", {}, ["s"], started)
    assert out.directory == str(tmp_path / "runs" / "2024-03-02" / "abc")
    out.open()
    out.write("s", {"x": 1})
    out.commit()
    assert (tmp_path / "runs" / "2024-03-02" / "abc" / "s.jsonl").read_text() == '{"x":1}\n'


def test_a_stream_written_but_not_announced_still_gets_a_file(tmp_path: Path) -> None:
    out = file_outputs(tmp_path, emitted=())
    out.open()
    out.write("late", {"x": 1})
    assert out.commit()["streams"]["late"]["count"] == 1


def commit_one(directory: Path, run_id: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    out = file_outputs(directory, run_id=run_id, emitted=("contacts", "companies"))
    out.open()
    for record in records:
        out.write("contacts", record)
        out.write("companies", record)
    return out.commit()


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if not p.name.startswith(".")}


def test_abort_keeps_the_last_good_files_and_the_partials(tmp_path: Path) -> None:
    commit_one(tmp_path, "good", [{"id": 1}])
    before = snapshot(tmp_path)

    out = file_outputs(tmp_path, run_id="bad", emitted=("contacts", "companies"))
    out.open()
    out.write("contacts", {"id": 2})
    out.write("contacts", {"id": 3})
    out.abort()
    out.abort()  # idempotent

    assert snapshot(tmp_path) == before
    partial = tmp_path / ".contacts.jsonl.bad.partial"
    assert partial.read_text() == '{"id":2}\n{"id":3}\n'
    assert (tmp_path / ".companies.jsonl.bad.partial").read_bytes() == b""


def test_a_commit_that_cannot_rename_leaves_the_manifest_untouched(tmp_path: Path) -> None:
    first = commit_one(tmp_path, "good", [{"id": 1}])
    manifest_before = (tmp_path / "manifest.json").read_bytes()
    # A non-empty folder where contacts.jsonl should go makes os.replace fail (even as root),
    # after companies.jsonl was already renamed: the manifest must not claim the new run.
    (tmp_path / "contacts.jsonl").unlink()
    (tmp_path / "contacts.jsonl").mkdir()
    (tmp_path / "contacts.jsonl" / "x").write_text("x")

    out = file_outputs(tmp_path, run_id="bad", emitted=("contacts", "companies"))
    out.open()
    out.write("contacts", {"id": 2})
    out.write("companies", {"id": 2})
    with pytest.raises(RunError, match=r"cannot publish the outputs") as info:
        out.commit()
    assert info.value.exit_code == 1

    assert (tmp_path / "manifest.json").read_bytes() == manifest_before
    # The commit point was not reached: the renamed file no longer matches the manifest.
    companies = tmp_path / "companies.jsonl"
    assert sha256_of(companies) != first["streams"]["companies"]["sha256"]
    assert (tmp_path / ".contacts.jsonl.bad.partial").read_text() == '{"id":2}\n'


def test_open_fails_with_a_usage_error_when_the_folder_cannot_be_written(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    out = file_outputs(blocker / "out")
    with pytest.raises(UsageError, match=r"output directory .*file/out is not writable"):
        out.open()


def test_stream_names_that_are_not_file_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot be a file name"):
        file_outputs(tmp_path, emitted=("../escape",))
    with pytest.raises(UsageError, match="stream name"):
        StreamSpec(".hidden")


def test_memory_stays_flat_in_the_number_of_records(tmp_path: Path) -> None:
    spec = StreamSpec("s", cursor_field="t", cursor_type="datetime", schema={"type": "object"})
    out = file_outputs(tmp_path, streams={"s": spec}, emitted=("s",))
    out.open()
    tracemalloc.start()
    try:
        for i in range(50_000):
            out.write("s", {"id": i, "t": f"2024-01-01T00:00:00.{i:06d}Z", "pad": "x" * 50})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    out.commit()
    assert peak < 4 * 1024 * 1024  # about 5 MB were written
    assert out.new_cursors({}) == {"s": "2024-01-01T00:00:00.049999Z"}


# --------------------------------------------------------------------------- stdout


def test_stdout_writes_one_line_per_record_and_has_no_manifest() -> None:
    buffer = io.StringIO()
    out = StdoutOutputs({"a": StreamSpec("a")}, out=buffer)
    out.open()
    out.write("a", {"id": 1, "name": "Zoë"})
    assert buffer.getvalue() == '{"stream":"a","record":{"id":1,"name":"Zoë"}}\n'
    out.write("b", {"id": 2})
    assert out.commit() is None
    assert out.counts == {"a": 1, "b": 1}
    assert json.loads(buffer.getvalue().splitlines()[1]) == {"stream": "b", "record": {"id": 2}}


# --------------------------------------------------------------------------- schema

SCHEMA = {
    "type": "object",
    "required": ["id"],
    "properties": {"id": {"type": "integer"}, "company": {"properties": {"n": {"type": "string"}}}},
}


def test_an_invalid_record_fails_with_the_stream_path_and_message(tmp_path: Path) -> None:
    out = file_outputs(tmp_path, streams={"contacts": StreamSpec("contacts", schema=SCHEMA)})
    out.open()
    out.write("contacts", {"id": 1, "company": {"n": "ok"}})
    with pytest.raises(InvalidRecordError) as info:
        out.write("contacts", {"id": 2, "company": {"n": 5}})
    assert str(info.value) == (
        "run failed: stream 'contacts': record 2 does not match the schema at $.company.n: "
        "5 is not of type 'string'"
    )
    assert info.value.kind == "invalid_record"
    assert info.value.exit_code == 1
    with pytest.raises(InvalidRecordError, match=r"at \$: 'id' is a required property"):
        out.write("contacts", {"name": "x"})


def test_on_invalid_skip_counts_and_drops_the_record(tmp_path: Path) -> None:
    spec = StreamSpec("contacts", schema=SCHEMA, on_invalid="skip", cursor_field="id")
    out = file_outputs(tmp_path, streams={"contacts": spec})
    out.open()
    out.write("contacts", {"id": 1})
    out.write("contacts", {"id": "999"})
    out.write("contacts", {"nope": True})
    manifest = out.commit()
    assert out.invalid_skipped == {"contacts": 2}
    assert manifest["streams"]["contacts"]["count"] == 1
    assert (tmp_path / "contacts.jsonl").read_text() == '{"id":1}\n'
    assert out.new_cursors({}) == {"contacts": 1}  # the skipped record gave no cursor


def test_a_broken_schema_or_option_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"outputs.s.schema: not a valid JSON Schema"):
        file_outputs(tmp_path, streams={"s": StreamSpec("s", schema={"type": 5})})
    with pytest.raises(UsageError, match="on_invalid"):
        StreamSpec("s", on_invalid="ignore")
    with pytest.raises(UsageError, match=r"cursor.type"):
        StreamSpec("s", cursor_field="t", cursor_type="date")


# --------------------------------------------------------------------------- cursors

DT = StreamSpec("s", cursor_field="v", cursor_type="datetime")


def test_datetime_cursor_compares_instants_and_keeps_the_original_string() -> None:
    assert cursors(DT, ["2024-01-01T00:00:00.5Z", "2024-01-01T00:00:00Z"]) == (
        "2024-01-01T00:00:00.5Z"
    )
    assert cursors(DT, ["2024-01-01T00:00:00Z", "2024-01-01T00:00:00.5Z"]) == (
        "2024-01-01T00:00:00.5Z"
    )
    # 01:00+02:00 is 23:00Z the day before: earlier than 23:30Z.
    assert cursors(DT, ["2023-12-31T23:30:00Z", "2024-01-01T01:00:00+02:00"]) == (
        "2023-12-31T23:30:00Z"
    )
    assert cursors(DT, ["2024-01-01T01:00:00-02:00", "2024-01-01T02:00:00Z"]) == (
        "2024-01-01T01:00:00-02:00"
    )
    # No zone is UTC.
    assert cursors(DT, ["2024-01-01T10:00:00", "2024-01-01T09:59:59Z"]) == "2024-01-01T10:00:00"
    assert cursors(DT, ["2024-01-01T10:00:00", "2024-01-01T10:00:01+00:00"]) == (
        "2024-01-01T10:00:01+00:00"
    )


def test_datetime_cursor_skips_nulls_and_rejects_what_does_not_parse() -> None:
    assert cursors(DT, [None, "2024-01-01T00:00:00Z", None]) == "2024-01-01T00:00:00Z"
    with pytest.raises(RunError, match=r"stream 's': cursor field 'v' value 'yesterday'") as info:
        cursors(DT, ["2024-01-01T00:00:00Z", "yesterday"])
    assert info.value.exit_code == 1
    with pytest.raises(RunError, match="is not an ISO 8601 datetime"):
        cursors(DT, [1704067200])


def test_the_old_cursor_is_kept_when_greater_or_when_no_records_came() -> None:
    old = "2024-06-01T00:00:00+00:00"
    assert cursors(DT, ["2024-01-01T00:00:00Z"], old=old) == old
    assert cursors(DT, ["2024-07-01T00:00:00Z"], old=old) == "2024-07-01T00:00:00Z"
    assert cursors(DT, [], old=old) == old
    assert cursors(DT, [None], old=old) == old
    assert cursors(DT, []) is None


def test_number_cursor_compares_numbers_and_refuses_strings_and_booleans() -> None:
    spec = StreamSpec("s", cursor_field="v", cursor_type="number")
    assert cursors(spec, [9, 10, 2.5]) == 10
    assert cursors(spec, [9], old=9.5) == 9.5
    with pytest.raises(RunError, match=r"value '10' is not a number"):
        cursors(spec, [9, "10"])
    with pytest.raises(RunError, match=r"value True is not a number"):
        cursors(spec, [True])
    with pytest.raises(RunError, match="not a finite number"):
        cursors(spec, [float("nan")])


def test_string_cursor_compares_strings() -> None:
    spec = StreamSpec("s", cursor_field="v", cursor_type="string")
    assert cursors(spec, ["b", "a", "ab"]) == "b"
    assert cursors(spec, ["9", "10"]) == "9"
    with pytest.raises(RunError, match="is not a string"):
        cursors(spec, ["a", 1])


def test_untyped_cursor_compares_by_json_type_and_refuses_a_mix() -> None:
    spec = StreamSpec("s", cursor_field="v")
    assert cursors(spec, [9, 10]) == 10
    assert cursors(spec, ["9", "10"]) == "9"
    with pytest.raises(RunError, match=r"mixes types: 9 and '10'"):
        cursors(spec, [9, "10"])
    with pytest.raises(RunError, match="differ in type"):
        cursors(spec, [9], old="8")
    with pytest.raises(RunError, match="is not a number or string"):
        cursors(spec, [{"a": 1}])


def test_cursor_field_may_be_dotted() -> None:
    spec = StreamSpec("s", cursor_field="meta.seq", cursor_type="number")
    values = [{"meta": {"seq": 3}}, {"meta": {"seq": 7}}, {"meta": None}, {"x": 1}]
    assert cursors(spec, values) == 7
    flat = StreamSpec("s", cursor_field="meta.seq", cursor_type="number")
    assert cursors(flat, [{"meta.seq": 4}, {"meta": {"seq": 2}}]) == 4


def test_streams_without_a_cursor_are_not_in_new_cursors(tmp_path: Path) -> None:
    out = file_outputs(tmp_path, streams={"a": StreamSpec("a"), "b": DT})
    assert out.new_cursors({"a": 1}) == {"b": None}


# --------------------------------------------------------------------------- state


@pytest.fixture
def state_path(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "state" / "crm.json"


def test_missing_state_is_empty(state_path: Path) -> None:
    store = StateStore(str(state_path))
    assert store.load() == {"version": 1, "streams": {}, "auth": {}}
    assert store.stream_cursor("contacts") is None
    assert store.refresh_token("crm") is None


@pytest.mark.parametrize(
    "content",
    ["{not json", "[1, 2]", '{"version": 2}', '{"streams": []}', b"\xff\xfe"],
)
def test_broken_state_is_a_usage_error_naming_the_file(
    state_path: Path, content: str | bytes
) -> None:
    state_path.parent.mkdir()
    if isinstance(content, bytes):
        state_path.write_bytes(content)
    else:
        state_path.write_text(content)
    with pytest.raises(UsageError, match=f"state file {state_path}") as info:
        StateStore(str(state_path)).load()
    assert info.value.exit_code == 2


def test_save_streams_keeps_auth_and_other_streams(state_path: Path) -> None:
    store = StateStore(str(state_path))
    store.acquire()
    try:
        store.load()
        store.save_refresh_token("crm", "rt-1")
        store.save_streams({"contacts": "2024-01-01T00:00:00Z", "other": 5})
        store.save_streams({"contacts": "2024-02-01T00:00:00Z", "empty": None})
    finally:
        store.release()
    data = json.loads(state_path.read_text())
    assert data == {
        "version": 1,
        "streams": {"contacts": {"cursor": "2024-02-01T00:00:00Z"}, "other": {"cursor": 5}},
        "auth": {"crm": {"refresh_token": "rt-1"}},
    }
    assert stat.S_IMODE(state_path.stat().st_mode) == 0o600
    assert sorted(p.name for p in state_path.parent.iterdir()) == ["crm.json", "crm.json.lock"]
    reread = StateStore(str(state_path))
    assert reread.stream_cursor("contacts") == "2024-02-01T00:00:00Z"
    assert reread.refresh_token("crm") == "rt-1"


def test_save_refresh_token_keeps_the_streams_on_disk(state_path: Path) -> None:
    run = StateStore(str(state_path))
    run.load()  # loaded before the streams below were saved: the token save must reread
    StateStore(str(state_path)).save_streams({"contacts": 7})
    run.save_refresh_token("crm", "rt-2")
    data = json.loads(state_path.read_text())
    assert data["streams"] == {"contacts": {"cursor": 7}}
    assert data["auth"] == {"crm": {"refresh_token": "rt-2"}}
    assert run.refresh_token("crm") == "rt-2"


def test_atomic_write_replaces_and_converts_errors(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    atomic_write(str(target), b"one")
    atomic_write(str(target), b"two")
    assert target.read_bytes() == b"two"
    assert os.listdir(tmp_path) == ["f.json"]
    with pytest.raises(RunError, match=r"cannot write .*missing/f.json") as info:
        atomic_write(str(tmp_path / "missing" / "f.json"), b"x")
    assert info.value.kind == "io"
    # A folder in the way: the write fails, the temp file is removed.
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "x").write_text("x")
    with pytest.raises(RunError):
        atomic_write(str(tmp_path / "dir"), b"x")
    assert sorted(os.listdir(tmp_path)) == ["dir", "f.json"]


# --------------------------------------------------------------------------- lock

HOLD_LOCK = """
    import sys, time
    from runner.outputs import StateStore
    store = StateStore(sys.argv[1] if len(sys.argv) > 1 else {path!r})
    store.acquire()
    print("locked", flush=True)
    time.sleep(60)
"""

TRY_LOCK = """
    import sys
    from runner.errors import LockedError
    from runner.outputs import StateStore
    try:
        StateStore({path!r}).acquire()
    except LockedError as exc:
        print(exc)
        sys.exit(exc.exit_code)
    print("acquired")
"""


def test_a_second_process_cannot_take_the_lock(state_path: Path) -> None:
    store = StateStore(str(state_path))
    store.acquire()
    try:
        child = run_python(TRY_LOCK.format(path=str(state_path)))
        out, _ = child.communicate(timeout=30)
        assert child.returncode == EXIT_LOCKED
        assert out.strip() == (
            f"another run holds the state file {state_path} (lock {state_path}.lock)"
        )
    finally:
        store.release()
    child = run_python(TRY_LOCK.format(path=str(state_path)))
    out, _ = child.communicate(timeout=30)
    assert (child.returncode, out.strip()) == (0, "acquired")


def test_the_lock_is_released_when_its_holder_is_killed(state_path: Path) -> None:
    holder = run_python(HOLD_LOCK.format(path=str(state_path)))
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LockedError, match="another run holds the state file"):
            StateStore(str(state_path)).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=30)
    store = StateStore(str(state_path))
    store.acquire()
    store.release()


# --------------------------------------------------------------------------- SIGKILL safety

STATE_LOOP = """
    import sys
    from runner.outputs import StateStore
    store = StateStore({path!r})
    store.acquire()
    big = "x" * 400_000
    n = 0
    while True:
        n += 1
        store.save_streams({{"s": n, "pad": big + str(n)}})
        if n == 1:
            print("ready", flush=True)
"""

OUTPUTS_LOOP = """
    from datetime import datetime, UTC
    from runner.outputs import FileOutputs
    n = 0
    while True:
        n += 1
        out = FileOutputs({path!r}, f"run{{n}}", {{}}, ["a", "b"], datetime.now(UTC))
        out.open()
        for i in range(3000):
            out.write("a", {{"run": n, "i": i, "pad": "y" * 40}})
            out.write("b", {{"run": n, "i": i}})
        out.commit()
        if n == 1:
            print("ready", flush=True)
"""


def kill_after(code: str, delays: tuple[float, ...]) -> Iterator[None]:
    for delay in delays:
        child = run_python(code)
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready"
            time.sleep(delay)
        finally:
            child.send_signal(signal.SIGKILL)
            child.communicate(timeout=30)
        yield


def test_state_is_never_torn_by_sigkill(state_path: Path) -> None:
    for _ in kill_after(STATE_LOOP.format(path=str(state_path)), (0.05, 0.2, 0.37)):
        store = StateStore(str(state_path))
        data = store.load()
        n = data["streams"]["s"]["cursor"]
        assert data["streams"]["pad"]["cursor"] == "x" * 400_000 + str(n)
        store.acquire()  # the next holder removes a temp file left by the killed writer
        store.release()
        assert sorted(os.listdir(state_path.parent)) == ["crm.json", "crm.json.lock"]
    assert n > 1


def test_outputs_are_never_torn_by_sigkill(tmp_path: Path) -> None:
    for _ in kill_after(OUTPUTS_LOOP.format(path=str(tmp_path)), (0.05, 0.25, 0.4)):
        manifest = json.loads((tmp_path / "manifest.json").read_text())
        for name in ("a", "b"):
            path = tmp_path / f"{name}.jsonl"
            runs = {json.loads(line)["run"] for line in path.read_text().splitlines()}
            assert len(runs) == 1  # one whole file, never a mix or a cut
            assert len(path.read_text().splitlines()) == 3000
            entry = manifest["streams"][name]
            if sha256_of(path) == entry["sha256"]:
                assert manifest["run_id"] == f"run{runs.pop()}"
            else:  # killed between the renames and the manifest: the newer run's file
                assert manifest["run_id"] == f"run{runs.pop() - 1}"
