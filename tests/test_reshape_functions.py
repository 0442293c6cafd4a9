"""Date windows, datetimes parsed from text, arithmetic, null-safe conditions and the `!a.b`
warning: the functions both languages share, checked in both."""

from __future__ import annotations

import gzip
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from runner.decode import decode_body, unpack_payload
from runner.errors import DecodeError, ExpressionError, RenderError
from runner.expressions import compile_expression
from runner.messages import DecodeOptions
from runner.reshape import compile_drop, compile_rename, compile_reshape, snake_case
from runner.templates import compile_template
from runner.timeutil import MAX_WINDOWS, parse_duration, windows


def jmes(source: str, data: Any = None) -> Any:
    return compile_expression(source).search(data if data is not None else {})


def jinja(source: str, scope: dict[str, Any] | None = None) -> Any:
    return compile_template(source).render(scope or {})


def pairs(found: list[dict[str, Any]]) -> list[tuple[Any, Any]]:
    return [(w["start"], w["end"]) for w in found]


# --- windows ---------------------------------------------------------------------------------


def test_month_windows_clamp_to_the_month_end_computed_from_the_start() -> None:
    # 2024 is a leap year: Jan 30 + P1M is Feb 29, + P2M is Mar 30 (not Feb 29 + P1M).
    assert pairs(windows("2024-01-30", "2024-05-10", "P1M")) == [
        ("2024-01-30", "2024-02-29"),
        ("2024-02-29", "2024-03-30"),
        ("2024-03-30", "2024-04-30"),
        ("2024-04-30", "2024-05-10"),
    ]
    # Not a leap year: Jan 31 + P1M is Feb 28; + P2M is Mar 31.
    assert pairs(windows("2023-01-31T00:00:00Z", "2023-04-01T00:00:00Z", "P1M")) == [
        ("2023-01-31T00:00:00Z", "2023-02-28T00:00:00Z"),
        ("2023-02-28T00:00:00Z", "2023-03-31T00:00:00Z"),
        ("2023-03-31T00:00:00Z", "2023-04-01T00:00:00Z"),
    ]


def test_the_last_window_ends_at_the_end_and_an_empty_range_has_none() -> None:
    assert pairs(windows("2024-01-01T00:00:00Z", "2024-01-01T15:00:00Z", "PT6H")) == [
        ("2024-01-01T00:00:00Z", "2024-01-01T06:00:00Z"),
        ("2024-01-01T06:00:00Z", "2024-01-01T12:00:00Z"),
        ("2024-01-01T12:00:00Z", "2024-01-01T15:00:00Z"),
    ]
    assert windows("2024-02-01", "2024-02-01", "P1D") == []
    assert windows("2024-03-01", "2024-02-01", "P1D") == []


def test_windows_are_utc_whatever_the_offset_and_keep_the_start_format() -> None:
    # Offsets are instants: the boundaries come out in UTC, 24 h apart across the DST change.
    found = windows("2024-03-30T00:00:00+01:00", "2024-04-01T00:00:00+02:00", "P1D")
    assert pairs(found) == [
        ("2024-03-29T23:00:00Z", "2024-03-30T23:00:00Z"),
        ("2024-03-30T23:00:00Z", "2024-03-31T22:00:00Z"),
    ]
    # No zone: UTC, written back without one. Epoch numbers stay numbers.
    assert pairs(windows("2024-01-01T00:00:00", "2024-01-01T12:00:00", "PT12H")) == [
        ("2024-01-01T00:00:00", "2024-01-01T12:00:00")
    ]
    assert pairs(windows(1704067200, 1704240000, "P1D")) == [
        (1704067200, 1704153600),
        (1704153600, 1704240000),
    ]


def test_a_year_step_from_a_leap_day_and_weeks() -> None:
    assert pairs(windows("2024-02-29", "2026-01-01", "P1Y")) == [
        ("2024-02-29", "2025-02-28"),
        ("2025-02-28", "2026-01-01"),
    ]
    assert len(windows("2024-01-01", "2024-12-31", "P2W")) == 27


def test_a_null_end_is_now() -> None:
    found = windows("2000-01-01", None, "P365D")
    today = datetime.now(UTC).date().isoformat()
    assert found[-1]["end"] == today
    assert found[0] == {"start": "2000-01-01", "end": "2000-12-31"}


@pytest.mark.parametrize(
    ("start", "end", "step", "message"),
    [
        (None, "2024-01-01", "P1D", "start is null"),
        ("yesterday", "2024-01-01", "P1D", "start is not an ISO 8601 datetime"),
        ("2024-01-01", "2024-02-01", "P0D", "is zero"),
        ("2024-01-01", "2024-02-01", "1 day", "not an ISO 8601 duration"),
        ("1970-01-01T00:00:00Z", "2024-01-01T00:00:00Z", "PT1S", f"more than {MAX_WINDOWS}"),
    ],
)
def test_windows_refuses(start: Any, end: Any, step: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        windows(start, end, step)


def test_windows_in_both_languages_gives_the_same_list() -> None:
    scope = {"state": {"reports": {"since": "2024-01-31"}}}
    from_jinja = jinja("{{ windows(state.reports.since, '2024-04-02', 'P1M') }}", scope)
    from_jmes = jmes("windows(state.reports.since, '2024-04-02', 'P1M')", scope)
    assert from_jinja == from_jmes == windows("2024-01-31", "2024-04-02", "P1M")
    assert len(from_jmes) == 3


def test_windows_takes_exactly_three_arguments_and_a_null_start_is_a_located_failure() -> None:
    with pytest.raises(ExpressionError, match=r"windows\(\) takes 3 arguments, got 2"):
        compile_expression("windows(a, 'P1D')")
    with pytest.raises(RenderError, match="start is null"):
        jmes("windows(a, null, 'P1D')", {"a": None})
    with pytest.raises(RenderError, match="start is null"):
        jinja("{{ windows(none, none, 'P1D') }}")


def test_durations() -> None:
    assert parse_duration("P1Y2M").months == 14
    assert parse_duration("PT1H30M").fixed.total_seconds() == 5400
    assert parse_duration("PT0.5S").fixed.total_seconds() == 0.5
    for bad in ("P", "PT", "1D", "P1H", "PT1D", "-P1D"):
        with pytest.raises(ValueError):
            parse_duration(bad)


# --- parse_datetime ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fmt", "expected"),
    [
        ("Tue, 03 Dec 2024 10:00:00 +0100", "%a, %d %b %Y %H:%M:%S %z", "2024-12-03T09:00:00Z"),
        # What RSS feeds really send under the RFC 2822 format.
        ("Tue, 03 Dec 2024 10:00:00 GMT", "%a, %d %b %Y %H:%M:%S %z", "2024-12-03T10:00:00Z"),
        ("3 Dec 2024 10:00:00 EST", "%a, %d %b %Y %H:%M:%S %z", "2024-12-03T15:00:00Z"),
        ("03/12/2024", "%d/%m/%Y", "2024-12-03T00:00:00Z"),
        ("2024-12-03 10:00:00.250", "%Y-%m-%d %H:%M:%S.%f", "2024-12-03T10:00:00.25Z"),
    ],
)
def test_parse_datetime_in_both_languages(text: str, fmt: str, expected: str) -> None:
    assert jmes("parse_datetime(t, f)", {"t": text, "f": fmt}) == expected
    assert jinja("{{ parse_datetime(t, f) }}", {"t": text, "f": fmt}) == expected
    assert jinja("{{ t | parse_datetime(f) }}", {"t": text, "f": fmt}) == expected


def test_parse_datetime_that_does_not_match_fails_and_in_a_condition_too() -> None:
    with pytest.raises(RenderError, match="does not match"):
        jmes("parse_datetime(t, '%Y')", {"t": "never"})
    # Not a wrong type: the text is wrong, and a condition says so instead of hiding it.
    with pytest.raises(RenderError, match="does not match"):
        compile_expression("parse_datetime(t, '%Y')").holds({"t": "never"})


def test_to_epoch_is_a_function_of_both_languages() -> None:
    assert jmes("to_epoch(d)", {"d": "2024-05-01T12:00:00Z"}) == 1714564800
    assert jinja("{{ d | to_epoch }}", {"d": "2024-05-01T12:00:00Z"}) == 1714564800


# --- arithmetic -----------------------------------------------------------------------------


def test_arithmetic() -> None:
    data = {"limit": 100, "pages": 7, "price": 2.5}
    assert jmes("multiply(limit, pages)", data) == 700
    assert jmes("add(limit, `1`)", data) == 101
    assert jmes("subtract(limit, price)", data) == 97.5
    assert jmes("divide(`7`, `2`)", data) == 3.5
    assert jmes("divide(limit, `4`)", data) == 25  # exact: an integer
    assert jmes("divide(`1`, `3`)", data) == pytest.approx(1 / 3)
    assert jmes("subtract(to_epoch('2024-01-02T00:00:00Z'), `86400`)") == 1704067200


def test_dividing_by_zero_is_a_located_failure_even_in_a_condition() -> None:
    with pytest.raises(RenderError, match=r"divide\(1, 0\): division by zero"):
        jmes("divide(`1`, n)", {"n": 0})
    with pytest.raises(RenderError, match="division by zero"):
        compile_expression("divide(`1`, n) > `0`").holds({"n": 0})


def test_arithmetic_on_a_wrong_type_fails_a_value_and_is_false_in_a_condition() -> None:
    with pytest.raises(RenderError, match="invalid type"):
        jmes("add(n, `1`)", {"n": "3"})
    with pytest.raises(RenderError):
        jmes("add(n, `1`)", {"n": True})
    assert compile_expression("add(n, `1`) > `2`").holds({"n": None}) is False
    assert compile_expression("add(n, `1`) > `2`").holds({"n": 2}) is True


# --- null-safe conditions -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "data", "expected"),
    [
        ("contains(body.message, 'limit')", {"body": {"message": None}}, False),
        ("contains(body.message, 'limit')", {"body": {}}, False),
        ("contains(body.message, 'limit')", {"body": {"message": "rate limit"}}, True),
        ("!contains(body.message, 'limit')", {"body": {}}, False),
        ("length(items) > `0`", {"items": None}, False),
        ("starts_with(name, 'a') || flag", {"name": 3, "flag": True}, False),
        ("body.done", {"body": 5}, False),
        ("status == `200`", {"status": 200}, True),
    ],
)
def test_conditions_are_null_safe(source: str, data: Any, expected: bool) -> None:
    assert compile_expression(source).holds(data) is expected


def test_the_same_expression_as_a_value_still_fails() -> None:
    with pytest.raises(RenderError, match="invalid type"):
        jmes("contains(body.message, 'limit')", {"body": {}})


def test_negated_path_is_found_where_written() -> None:
    assert compile_expression("!body.has_more").negated_path == "body.has_more"
    assert compile_expression("a && !b.c").negated_path == "b.c"
    assert compile_expression("!(body.has_more)").negated_path is None
    assert compile_expression("!done").negated_path is None
    assert compile_expression("!body.has_more").holds({"body": {"has_more": False}}) is False


# --- compressed payloads --------------------------------------------------------------------


CSV = b"id,name\n1,ann\n2,bob\n"


def test_a_csv_gz_url_gives_the_format_after_decompression() -> None:
    options = DecodeOptions()
    raw, found = unpack_payload(
        gzip.compress(CSV), "application/gzip", "http://h/x.csv.gz", options
    )
    assert found.format == "csv"
    assert decode_body(raw, "application/gzip", found) == [
        {"id": "1", "name": "ann"},
        {"id": "2", "name": "bob"},
    ]


def test_the_suffix_is_read_on_the_path_not_the_query() -> None:
    options = DecodeOptions()
    body = gzip.compress(b'{"a": 1}')
    raw, found = unpack_payload(body, "application/octet-stream", "http://h/x?f=a.json.gz", options)
    assert (raw, found.format) == (body, "auto")
    raw, found = unpack_payload(body, "application/octet-stream", "http://h/a.json.gz?x=1", options)
    assert (raw, found.format) == (b'{"a": 1}', "json")


def test_application_gzip_takes_the_declared_format() -> None:
    options = DecodeOptions(format="ndjson")
    raw, found = unpack_payload(
        gzip.compress(b'{"a":1}\n{"a":2}\n'), "application/gzip", "http://h/e", options
    )
    assert decode_body(raw, None, found) == [{"a": 1}, {"a": 2}]


def test_several_gzip_members_and_none_and_gzip_modes() -> None:
    body = gzip.compress(b"id\n1\n") + gzip.compress(b"2\n")
    raw, _ = unpack_payload(body, None, "http://h/a.csv.gz", DecodeOptions())
    assert raw == b"id\n1\n2\n"
    kept, _ = unpack_payload(
        body, "application/gzip", "http://h/a.csv.gz", DecodeOptions(compression="none")
    )
    assert kept == body
    # gzip: whatever the headers say.
    raw, _ = unpack_payload(
        gzip.compress(b"[1]"), "application/json", "http://h/a", DecodeOptions(compression="gzip")
    )
    assert raw == b"[1]"
    with pytest.raises(DecodeError, match="not gzip"):
        unpack_payload(b"[1]", "application/json", "http://h/a", DecodeOptions(compression="gzip"))
    # auto: a body the transport already inflated (Content-Encoding) is left alone.
    assert unpack_payload(b"[1]", "application/gzip", "http://h/a.gz", DecodeOptions())[0] == b"[1]"


def test_a_gzip_bomb_stops_at_max_body_bytes() -> None:
    bomb = gzip.compress(b"0" * (4 * 1024 * 1024))
    with pytest.raises(DecodeError, match="max_body_bytes"):
        unpack_payload(
            bomb, "application/gzip", "http://h/x", DecodeOptions(max_body_bytes=1024 * 1024)
        )


def test_a_cut_gzip_payload_is_a_decode_error() -> None:
    body = gzip.compress(CSV * 100)
    with pytest.raises(DecodeError, match="ends before its end marker"):
        unpack_payload(body[: len(body) // 2], "application/gzip", "http://h/x", DecodeOptions())


# --- reshaping ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("CamelCase", "camel_case"),
        ("HTTPCode", "http_code"),
        ("userID", "user_id"),
        ("first-name", "first_name"),
        ("already_snake", "already_snake"),
        ("ID", "id"),
        ("Version2Name", "version2_name"),
    ],
)
def test_snake_case(key: str, expected: str) -> None:
    assert snake_case(key) == expected


def test_drop_fields_paths_and_stars_leave_the_original_untouched() -> None:
    record = {
        "a": 1,
        "x": {"q": 1, "r": 2},
        "addr": {"zip": "01234", "city": "Oslo"},
        "b": {"c": {"d": 1, "e": 2}},
        "n": 5,
    }
    original = json.loads(json.dumps(record))
    drop = compile_drop(("a", "x.*", "*.zip", "b.c.d", "absent", "n.deeper"))
    assert drop(record) == {"x": {}, "addr": {"city": "Oslo"}, "b": {"c": {"e": 2}}, "n": 5}
    assert record == original
    assert compile_drop(("*",))(record) == {}


def test_rename_keeps_order_and_refuses_two_keys_to_one_name() -> None:
    assert list(compile_rename("lower")({"B": 1, "a": 2})) == ["b", "a"]
    assert compile_rename({"a": "z"})({"a": 1, "b": 2}) == {"z": 1, "b": 2}
    with pytest.raises(RenderError, match="'Id' and 'ID' are both renamed to 'id'"):
        compile_rename("snake")({"Id": 1, "ID": 2})
    with pytest.raises(RenderError, match="'a' and 'b' are both renamed to 'b'"):
        compile_rename({"a": "b"})({"a": 1, "b": 2})


def test_add_fields_nested_creates_objects_and_copies_what_it_changes() -> None:
    record = {"id": 1, "meta": {"a": 1}}
    add = compile_reshape(
        (("meta.source", lambda r: "api", False), ("x.y.z", lambda r: r["id"], False)), None, None
    )
    assert add is not None
    assert add(record, {}) == {"id": 1, "meta": {"a": 1, "source": "api"}, "x": {"y": {"z": 1}}}
    assert record == {"id": 1, "meta": {"a": 1}}
    nested = compile_reshape((("id.x", lambda r: 1, False),), None, None)
    assert nested is not None
    with pytest.raises(RenderError, match=r"add_fields\.id\.x: 'id' is a number, not an object"):
        nested({"id": 1}, {})
    assert compile_reshape(None, None, None) is None
