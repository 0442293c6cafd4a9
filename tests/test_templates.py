"""Templates: typed single expressions, JSON rendering, path encoding, filters, the sandbox."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Any

import pytest

from runner.errors import ExpressionError, RenderError
from runner.templates import (
    CompiledValue,
    RawPath,
    compile_template,
    compile_value,
    is_template,
)

SCOPE: dict[str, Any] = {
    "x": 21,
    "flag": True,
    "off": False,
    "nothing": None,
    "ratio": 0.5,
    "name": "Zoë <b> & 'co'",
    "zip": "01234",
    "obj": {"b": 1, "a": "<x>", "é": [1, None]},
    "body": {"items": [1, 2], "values": "v", "keys": ["k"]},
    "item": {"id": "a b/c", "ref": "R-1", "path": "dir/file name.txt", "n": 7},
    "steps": {"login": {"vars": {"keys": "K", "token": "t"}, "records": [{"id": 1}]}},
    "log": [],
}


def render(source: str, mode: Any = "value", scope: dict[str, Any] | None = None) -> Any:
    return compile_template(source, mode).render(SCOPE if scope is None else scope)


# --- detection and constants ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("{{ x }}", True),
        ("a {% if x %}b{% endif %}", True),
        ("{# note #}", True),
        ("plain text", False),
        ("{ x }", False),
        ("/v2/contacts", False),
    ],
)
def test_is_template(source: str, expected: bool) -> None:
    assert is_template(source) is expected


def test_constant_is_returned_as_is_without_jinja() -> None:
    template = compile_template("/v2/contacts/{id}", "path")
    assert template.is_constant
    assert template.names == frozenset()
    # Not even a syntax check: the source is never given to Jinja.
    assert template.render({}) == "/v2/contacts/{id}"
    assert compile_template("x }}", "value").render({}) == "x }}"


def test_compile_is_cached() -> None:
    assert compile_template("{{ x + 1 }}") is compile_template("{{ x + 1 }}")
    assert compile_template("{{ x + 1 }}", "text") is not compile_template("{{ x + 1 }}")


# --- value mode ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("{{ '94105' }}", "94105"),
        ("{{ zip }}", "01234"),
        ("{{ x * 2 }}", 42),
        ("{{ ratio }}", 0.5),
        ("{{ flag }}", True),
        ("{{ nothing }}", None),
        ("  {{ body.items }}\n", [1, 2]),
        ("{{ obj }}", {"b": 1, "a": "<x>", "é": [1, None]}),
        ("{{ [x, flag] }}", [21, True]),
        ("{{ {'k': x} }}", {"k": 21}),
        ("{{ (1, 2) }}", [1, 2]),
        ("{{ body['items'] | map('string') | list }}", ["1", "2"]),
        ("{{ body.items | map('string') }}", ["1", "2"]),
        ("{{ name | upper }}", "ZOË <B> & 'CO'"),
        ("{{ 'true' }}", "true"),
        ("{{ '[1, 2]' }}", "[1, 2]"),
    ],
)
def test_lone_expression_keeps_its_type(source: str, expected: Any) -> None:
    value = render(source)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("n={{ flag }}", "n=true"),
        ("{{ off }}/{{ nothing }}", "false/null"),
        ("x={{ x }} r={{ ratio }}", "x=21 r=0.5"),
        ("o={{ obj }}", 'o={"b":1,"a":"<x>","é":[1,null]}'),
        ("l={{ body.items }}", "l=[1,2]"),
        ("{{ name }}!", "Zoë <b> & 'co'!"),
        ("{% for i in body.items %}{{ i }},{% endfor %}", "1,2,"),
        ("{{ x }} {{ x }}", "21 21"),
    ],
)
def test_mixed_template_renders_non_strings_as_json(source: str, expected: str) -> None:
    assert render(source) == expected
    assert render(source, "text") == expected


def test_text_mode_always_gives_a_string() -> None:
    assert render("{{ x }}", "text") == "21"
    assert render("{{ flag }}", "text") == "true"
    assert render("{{ obj }}", "text") == '{"b":1,"a":"<x>","é":[1,null]}'
    assert render("{{ nothing }}", "text") == "null"


def test_mapping_keys_win_over_dict_methods() -> None:
    assert render("{{ body.items }}") == [1, 2]
    assert render("{{ body.values }}") == "v"
    assert render("{{ body.keys }}") == ["k"]
    assert render("{{ steps.login.vars.keys }}") == "K"
    # Methods stay reachable when the mapping has no such key.
    assert render("{% for k, v in obj.items() %}{{ k }};{% endfor %}") == "b;a;é;"
    assert render("{{ body.get('missing', 3) }}") == 3


def test_raw_and_markup_come_back_as_plain_strings() -> None:
    value = render("{{ item.path | raw }}")
    assert value == "dir/file name.txt"
    assert type(value) is str
    escaped = render("{{ name | xml_escape }}")
    assert type(escaped) is str


# --- names and step references ---------------------------------------------------------------


def test_names_and_step_refs() -> None:
    template = compile_template(
        "{{ steps.login.vars.token }}-{{ steps['other-step'].records | length }}"
        "-{{ item.id }}-{{ now() }}-{{ uuid4() }}{% set local = 1 %}{{ local }}"
    )
    assert template.names == {"steps", "item"}
    assert template.step_refs == {"login", "other-step"}
    assert not template.is_constant
    assert compile_template("{{ record.a + x }}").names == {"record", "x"}


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("{{ itme }}", "template error in '{{ itme }}': 'itme' is undefined"),
        ("id={{ itme }}", "template error in 'id={{ itme }}': 'itme' is undefined"),
        ("{{ [1, itme] }}", "'itme' is undefined"),
        ("{{ {'a': itme} }}", "'itme' is undefined"),
        ("{{ item.nope }}", "has no attribute 'nope'"),
        ("{{ steps.later.records }}", "has no attribute 'later'"),
        ("{{ x + 'a' }}", "TypeError: unsupported operand"),
        ("{{ x / 0 }}", "ZeroDivisionError"),
        ("{{ 'zz' | b64decode }}", "template error in"),
        ("{{ lipsum }}", "is not data"),
    ],
)
def test_render_errors_are_render_errors(source: str, message: str) -> None:
    with pytest.raises(RenderError) as info:
        render(source)
    assert message in info.value.message
    assert info.value.kind == "render"


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("{{ x }", "Jinja: unexpected '}' (line 1): {{ x }"),
        ("{{ x | nofilter }}", "Jinja: No filter named 'nofilter'. (line 1)"),
        ("a\n{% if %}\nb", "(line 2): {% if %}"),
        ("{{ x is nosuchtest }}", "No test named 'nosuchtest'"),
    ],
)
def test_syntax_errors_are_expression_errors(source: str, message: str) -> None:
    with pytest.raises(ExpressionError) as info:
        compile_template(source)
    assert message in info.value.message
    assert info.value.exit_code == 2


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError):
        compile_template("{{ x }}", "json")  # type: ignore[arg-type]


# --- path mode -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("/v2/companies/{{ item.id }}", "/v2/companies/a%20b%2Fc"),
        ("/v2/{{ x }}/{{ flag }}/{{ off }}", "/v2/21/true/false"),
        ("/u/{{ 'Zoë?#&=+~._-' }}", "/u/Zo%C3%AB%3F%23%26%3D%2B~._-"),
        ("/files/{{ item.path | raw }}", "/files/dir/file name.txt"),
        ("{{ item.id }}", "a%20b%2Fc"),
        ("{{ x }}", "21"),
        ("/o/{{ obj.é }}", "/o/%5B1%2Cnull%5D"),
    ],
)
def test_path_values_are_single_encoded_segments(source: str, expected: str) -> None:
    assert render(source, "path") == expected


def test_null_in_path_is_an_error() -> None:
    with pytest.raises(RenderError, match="null value in path"):
        render("/v2/{{ nothing }}", "path")
    with pytest.raises(RenderError, match="null value in path"):
        render("/v2/{{ nothing | raw }}", "path")


def test_path_with_autoescape_is_refused() -> None:
    with pytest.raises(ValueError):
        compile_template("/{{ x }}", "path", autoescape=True)


# --- autoescape (body_file .xml/.html) -----------------------------------------------------


def test_autoescape_escapes_values_but_not_xml_escape_output() -> None:
    template = compile_template("<n a='{{ name }}'>{{ name | xml_escape }}</n>", "text", True)
    out = template.render(SCOPE)
    assert out == ("<n a='Zoë &lt;b&gt; &amp; &#39;co&#39;'>Zoë &lt;b&gt; &amp; &apos;co&apos;</n>")
    plain = compile_template("<n>{{ name }}</n>", "text").render(SCOPE)
    assert plain == "<n>Zoë <b> & 'co'</n>"


# --- filters and globals -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("{{ obj | tojson }}", '{"b":1,"a":"<x>","é":[1,null]}'),
        ("{{ name | tojson }}", "\"Zoë <b> & 'co'\""),
        ("{{ 'user:pass' | b64encode }}", "dXNlcjpwYXNz"),
        ("{{ 'dXNlcjpwYXNz' | b64decode }}", "user:pass"),
        ("{{ 'Zoë' | b64encode | b64decode }}", "Zoë"),
        ("{{ 'a/b c&d' | urlencode }}", "a%2Fb%20c%26d"),
        (
            "{{ {'q': 'x y', 'n': [1, 2], 'skip': none, 'b': true} | urlencode }}",
            "q=x%20y&n=1&n=2&b=true",
        ),
        (
            "{{ 'abc' | sha256 }}",
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        ),
        (
            "{{ 'what do ya want for nothing?' | hmac_sha256('Jefe') }}",
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
        ),
        ("{{ name | xml_escape }}", "Zoë &lt;b&gt; &amp; &apos;co&apos;"),
        ("{{ '2024-05-01T12:00:00Z' | to_epoch }}", 1714564800),
        ("{{ '2024-05-01T14:00:00+02:00' | to_epoch }}", 1714564800),
        ("{{ '2024-05-01T12:00:00' | to_epoch }}", 1714564800),
        ("{{ '2024-05-01T12:00:00.999Z' | to_epoch }}", 1714564800),
        ("{{ 1714564800.7 | to_epoch }}", 1714564800),
        ("{{ 1714564800 | format_datetime('%Y-%m-%d %H:%M') }}", "2024-05-01 12:00"),
        ("{{ '2024-05-01T14:00:00+02:00' | format_datetime('%H:%M') }}", "12:00"),
        ("{{ '2024-05-01T12:00:00.5Z' | format_datetime }}", "2024-05-01T12:00:00Z"),
    ],
)
def test_filters(source: str, expected: Any) -> None:
    assert render(source) == expected


@pytest.mark.parametrize(
    "source",
    [
        "{{ 'not a date' | to_epoch }}",
        "{{ true | to_epoch }}",
        "{{ 'nope' | format_datetime('%Y') }}",
        "{{ '%%%' | b64decode }}",
    ],
)
def test_filter_errors_are_render_errors(source: str) -> None:
    with pytest.raises(RenderError):
        render(source)


def test_now_is_iso_utc_with_z_to_the_second() -> None:
    before = int(time.time())
    value = render("{{ now() }}")
    after = int(time.time())
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", value)
    parsed = datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert before <= parsed.timestamp() <= after
    assert render("{{ now() | to_epoch }}") >= before


def test_uuid4_is_new_on_every_render() -> None:
    template = compile_template("{{ uuid4() }}")
    first, second = template.render({}), template.render({})
    assert re.fullmatch(
        r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", first
    )
    assert first != second


# --- the sandbox ---------------------------------------------------------------------------

ESCAPES = [
    "{{ ''.__class__ }}",
    "{{ x.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    # CVE-2024-56326: a stored reference to str.format, called later.
    "{% set f = '{0.__class__.__mro__}'.format %}{{ f(1) }}",
    "{{ '{0.__class__}'.format(x) }}",
    "{{ ''.format.__self__ }}",
    "{{ '{0.__init__.__globals__}'.format_map(obj) }}",
    # CVE-2025-27516: |attr('format') used to bypass the format check.
    "{% set f = '{0.__class__.__mro__}' | attr('format') %}{{ f(1) }}",
    "{{ ('{0.__class__}' | attr('format'))(x) }}",
    "{{ x | attr('__class__') }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ lipsum.__globals__['os'] }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ range.__self__ }}",
    # CVE-2024-56201 needs a crafted template *name*; templates here have none, and the
    # same payload in the source is only text.
    "{{ self.__init__.__globals__ }}",
    # The immutable sandbox forbids mutating the scope.
    "{{ log.append(1) }}",
    "{% set _ = log.append(1) %}",
    "{{ obj.update({'pwned': 1}) }}",
    "{{ obj.pop('a') }}",
    "{{ range(10 ** 9) | list }}",
]


@pytest.mark.parametrize("source", ESCAPES)
@pytest.mark.parametrize("mode", ["value", "text"])
def test_sandbox_escapes_raise_render_error_and_run_nothing(source: str, mode: Any) -> None:
    scope = {"x": 1, "log": [], "obj": {"a": 1}}
    with pytest.raises(RenderError) as info:
        compile_template(source, mode).render(scope)
    assert "template error in" in info.value.message
    assert scope == {"x": 1, "log": [], "obj": {"a": 1}}
    # Nothing of Python's internals was rendered into the message.
    assert "<class" not in info.value.message
    assert "subclasses" not in info.value.message.split(": ", 1)[1]


def test_cve_2024_56201_payload_in_source_is_plain_text() -> None:
    payload = '{{ \'\\x27 + __import__("os").system("echo pwned") + \\x27\' }}'
    assert render(payload) == '\' + __import__("os").system("echo pwned") + \''


# --- structures ----------------------------------------------------------------------------


def test_compile_value_renders_the_structure() -> None:
    value = {
        "id": "{{ item.n }}",
        "ref": "ref-{{ item.ref }}",
        "fixed": "text",
        "n": 3,
        "flags": [True, "{{ flag }}", None],
        "nested": {"token": "{{ steps.login.vars.token }}", "list": ["a", "b"]},
    }
    compiled = compile_value(value)
    assert not compiled.is_constant
    assert compiled.names == {"item", "flag", "steps"}
    assert compiled.step_refs == {"login"}
    out = compiled.render(SCOPE)
    assert out == {
        "id": 7,
        "ref": "ref-R-1",
        "fixed": "text",
        "n": 3,
        "flags": [True, True, None],
        "nested": {"token": "t", "list": ["a", "b"]},
    }
    assert list(out) == list(value)
    # The constant sub-list is shared, not copied.
    assert out["nested"]["list"] is value["nested"]["list"]  # type: ignore[index]


def test_constant_structure_is_returned_itself() -> None:
    value = {"a": [1, "x", {"b": None}], "c": True}
    compiled = compile_value(value)
    assert isinstance(compiled, CompiledValue)
    assert compiled.is_constant
    assert compiled.render({}) is value
    assert compile_value(5).render({}) == 5
    assert compile_value(None).render({}) is None


def test_compile_value_modes_and_errors() -> None:
    assert compile_value("{{ x }}", "text").render(SCOPE) == "21"
    assert compile_value(["/a/{{ item.id }}"], "path").render(SCOPE) == ["/a/a%20b%2Fc"]
    with pytest.raises(ExpressionError):
        compile_value({"a": ["{{ x }"]})
    with pytest.raises(RenderError, match="'nope' is undefined"):
        compile_value({"a": ["{{ nope }}"]}).render(SCOPE)


def test_raw_path_is_a_str() -> None:
    assert isinstance(RawPath("a"), str)


# --- speed ---------------------------------------------------------------------------------


def test_rendering_is_cheap() -> None:
    expr = compile_template("{{ item.n }}")
    text = compile_template("/v2/companies/{{ item.id }}", "path")
    const = compile_template("/v2/contacts")
    scope = dict(SCOPE)
    rounds = 2000
    start = time.perf_counter()
    for _ in range(rounds):
        expr.render(scope)
        text.render(scope)
        const.render(scope)
    per_round = (time.perf_counter() - start) / rounds
    # Generous bound (shared CI machines); typical is ~10 µs.
    assert per_round < 200e-6


def test_non_string_source_is_an_expression_error() -> None:
    with pytest.raises(ExpressionError):
        compile_template({"a": 1})  # type: ignore[arg-type]


# --- the plain lookup fast path ------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "{{ item }}",
        "{{ item.id }}",
        "{{ item['ref'] }}",
        "{{ body.items[0] }}",
        "{{ body.items[-1] }}",
        "{{ body['items'][1] }}",
        "{{ steps.login.records[0].id }}",
        "{{ obj.é }}",
        "{{ zip }}",
    ],
)
def test_plain_lookups_equal_the_full_jinja_path(source: str) -> None:
    # A conditional is not a plain lookup, so it takes the full Jinja path.
    full = "{{ (" + source.strip("{} ") + ") if true else none }}"
    value = render(source)
    assert value == render(full)
    assert type(value) is type(render(full))


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("{{ item.missing }}", "'dict object' has no attribute 'missing'"),
        ("{{ body.items[5] }}", "has no element 5"),
        ("{{ zip.x }}", "'str object' has no attribute 'x'"),
        ("{{ now }}", "is not data"),
        ("{{ nope.a }}", "'nope' is undefined"),
    ],
)
def test_plain_lookup_misses_take_the_full_path(source: str, message: str) -> None:
    with pytest.raises(RenderError, match=message):
        render(source)


def test_plain_lookup_of_non_dict_mapping_and_string_methods() -> None:
    from collections import OrderedDict

    scope = {"m": OrderedDict(items=[1]), "s": "abc"}
    assert render("{{ m.items }}", scope=scope) == [1]
    assert render("{{ s.upper() }}", scope=scope) == "ABC"
