"""Response decoding: every format and option, refused XML, size limits, the JSON helpers."""

from __future__ import annotations

import gzip
import json
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.codec import (
    _dumps_fast,
    _dumps_stdlib,
    _loads_fast,
    _loads_stdlib,
    json_dumps_line,
    json_loads,
)
from runner.decode import (
    DEFAULT_MAX_BODY_BYTES,
    BodyLimit,
    DecodeOptions,
    body_excerpt,
    choose_format,
    decode_body,
    decode_lenient,
)
from runner.errors import DecodeError

AUTO = DecodeOptions()


def decode(raw: bytes, content_type: str | None, **options: Any) -> Any:
    return decode_body(raw, content_type, DecodeOptions(**options))


def decode_error(raw: bytes, content_type: str | None, **options: Any) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        decode(raw, content_type, **options)
    return info.value


# --- format resolution ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        ("application/json", "json"),
        ("application/json; charset=utf-8", "json"),
        ("APPLICATION/JSON", "json"),
        ("application/problem+json", "json"),
        ("application/vnd.api+json; charset=UTF-8", "json"),
        ("application/x-ndjson", "ndjson"),
        ("application/ndjson", "ndjson"),
        ("application/jsonl", "ndjson"),
        ("text/csv", "csv"),
        ("text/csv; charset=iso-8859-1; header=present", "csv"),
        ("application/xml", "xml"),
        ("text/xml; charset=utf-8", "xml"),
        ("application/atom+xml", "xml"),
        ("application/soap+xml", "xml"),
        (" Text/XML ", "xml"),
        ("text/plain", "text"),
        ("text/html", "text"),
        ("text/json", "text"),
        ("application/octet-stream", "text"),
        ("", "text"),
        (None, "text"),
    ],
)
def test_auto_format_follows_the_content_type(content_type: str | None, expected: str) -> None:
    assert choose_format(content_type, "auto") == expected


@pytest.mark.parametrize("fmt", ["json", "xml", "csv", "ndjson", "text"])
def test_an_explicit_format_wins_over_the_content_type(fmt: str) -> None:
    assert choose_format("application/json", fmt) == fmt
    assert choose_format(None, fmt) == fmt


def test_an_explicit_format_decodes_whatever_the_content_type() -> None:
    assert decode(b'{"a": 1}', "text/plain", format="json") == {"a": 1}
    assert decode(b"<a>1</a>", None, format="xml") == {"a": "1"}
    assert decode(b'{"a": 1}', "application/json", format="text") == '{"a": 1}'


# --- empty bodies -----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["auto", "json", "xml", "csv", "ndjson", "text"])
def test_an_empty_body_is_null_in_every_format(fmt: str) -> None:
    assert decode(b"", "application/json", format=fmt) is None


@pytest.mark.parametrize("fmt", ["json", "xml", "csv", "ndjson"])
def test_a_whitespace_body_is_null_in_parsed_formats(fmt: str) -> None:
    assert decode(b" \r\n\t ", None, format=fmt) is None


def test_a_whitespace_body_stays_text_as_text() -> None:
    assert decode(b" \n", "text/plain") == " \n"


# --- JSON -------------------------------------------------------------------------------------


def test_json_keeps_types_and_key_order() -> None:
    body = b'{"z": 1, "a": [true, null, 1.5, "x"], "m": {"k": -2}}'
    value = decode(body, "application/json")
    assert value == {"z": 1, "a": [True, None, 1.5, "x"], "m": {"k": -2}}
    assert list(value) == ["z", "a", "m"]


def test_json_that_does_not_decode_names_the_content_type_and_shows_the_body() -> None:
    error = decode_error(b"<html>oops</html>", "application/json")
    assert error.message == (
        "response is not valid JSON (Content-Type application/json): "
        "Expecting value: line 1 column 1 (char 0)"
    )
    assert error.body == "<html>oops</html>"
    assert error.kind == "decode"
    assert "body: <html>oops</html>" in str(error)


def test_json_error_without_a_content_type() -> None:
    error = decode_error(b"{", None, format="json")
    assert error.message.startswith("response is not valid JSON (no Content-Type): ")


def test_json_tolerates_a_utf8_bom() -> None:
    assert decode(b'\xef\xbb\xbf{"a": "\xc3\xa9"}', "application/json") == {"a": "é"}


def test_json_honours_the_charset() -> None:
    body = '{"name": "Müller"}'
    assert decode(body.encode("latin-1"), "application/json; charset=ISO-8859-1") == {
        "name": "Müller"
    }
    assert decode(body.encode("utf-16"), 'application/json; charset="utf-16"') == {"name": "Müller"}


def test_json_in_utf8_that_is_not_utf8_fails() -> None:
    error = decode_error('{"name": "Müller"}'.encode("latin-1"), "application/json")
    assert "'utf-8' codec can't decode byte 0xfc" in error.message


def test_json_with_an_unknown_charset_is_read_as_utf8() -> None:
    assert decode('{"a": "é"}'.encode(), "application/json; charset=nonsense") == {"a": "é"}


def test_json_refuses_nan_and_infinity() -> None:
    assert "NaN is not valid JSON" in decode_error(b"[NaN]", "application/json").message
    assert "Infinity is not valid JSON" in decode_error(b"[-Infinity]", "application/json").message


def test_json_keeps_integers_beyond_64_bits_exact() -> None:
    assert decode(b'{"id": 123456789012345678901234567890}', "application/json") == {
        "id": 123456789012345678901234567890
    }
    assert decode(b"[-9223372036854775809, 18446744073709551616]", "application/json") == [
        -9223372036854775809,
        18446744073709551616,
    ]


def test_json_nested_too_deep_is_a_decode_error() -> None:
    error = decode_error(b"[" * 100_000 + b"]" * 100_000, "application/json")
    assert error.message.startswith("response is not valid JSON")


def test_json_with_trailing_data_fails() -> None:
    error = decode_error(b'{"a": 1} x', "application/json")
    assert error.message.endswith("Extra data: line 1 column 10 (char 9)")


# --- NDJSON -----------------------------------------------------------------------------------


def test_ndjson_is_a_list_of_its_lines() -> None:
    body = b'{"a": 1}\r\n\n  \n{"b": [2]}\n3\n'
    assert decode(body, "application/x-ndjson") == [{"a": 1}, {"b": [2]}, 3]


def test_ndjson_bad_line_is_named() -> None:
    error = decode_error(b'{"a": 1}\n\n{"b": \n', "application/jsonl")
    assert error.message == (
        "response is not valid NDJSON (Content-Type application/jsonl): "
        "line 3, column 7: Expecting value"
    )


def test_ndjson_with_a_bom_and_a_charset() -> None:
    assert decode(b'\xef\xbb\xbf{"a": 1}\n{"b": 2}', "application/ndjson") == [{"a": 1}, {"b": 2}]
    body = '{"n": "Müller"}\n{"n": "Ærø"}\n'.encode("latin-1")
    assert decode(body, "application/x-ndjson; charset=latin-1") == [
        {"n": "Müller"},
        {"n": "Ærø"},
    ]


def test_ndjson_keeps_big_integers_and_refuses_nan() -> None:
    assert decode(b'{"id": 99999999999999999999}\n{"id": 1}', "application/x-ndjson") == [
        {"id": 99999999999999999999},
        {"id": 1},
    ]
    error = decode_error(b"1\nNaN\n", "application/x-ndjson")
    assert "line 2" in error.message
    assert "NaN is not valid JSON" in error.message


# --- CSV --------------------------------------------------------------------------------------


def test_csv_is_a_list_of_objects_with_string_values() -> None:
    body = b'id,name,amount\r\n1,"Smith, J",10.5\r\n2,"multi\r\nline",\r\n'
    assert decode(body, "text/csv") == [
        {"id": "1", "name": "Smith, J", "amount": "10.5"},
        {"id": "2", "name": "multi\r\nline", "amount": ""},
    ]


def test_csv_short_row_gives_nulls() -> None:
    assert decode(b"a,b,c\n1\n4,5\n", "text/csv") == [
        {"a": "1", "b": None, "c": None},
        {"a": "4", "b": "5", "c": None},
    ]


def test_csv_long_row_is_an_error_naming_the_row() -> None:
    error = decode_error(b"a,b\n1,2\n\n3,4,5\n", "text/csv")
    assert error.message == (
        "response is not valid CSV (Content-Type text/csv): "
        "row 2 (line 4) has 3 fields, the header has 2"
    )
    assert error.body is not None and error.body.startswith("a,b")


def test_csv_header_only_is_an_empty_list_and_blank_lines_are_skipped() -> None:
    assert decode(b"a,b\r\n", "text/csv") == []
    assert decode(b"\n\na,b\n\n1,2\n\n", "text/csv") == [{"a": "1", "b": "2"}]


def test_csv_delimiter_option() -> None:
    assert decode(b"a;b\n1;2,5\n", "text/csv", csv_delimiter=";") == [{"a": "1", "b": "2,5"}]
    assert decode(b"a\tb\n1\t2\n", None, format="csv", csv_delimiter="\t") == [{"a": "1", "b": "2"}]


def test_csv_encoding_option_wins_over_the_charset() -> None:
    body = "name\nMüller\n".encode("cp1252")
    assert decode(body, "text/csv; charset=utf-8", csv_encoding="cp1252") == [{"name": "Müller"}]


def test_csv_uses_the_charset_then_utf8() -> None:
    assert decode("name\nMüller\n".encode("latin-1"), "text/csv; charset=latin-1") == [
        {"name": "Müller"}
    ]
    assert decode("name\nMüller\n".encode(), "text/csv") == [{"name": "Müller"}]


def test_csv_tolerates_a_bom() -> None:
    assert decode(b"\xef\xbb\xbfid,name\n1,x\n", "text/csv") == [{"id": "1", "name": "x"}]
    assert decode("id\n1\n".encode("utf-16"), "text/csv", csv_encoding="utf-16") == [{"id": "1"}]


def test_csv_that_does_not_decode_in_its_encoding_fails() -> None:
    error = decode_error(b"name\nM\xfcller\n", "text/csv")
    assert error.message.startswith("response is not valid CSV (Content-Type text/csv): ")
    assert "utf-8" in error.message


def test_csv_accepts_fields_larger_than_the_csv_module_default() -> None:
    big = "x" * 300_000
    assert decode(f"a,b\n{big},1\n".encode(), "text/csv") == [{"a": big, "b": "1"}]


def test_csv_with_a_quote_left_open_fails() -> None:
    error = decode_error(b'a,b\n1,2\n"3,4\n', "text/csv")
    assert error.message == (
        "response is not valid CSV (Content-Type text/csv): line 3: unexpected end of data"
    )
    error = decode_error(b'a,b\n1,"x"y\n', "text/csv")
    assert error.message.startswith("response is not valid CSV (Content-Type text/csv): line 2: ")


# --- text -------------------------------------------------------------------------------------


def test_text_uses_the_charset_and_never_fails() -> None:
    assert decode("Grüße".encode("latin-1"), "text/plain; charset=iso-8859-1") == "Grüße"
    assert decode("Grüße".encode(), "text/plain") == "Grüße"
    assert decode(b"bad \xff byte", "text/html") == "bad \ufffd byte"
    assert decode("é".encode(), "text/plain; charset=unknown-thing") == "é"


def test_text_drops_a_utf8_bom() -> None:
    assert decode(b"\xef\xbb\xbfhello", "text/plain") == "hello"


# --- XML --------------------------------------------------------------------------------------


def test_xml_the_way_xmltodict_does_it() -> None:
    body = b"""<?xml version="1.0" encoding="UTF-8"?>
    <orders count="2">
      <order id="1"><total currency="EUR">10.50</total><note/></order>
      <order id="2"><total currency="USD">7</total><note>rush</note></order>
      <single>only</single>
    </orders>"""
    assert decode(body, "application/xml") == {
        "orders": {
            "@count": "2",
            "order": [
                {"@id": "1", "total": {"@currency": "EUR", "#text": "10.50"}, "note": None},
                {"@id": "2", "total": {"@currency": "USD", "#text": "7"}, "note": "rush"},
            ],
            "single": "only",
        }
    }


def test_xml_force_list_makes_even_one_a_list() -> None:
    body = b"<r><item>1</item><other>x</other></r>"
    assert decode(body, "text/xml", xml_force_list=("item",)) == {
        "r": {"item": ["1"], "other": "x"}
    }


NAMESPACED = b"""<feed xmlns="http://www.w3.org/2005/Atom" xmlns:x="urn:x"
      xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <entry x:id="7" xsi:type="t"><x:title>One</x:title></entry>
</feed>"""


def test_xml_strips_namespace_prefixes_and_drops_xmlns_by_default() -> None:
    assert decode(NAMESPACED, "application/atom+xml") == {
        "feed": {"entry": {"@id": "7", "@type": "t", "title": "One"}}
    }


def test_xml_keeps_prefixes_when_asked_but_still_drops_xmlns() -> None:
    assert decode(NAMESPACED, "application/atom+xml", xml_namespaces="keep") == {
        "feed": {"entry": {"@x:id": "7", "@xsi:type": "t", "x:title": "One"}}
    }


def test_xml_force_list_matches_local_names_in_both_namespace_modes() -> None:
    for mode in ("strip", "keep"):
        value = decode(
            NAMESPACED, "text/xml", xml_namespaces=mode, xml_force_list=("entry", "title")
        )
        entries = value["feed"]["entry"]
        assert isinstance(entries, list) and len(entries) == 1
        title_key = "title" if mode == "strip" else "x:title"
        assert entries[0][title_key] == ["One"]
    # A prefixed name in the option counts by its local name too.
    value = decode(NAMESPACED, "text/xml", xml_namespaces="keep", xml_force_list=("x:title",))
    assert value["feed"]["entry"]["x:title"] == ["One"]


def test_xml_attr_prefix_and_text_key_options() -> None:
    body = b'<r><v unit="kg">5</v></r>'
    assert decode(body, "text/xml", xml_attr_prefix="_", xml_text_key="value") == {
        "r": {"v": {"_unit": "kg", "value": "5"}}
    }
    assert decode(body, "text/xml", xml_attr_prefix="") == {
        "r": {"v": {"unit": "kg", "#text": "5"}}
    }


def test_xml_numbers_stay_strings() -> None:
    assert decode(b"<r><n>42</n><f>1.5</f></r>", "text/xml") == {"r": {"n": "42", "f": "1.5"}}


def test_xml_charset_wins_over_the_declaration() -> None:
    body = '<?xml version="1.0" encoding="UTF-8"?><r>Müller</r>'.encode("latin-1")
    assert decode(body, "text/xml; charset=iso-8859-1") == {"r": "Müller"}
    body = '<?xml version="1.0" encoding="ISO-8859-1"?><r>Müller</r>'.encode()
    assert decode(body, "text/xml; charset=utf-8") == {"r": "Müller"}
    assert decode("<r>Ærø</r>".encode("cp1252"), "text/xml; charset=windows-1252") == {"r": "Ærø"}


def test_xml_without_charset_follows_its_declaration_and_bom() -> None:
    body = '<?xml version="1.0" encoding="ISO-8859-1"?><r>Müller</r>'.encode("latin-1")
    assert decode(body, "application/xml") == {"r": "Müller"}
    assert decode("<r>Müller</r>".encode("utf-16"), "application/xml") == {"r": "Müller"}


def test_xml_that_does_not_parse_fails_with_the_parser_message() -> None:
    error = decode_error(b"<r><a></r>", "application/xml")
    assert error.message == (
        "response is not valid XML (Content-Type application/xml): mismatched tag: line 1, column 8"
    )
    assert error.body == "<r><a></r>"


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<lolz>&lol9;</lolz>"""

XXE = b"""<?xml version="1.0"?>
<!DOCTYPE r [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<r>&xxe;</r>"""

XXE_PARAMETER = b"""<?xml version="1.0"?>
<!DOCTYPE r [<!ENTITY % ext SYSTEM "http://127.0.0.1:9/evil.dtd"> %ext;]>
<r>x</r>"""

EXTERNAL_DTD = b"""<?xml version="1.0"?>
<!DOCTYPE r SYSTEM "http://127.0.0.1:9/r.dtd"><r>x</r>"""

PLAIN_DOCTYPE = b"<!DOCTYPE r><r>hi</r>"


@pytest.mark.parametrize(
    "body",
    [BILLION_LAUGHS, XXE, XXE_PARAMETER, EXTERNAL_DTD, PLAIN_DOCTYPE],
    ids=["billion-laughs", "xxe", "xxe-parameter-entity", "external-dtd", "doctype"],
)
def test_xml_with_a_dtd_or_entities_is_refused(body: bytes) -> None:
    started = time.perf_counter()
    error = decode_error(body, "application/xml")
    assert error.message == (
        "XML with a DTD or entity declarations is refused (Content-Type application/xml)"
    )
    assert error.kind == "decode"
    assert time.perf_counter() - started < 1.0  # refused before any expansion


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"<!DOCTYPE html><html><body>hi</body></html>", "application/xml"),
        (b"\n  <!-- login --><!doctype HTML>\n<html><p>Sign in<br></html>", None),
        (b"<html><body><p>Not found<br></body></html>", "application/xml"),
        (b"<p>Maintenance<br>back soon</p>", "text/html; charset=utf-8"),
    ],
    ids=["doctype", "comment-then-doctype", "no-doctype", "by-content-type"],
)
def test_html_forced_to_xml_is_said_to_be_html(body: bytes, content_type: str | None) -> None:
    with pytest.raises(DecodeError) as caught:
        decode(body, content_type, format="xml")
    where = f"Content-Type {content_type}" if content_type else "no Content-Type"
    assert caught.value.message == f"response is HTML, not XML ({where})"
    assert caught.value.body is not None and "<" in caught.value.body


def test_xml_refusal_holds_in_keep_mode_and_under_a_charset() -> None:
    with pytest.raises(DecodeError, match="DTD or entity declarations is refused"):
        decode(XXE, "text/xml; charset=iso-8859-1", xml_namespaces="keep")


def test_xml_undeclared_entity_is_an_error_not_a_silent_null() -> None:
    error = decode_error(b"<r>&xxe;</r>", "application/xml")
    assert "undefined entity" in error.message


def test_xml_predefined_entities_and_character_references_work() -> None:
    assert decode(b"<r>a &amp; b &lt; &#233;</r>", "text/xml") == {"r": "a & b < é"}


# --- lenient decoding (non-2xx) ---------------------------------------------------------------


def test_lenient_decodes_when_it_can() -> None:
    assert decode_lenient(b'{"error": "gone"}', "application/json", AUTO) == {"error": "gone"}
    assert decode_lenient(b"", "application/json", AUTO) is None


def test_lenient_keeps_a_body_that_does_not_decode_as_text() -> None:
    html = b"<html><body>502 Bad Gateway</body></html"
    assert decode_lenient(html, "application/json", AUTO) == html.decode()
    assert decode_lenient(XXE, "application/xml", AUTO) == XXE.decode()
    assert decode_lenient(b"a\n1,2\n", "text/csv", AUTO) == "a\n1,2\n"
    latin = "Fehler: ungültig".encode("latin-1")
    assert decode_lenient(latin, "application/json; charset=latin-1", AUTO) == "Fehler: ungültig"


def test_lenient_still_enforces_the_size_limit() -> None:
    with pytest.raises(DecodeError, match="exceeds max_body_bytes"):
        decode_lenient(b"x" * 11, "text/plain", DecodeOptions(max_body_bytes=10))


# --- size limits ------------------------------------------------------------------------------


def test_decode_body_refuses_a_body_over_the_limit() -> None:
    options = DecodeOptions(max_body_bytes=10)
    assert decode_body(b"[1,2,3,4,5]"[:10], "text/plain", options) == "[1,2,3,4,5"
    with pytest.raises(DecodeError) as info:
        decode_body(b"[1,2,3,4,5]", "application/json", options)
    assert info.value.message == "response body exceeds max_body_bytes (10 bytes)"


def test_body_limit_counts_chunks() -> None:
    limit = BodyLimit(10)
    limit.add(b"12345")
    limit.add(b"67890")
    assert limit.total == 10
    with pytest.raises(DecodeError) as info:
        limit.add(b"x")
    assert info.value.message == "response body exceeds max_body_bytes (10 bytes)"
    assert info.value.kind == "decode"


@pytest.fixture
async def gzip_server() -> AsyncIterator[str]:
    payload = b'{"data": "' + b"a" * 2_000_000 + b'"}'
    compressed = gzip.compress(payload)
    assert len(compressed) < 20_000

    async def handler(request: web.Request) -> web.Response:
        return web.Response(
            body=compressed,
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        )

    app = web.Application()
    app.router.add_get("/big", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/big"
    finally:
        await runner.cleanup()


async def read_limited(url: str, max_bytes: int) -> bytes:
    limit = BodyLimit(max_bytes)
    chunks = []
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        async for chunk in response.content.iter_chunked(64 * 1024):
            limit.add(chunk)
            chunks.append(chunk)
    return b"".join(chunks)


async def test_body_limit_applies_to_decompressed_bytes_from_a_real_server(
    gzip_server: str,
) -> None:
    # The wire carries under 20 kB; the limit of 100 kB still trips on the inflated body.
    with pytest.raises(DecodeError, match=r"exceeds max_body_bytes \(100000 bytes\)"):
        await read_limited(gzip_server, 100_000)
    body = await read_limited(gzip_server, DEFAULT_MAX_BODY_BYTES)
    assert len(decode_body(body, "application/json", AUTO)["data"]) == 2_000_000


# --- body excerpt -----------------------------------------------------------------------------


def test_body_excerpt() -> None:
    assert body_excerpt(b"x" * 1000) == "x" * 500
    assert body_excerpt(b"abc", limit=2) == "ab"
    assert body_excerpt("é€😀".encode() * 300, limit=5) == "é€😀é€"
    assert body_excerpt(b"ok \xff") == "ok \ufffd"
    assert body_excerpt(("😀" * 600).encode()) == "😀" * 500


# --- options ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"format": "yaml"},
        {"max_body_bytes": 0},
        {"xml_namespaces": "drop"},
        {"csv_delimiter": ";;"},
        {"csv_delimiter": ""},
        {"csv_encoding": "no-such-codec"},
    ],
)
def test_options_check_themselves(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        DecodeOptions(**options)


def test_options_are_frozen_and_comparable() -> None:
    assert DecodeOptions(xml_force_list=("a",)) == DecodeOptions(xml_force_list=("a",))
    assert hash(DecodeOptions()) == hash(DecodeOptions())
    with pytest.raises(AttributeError):
        DecodeOptions().format = "json"  # type: ignore[misc]


# --- JSON helpers -----------------------------------------------------------------------------


def test_json_loads_accepts_bytes_and_str_and_raises_value_errors() -> None:
    assert json_loads(b'{"a": [1, 2]}') == {"a": [1, 2]}
    assert json_loads('{"a": "é"}') == {"a": "é"}
    assert json_loads('"\\ud800"') == "\ud800"
    for bad in (b"", b"{", "[1,]", b"NaN", b"\xff"):
        with pytest.raises(ValueError):
            json_loads(bad)
    with pytest.raises(ValueError):
        json_loads("[" * 100_000)


def test_json_dumps_line_is_compact_ordered_and_unescaped() -> None:
    record = {"z": 1, "a": "é ü 😀 \u2028", "n": None, "l": [True, 1.5, 'x\ny"\\']}
    assert json_dumps_line(record) == (
        '{"z":1,"a":"é ü 😀 \u2028","n":null,"l":[true,1.5,"x\\ny\\"\\\\"]}'
    )
    assert json_dumps_line({"f": [1e-05, 1.5e-07, 1e16, 0.0001]}) == (
        '{"f":[1e-05,1.5e-07,1e+16,0.0001]}'
    )
    assert json_dumps_line({1: 2**70}) == '{"1":1180591620717411303424}'
    assert json_dumps_line([math.nan, math.inf, -math.inf]) == "[null,null,null]"


def test_json_dumps_line_matches_the_standard_library() -> None:
    record = {"id": 1, "s": "<&>'", "f": 0.1, "t": (1, 2)}
    expected = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
    assert json_dumps_line(record) == expected


def test_json_dumps_line_refuses_what_json_cannot_write() -> None:
    with pytest.raises(TypeError):
        json_dumps_line({"a": object()})


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=20,
)
tiny_floats = st.floats(min_value=-1e-3, max_value=1e-3, allow_nan=False)


@settings(max_examples=300)
@given(json_values)
def test_both_json_writers_are_byte_identical(value: Any) -> None:
    assert _dumps_fast(value) == _dumps_stdlib(value)


@given(st.lists(tiny_floats | st.floats(allow_nan=True, allow_infinity=True), max_size=5))
def test_both_json_writers_agree_on_every_float(value: list[float]) -> None:
    assert _dumps_fast(value) == _dumps_stdlib(value)
    assert _dumps_fast(value[0] if value else 0.0) == _dumps_stdlib(value[0] if value else 0.0)


@settings(max_examples=300)
@given(json_values)
def test_both_json_readers_agree(value: Any) -> None:
    text = json.dumps(value, ensure_ascii=False)
    try:
        encoded = text.encode()
    except UnicodeEncodeError:  # lone surrogates: bytes cannot carry them
        encoded = None
    assert _loads_fast(text) == _loads_stdlib(text) == value
    if encoded is not None:
        assert _loads_fast(encoded) == _loads_stdlib(encoded) == value
