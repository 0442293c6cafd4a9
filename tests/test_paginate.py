"""Unit tests of runner/paginate.py: tokens, totals, stops, loops and Link headers."""

from __future__ import annotations

from typing import Any

import pytest

from runner.errors import RunError
from runner.expressions import compile_expression
from runner.model import PaginateSpec
from runner.paginate import Pagination, as_number, next_link


def spec(kind: str, param: str = "", **keys: Any) -> PaginateSpec:
    expressions = ("total_pages", "total", "cursor", "next_url", "stop_when")
    compiled: dict[str, Any] = {
        k: compile_expression(v) if k in expressions else v for k, v in keys.items()
    }
    default = {"page_number": "page", "offset": "offset", "cursor": "cursor"}.get(kind, "")
    if kind == "offset":
        compiled.setdefault("limit_param", "limit")
    return PaginateSpec(type=kind, param=param or default, **compiled)


def page(body: Any = None, headers: dict[str, str] | None = None, url: str = "") -> dict[str, Any]:
    return {"body": body, "headers": headers or {}, "url": url}


# -- next_link (RFC 8288) --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ('<https://a/p?page=2>; rel="next"', "https://a/p?page=2"),
        ('<https://a/1>; rel="prev", <https://a/3>; rel="next"', "https://a/3"),
        ('<https://a/9>; rel="last", <https://a/1>; rel="first"', None),
        ('<https://a/3>; rel="next last"', "https://a/3"),
        ("<https://a/3>; rel=next", "https://a/3"),
        ('<https://a/3>; REL="Next"', "https://a/3"),
        ('<https://a/3>; title="next page"; rel="prev"', None),
        ('<https://a/x,y>; rel="first", </rel?next=1>; type="a"; rel="next"', "/rel?next=1"),
    ],
)
def test_next_link(header: str | None, expected: str | None) -> None:
    assert next_link(header) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (3, 3.0),
        (2.5, 2.5),
        ("12", 12.0),
        (" 7 \n", 7.0),
        ("x", None),
        (None, None),
        (True, None),
        ([1], None),
    ],
)
def test_as_number(value: Any, expected: float | None) -> None:
    assert as_number(value) == expected


# -- tokens -----------------------------------------------------------------------------------


def test_page_number_tokens_and_total_pages() -> None:
    p = Pagination(
        spec("page_number", start=0, size_param="per_page", size=2, total_pages="body.pages")
    )
    assert p.tokens() == [("page", 0), ("per_page", 2)]
    assert p.scope() == {"number": 0, "offset": 0, "cursor": None}
    assert p.advance(page({"pages": 3}), 2) is True
    assert p.tokens() == [("page", 1), ("per_page", 2)]
    assert p.advance(page({"pages": 3}), 2) is True
    # The third page of three: no fourth request.
    assert p.advance(page({"pages": "3"}), 2) is False
    assert p.pages == 3 and p.cut_short is False


def test_page_number_total_records_stops_without_an_extra_request() -> None:
    p = Pagination(spec("page_number", total='headers."x-total-count"'))
    h = {"x-total-count": "25"}
    assert p.advance(page([], h), 10) is True
    assert p.advance(page([], h), 10) is True
    assert p.advance(page([], h), 5) is False


def test_offset_advances_by_records_held_and_stops_at_total() -> None:
    p = Pagination(spec("offset", limit=10, total="body.total"))
    assert p.tokens() == [("offset", 0), ("limit", 10)]
    assert p.advance(page({"total": 23}), 10) is True
    assert p.tokens() == [("offset", 10), ("limit", 10)]
    # A short page (the server capped it): the offset follows what came, not the limit.
    assert p.advance(page({"total": 23}), 8) is True
    assert p.scope()["offset"] == 18
    assert p.advance(page({"total": 23}), 5) is False


def test_cursor_is_sent_only_once_there_is_one() -> None:
    p = Pagination(spec("cursor", cursor="body.next", param="after"))
    assert p.tokens() == []
    assert p.advance(page({"next": "c2"}), 1) is True
    assert p.tokens() == [("after", "c2")]
    assert p.scope()["cursor"] == "c2"
    assert p.advance(page({"next": ""}), 1) is False
    q = Pagination(spec("cursor", cursor="body.next"))
    assert q.advance(page({"next": None}), 1) is False
    # 0 is a real cursor (JMESPath truthiness), not the end.
    r = Pagination(spec("cursor", cursor="body.next"))
    assert r.advance(page({"next": 0}), 1) is True
    assert r.tokens() == [("cursor", 0)]


def test_cursor_from_last_record_and_header() -> None:
    p = Pagination(spec("cursor", cursor="body.data[-1].id"))
    assert p.advance(page({"data": [{"id": 1}, {"id": 7}]}), 2) is True
    assert p.tokens() == [("cursor", 7)]
    q = Pagination(spec("cursor", cursor='headers."x-next"'))
    assert q.advance(page(None, {"x-next": "abc"}), 1) is True
    assert q.tokens() == [("cursor", "abc")]


def test_in_none_places_nothing_but_keeps_page_scope() -> None:
    p = Pagination(spec("page_number", location="none"))
    assert p.tokens() == []
    p.advance(page(), 1)
    assert p.tokens() == [] and p.scope()["number"] == 2


def test_no_spec_never_advances() -> None:
    p = Pagination(None)
    assert p.tokens() == [] and p.advance(page(), 5) is False
    assert p.repeats([{"a": 1}]) is False


# -- stops --------------------------------------------------------------------------------------


def test_empty_page_stops_every_type() -> None:
    for kind, keys in [
        ("page_number", {}),
        ("offset", {}),
        ("cursor", {"cursor": "body.next"}),
        ("next_url", {"next_url": "body.next"}),
        ("link_header", {}),
    ]:
        p = Pagination(spec(kind, **keys))
        scope = page({"next": "x"}, {"link": '</x>; rel="next"'}, "http://h/a")
        assert p.advance(scope, 0) is False, kind
        assert p.cut_short is False


def test_max_pages_is_cut_short_only_with_pages_left() -> None:
    p = Pagination(spec("page_number", max_pages=2, total_pages="body.pages"))
    assert p.advance(page({"pages": 5}), 1) is True
    assert p.advance(page({"pages": 5}), 1) is False
    assert p.cut_short is True
    # The last page was also the last of the total: not cut short.
    q = Pagination(spec("page_number", max_pages=2, total_pages="body.pages"))
    q.advance(page({"pages": 2}), 1)
    assert q.advance(page({"pages": 2}), 1) is False
    assert q.cut_short is False
    # A cursor that ends on the max page: not cut short either.
    r = Pagination(spec("cursor", cursor="body.next", max_pages=1))
    assert r.advance(page({"next": None}), 1) is False
    assert r.cut_short is False


# -- next URLs ----------------------------------------------------------------------------------


def test_next_url_resolves_against_the_response_url() -> None:
    p = Pagination(spec("next_url", next_url="body.next"))
    assert p.advance(page({"next": "?page=2"}, url="http://h/api/items?page=1"), 1) is True
    assert p.next_url == "http://h/api/items?page=2"
    assert p.advance(page({"next": "../other/3"}, url=p.next_url), 1) is True
    assert p.next_url == "http://h/other/3"
    assert p.advance(page({"next": "https://x.example/4"}, url=p.next_url), 1) is True
    assert p.next_url == "https://x.example/4"
    assert p.advance(page({"next": "  "}, url=p.next_url), 1) is False


def test_link_header_follows_next_among_several_rels() -> None:
    p = Pagination(spec("link_header"))
    link = '</items?page=1>; rel="first", </items?page=3>; rel="next", </items?page=9>; rel="last"'
    assert p.advance(page(None, {"link": link}, "http://h/items?page=2"), 5) is True
    assert p.next_url == "http://h/items?page=3"
    assert p.advance(page(None, {}, "http://h/items?page=3"), 5) is False


# -- loops ---------------------------------------------------------------------------------------


def test_same_cursor_twice_is_a_loop() -> None:
    p = Pagination(spec("cursor", cursor="body.next"))
    p.advance(page({"next": "a"}), 1)
    p.advance(page({"next": "b"}), 1)
    with pytest.raises(RunError, match="pagination loop: the same cursor 'a' came twice"):
        p.advance(page({"next": "a"}), 1)


def test_same_next_url_twice_is_a_loop() -> None:
    p = Pagination(spec("next_url", next_url="body.next"))
    p.advance(page({"next": "/p2"}, url="http://h/p1"), 1)
    # Relative and absolute spellings of one URL are the same URL.
    with pytest.raises(RunError, match="same next URL 'http://h/p2'"):
        p.advance(page({"next": "http://h/p2"}, url="http://h/p2"), 1)


def test_repeated_records_are_detected_once_per_neighbour() -> None:
    p = Pagination(spec("page_number"))
    assert p.repeats([{"id": 1}]) is False
    assert p.repeats([{"id": 2}]) is False
    assert p.repeats([{"id": 2}]) is True
    assert p.repeated_page is True
    # Empty pages are not repeats (they end the pagination anyway).
    q = Pagination(spec("page_number"))
    assert q.repeats([]) is False and q.repeats([]) is False
