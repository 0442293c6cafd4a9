"""Unit tests of the parts of `runner test` that need no run: HAR entries, test files,
matching and its differences, expectations, in-place updates, reports, the virtual clock."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from xml.etree import ElementTree

import pytest

from runner.flowtest.expect import Outcome, differences, record_differences, subset_differences
from runner.flowtest.match import differences as request_differences
from runner.flowtest.match import format_differences, shape
from runner.flowtest.report import CaseResult, github_report, junit_xml, text_report
from runner.flowtest.spec import Match, find_test_files, load_test_file
from runner.flowtest.update import replace_inline
from runner.flowtest.vclock import VirtualClock
from runner.har import Exchange, HarWriter, entry_of, mask_token_body, read_entries
from runner.messages import PreparedRequest, Response
from runner.redact import Redactor

NO_MATCH = Match()


# ------------------------------------------------------------------------------ HAR


def _exchange(**kw: object) -> Exchange:
    request = PreparedRequest(
        "POST",
        "https://api.example/v1/items",
        headers={"Authorization": "Bearer tok-123", "Content-Type": "application/json"},
        body=b'{"a": 1}',
        cookies={"sid": "abc"},
    )
    response = Response(
        200, "OK", {"content-type": "application/json", "set-cookie": "sid=zzz"}, b'{"ok":1}',
        "https://api.example/v1/items?x=1",
    )  # fmt: skip
    defaults: dict[str, object] = dict(
        seq=0, started=datetime(2024, 5, 1, 12, tzinfo=UTC), elapsed_ms=12.5, request=request,
        url="https://api.example/v1/items?x=1", service="api", auth=False, response=response,
    )  # fmt: skip
    defaults.update(kw)
    return Exchange(**defaults)  # type: ignore[arg-type]


def test_entry_has_the_har_fields_and_masks_credential_headers() -> None:
    entry = entry_of(_exchange())
    assert entry["startedDateTime"] == "2024-05-01T12:00:00.000Z"
    request, response = entry["request"], entry["response"]
    assert {h["name"]: h["value"] for h in request["headers"]} == {
        "Authorization": "***",
        "Content-Type": "application/json",
        "Cookie": "***",
    }
    assert request["queryString"] == [{"name": "x", "value": "1"}]
    assert request["postData"] == {"mimeType": "application/json", "text": '{"a": 1}'}
    assert response["content"] == {"size": 8, "mimeType": "application/json", "text": '{"ok":1}'}
    assert {h["name"]: h["value"] for h in response["headers"]}["set-cookie"] == "***"
    assert set(entry["timings"]) >= {"send", "wait", "receive"}


def test_binary_bodies_are_base64_and_failures_have_status_zero() -> None:
    png = b"\x89PNG\r\n\x1a\n\x00\xff"
    response = Response(200, "OK", {"content-type": "image/png"}, png, "https://h/x")
    entry = entry_of(_exchange(response=response))
    assert entry["response"]["content"]["encoding"] == "base64"
    assert base64.b64decode(entry["response"]["content"]["text"]) == png
    failed = entry_of(_exchange(response=None, error="timeout"))
    assert failed["response"]["status"] == 0 and failed["_error"] == "timeout"
    [read] = read_entries({"log": {"entries": [failed]}})
    assert read.error == "timeout" and read.status == 0


def test_token_bodies_keep_their_shape() -> None:
    masked = json.loads(mask_token_body(
        '{"access_token": "a", "refresh_token": "r", "instance_url": "https://x", "n": 3}'
    ))  # fmt: skip
    assert masked == {"access_token": "***", "refresh_token": "***",
                      "instance_url": "https://x", "n": 3}  # fmt: skip
    assert mask_token_body("access_token=abc&scope=read") == "access_token=%2A%2A%2A&scope=read"


def test_writer_redacts_again_with_secrets_learnt_later_and_orders_by_sending(
    tmp_path: Path,
) -> None:
    redactor = Redactor()
    path = tmp_path / "run.har"
    writer = HarWriter(path, redactor)
    later = _exchange(seq=1, url="https://api.example/v1/items?key=late-secret")
    writer.add(later)
    writer.add(_exchange(seq=0))
    assert (tmp_path / "run.har.partial").exists()
    redactor.add("late-secret")
    writer.close()
    text = path.read_text()
    assert "late-secret" not in text and not (tmp_path / "run.har.partial").exists()
    log = json.loads(text)["log"]
    assert log["version"] == "1.2" and log["creator"]["name"] == "runner"
    assert [e["request"]["url"] for e in log["entries"]] == [
        "https://api.example/v1/items?x=1",
        "https://api.example/v1/items?key=***",
    ]


# ------------------------------------------------------------------------------ matching


def test_query_is_a_multiset_and_json_bodies_compare_as_values() -> None:
    a = shape("get", "https://H/p?b=2&a=1&a=0", [], None, NO_MATCH)
    b = shape("GET", "https://h:443/p?a=0&a=1&b=2", [], None, NO_MATCH)
    assert a.same_request(b)
    ct = [("Content-Type", "application/json")]
    x = shape("POST", "https://h/p", ct, b'{"a": 1, "b": [1, 2]}', NO_MATCH)
    y = shape("POST", "https://h/p", ct, b'{"b":[1,2],"a":1}', NO_MATCH)
    assert x.same_request(y)


def test_differences_name_the_query_parameter_and_the_body_path() -> None:
    ct = [("Content-Type", "application/json")]
    recorded = shape("POST", "https://h/p?limit=100", ct, b'{"user": {"plan": "pro"}}', NO_MATCH)
    sent = shape("POST", "https://h/p?limit=50", ct, b'{"user": {"plan": "free"}}', NO_MATCH)
    assert format_differences(request_differences(recorded, sent)) == [
        'query limit: recorded "100", sent "50"',
        'body user.plan: recorded "pro", sent "free"',
    ]


def test_ignored_query_body_and_headers() -> None:
    match = Match(headers=("X-Tenant",), ignore_query=frozenset({"ts"}), ignore_body=("nonce",))
    ct = ("Content-Type", "application/json")
    a = shape("POST", "https://h/p?ts=1", [ct, ("X-Tenant", "a")], b'{"nonce": 1, "v": 2}', match)
    b = shape("POST", "https://h/p?ts=2", [ct, ("x-tenant", "a")], b'{"nonce": 9, "v": 2}', match)
    assert a.same_request(b)
    c = shape("POST", "https://h/p", [ct, ("X-Tenant", "b")], b'{"v": 2}', match)
    assert format_differences(request_differences(a, c)) == [
        'header x-tenant: recorded "a", sent "b"'
    ]


def test_form_bodies_are_multisets_and_multipart_boundaries_are_set_aside() -> None:
    form = [("Content-Type", "application/x-www-form-urlencoded")]
    assert shape("POST", "https://h/t", form, b"a=1&b=2", NO_MATCH).same_request(
        shape("POST", "https://h/t", form, b"b=2&a=1", NO_MATCH)
    )
    one = [("Content-Type", "multipart/form-data; boundary=abc")]
    two = [("Content-Type", "multipart/form-data; boundary=xyz")]
    assert shape("POST", "https://h/u", one, b"--abc\r\nx\r\n--abc--", NO_MATCH).same_request(
        shape("POST", "https://h/u", two, b"--xyz\r\nx\r\n--xyz--", NO_MATCH)
    )


# ------------------------------------------------------------------------------ expectations


def test_subsets_compare_named_keys_and_whole_lists() -> None:
    actual = {"requests": 3, "skipped": {"a": 1, "b": 2}, "warnings": ["w"]}
    assert list(subset_differences({"skipped": {"a": 1}}, actual)) == []
    assert list(subset_differences({"skipped": {"a": 2}, "warnings": []}, actual)) == [
        "skipped.a: expected 2, got 1",
        'warnings: expected [], got ["w"]',
    ]
    assert list(subset_differences({"requests": True}, {"requests": 1})) == [
        "requests: expected true, got 1"
    ]


def test_records_report_the_first_difference_field_by_field() -> None:
    assert record_differences("c", [{"id": 1, "n": "a"}, {"id": 2}], [{"id": 1, "n": "b"}]) == [
        'outputs.c[0].n: expected "a", got "b"',
        "outputs.c: expected 2 records, got 1",
    ]
    assert record_differences("c", [{"id": 1}], [{"id": 1}, {"id": 2}]) == [
        "outputs.c: expected 1 record, got 2",
        'outputs.c[1]: first extra record {"id": 2}',
    ]


def test_error_and_exit_code_expectations() -> None:
    outcome = Outcome(1, {"error": {"step": "s", "status": 404, "message": "m"}}, {}, {})
    assert differences({"exit_code": 1, "error": {"step": "s", "status": 404}}, {}, outcome) == []
    assert differences({"error": None}, {}, outcome) == [
        "exit_code: expected 0, got 1 (m)",
        'error: expected none, got {"step": "s", "status": 404, "message": "m"}',
    ]


# ------------------------------------------------------------------------------ test files


def test_test_file_problems_are_located(tmp_path: Path) -> None:
    (tmp_path / "flow.yaml").write_text(
        "version: 1\nname: f\nsteps:\n  - id: a\n    request: {url: 'https://h/x'}\n"
    )
    path = tmp_path / "f.test.yaml"
    path.write_text(
        "version: 1\nflow: flow.yaml\ncases:\n  - name: one\n    recording: none.har\n"
        "  - name: two\n    expect: {exit_cod: 0}\n"
    )
    problems = [str(p) for p in load_test_file(str(path)).problems]
    assert problems == [
        f"{path}:7:14: cases[1].expect.exit_cod: unknown key 'exit_cod' (did you mean 'exit_code'?)"
    ]
    path.write_text("version: 1\nflow: flow.yaml\ncases:\n  - name: one\n    recording: none.har\n")
    assert [str(p) for p in load_test_file(str(path)).problems] == [
        f"{path}:5:5: cases[0].recording: no recording file {tmp_path}/none.har"
    ]


def test_test_files_are_found_recursively_skipping_hidden_folders(tmp_path: Path) -> None:
    for name in ("a.test.yaml", "sub/b.test.yml", ".hidden/c.test.yaml", "sub/flow.yaml"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x: 1\n")
    found, problems = find_test_files([str(tmp_path)])
    assert [Path(f).relative_to(tmp_path).as_posix() for f in found] == [
        "a.test.yaml",
        "sub/b.test.yml",
    ]
    assert not problems


# ------------------------------------------------------------------------------ update


def test_inline_values_are_replaced_and_the_rest_is_untouched() -> None:
    text = (
        "version: 1  # v\n"
        "cases:\n"
        "  - name: a\n"
        "    expect:\n"
        "      outputs:\n"
        "        c:\n"
        "          - {id: 1}\n"
        "          - id: 2\n"
        "\n"
        "        # about d\n"
        "        d: [1]\n"
        "      state: {streams: {}}  # kept\n"
    )
    new = replace_inline(
        text,
        [(["cases", 0, "expect", "outputs", "c"], [{"id": 3}]),
         (["cases", 0, "expect", "state"], {"streams": {"c": {"cursor": "é"}}})],
    )  # fmt: skip
    assert new == text.replace("\n          - {id: 1}\n          - id: 2", ' [{"id": 3}]').replace(
        "{streams: {}}", '{"streams": {"c": {"cursor": "é"}}}'
    )


# ------------------------------------------------------------------------------ reports


def _results() -> list[CaseResult]:
    return [
        CaseResult("t/a.test.yaml", 4, "one", "pass"),
        CaseResult("t/a.test.yaml", 9, "two", "fail", ["exit_code: expected 0, got 1"]),
        CaseResult("t/b.test.yaml", 1, "(test file)", "error", ["t/b.test.yaml:3:1: bad"]),
    ]


def test_junit_counts_per_file() -> None:
    root = ElementTree.fromstring(junit_xml(_results()))
    assert root.tag == "testsuites" and root.get("tests") == "3"
    suites = root.findall("testsuite")
    assert [
        (s.get("name"), s.get("tests"), s.get("failures"), s.get("errors")) for s in suites
    ] == [
        ("t/a.test.yaml", "2", "1", "0"),
        ("t/b.test.yaml", "1", "0", "1"),
    ]
    failure = suites[0].findall("testcase")[1].find("failure")
    assert failure is not None and failure.text == "exit_code: expected 0, got 1"


def test_text_and_github_reports() -> None:
    text = text_report(_results())
    assert text.splitlines()[0] == "PASS one (t/a.test.yaml:4)"
    assert text.splitlines()[-1] == "1 passed, 1 failed, 1 error"
    github = github_report(_results()).splitlines()
    assert github[0] == "::error file=t/a.test.yaml,line=9::two: exit_code: expected 0, got 1"


# ------------------------------------------------------------------------------ virtual time


def test_virtual_time_jumps_to_the_earliest_deadline() -> None:
    clock = VirtualClock(datetime(2024, 5, 1, 12, tzinfo=UTC))
    moments: list[float] = []

    async def item(i: int) -> int:
        await clock.sleep(1)
        moments.append(clock.elapsed)
        return i

    async def main() -> None:
        assert await asyncio.gather(*(item(i) for i in range(8))) == list(range(8))
        for _ in range(9):
            await clock.sleep(30)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(5):
                await asyncio.sleep(60)

    wall = time.perf_counter()
    with asyncio.Runner(loop_factory=clock.new_event_loop) as runner:
        runner.run(main())
    assert moments == [1.0] * 8
    assert clock.elapsed == 1 + 270 + 5
    assert clock.now() == datetime(2024, 5, 1, 12, 4, 36, tzinfo=UTC)
    assert time.perf_counter() - wall < 0.5


def test_recorded_absolute_times_are_read_relative_to_the_entry() -> None:
    from runner.flowtest.replay import Cassette, ReplayTransport
    from runner.har import read_entries
    from runner.transport import TransportOptions

    raw = {
        "startedDateTime": "2024-05-01T12:00:00.000Z",
        "request": {"method": "GET", "url": "https://h/x"},
        "response": {
            "status": 429,
            "headers": [
                {"name": "Retry-After", "value": "Wed, 01 May 2024 12:00:30 GMT"},
                {"name": "X-RateLimit-Reset", "value": "1714564830"},  # 12:00:30Z
            ],
        },
    }
    [entry] = read_entries({"log": {"entries": [raw]}})
    clock = VirtualClock(datetime(2030, 1, 1, tzinfo=UTC))
    transport = ReplayTransport(
        Cassette([entry], NO_MATCH, Redactor(), clock), TransportOptions("s")
    )
    headers = transport._shifted(entry)
    assert headers["retry-after"] == "Tue, 01 Jan 2030 00:00:30 GMT"
    assert int(headers["x-ratelimit-reset"]) == int(
        datetime(2030, 1, 1, 0, 0, 30, tzinfo=UTC).timestamp()
    )
