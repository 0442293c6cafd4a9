"""Unit tests of the small modules: the public surface, errors, redaction, secrets, the model."""

from __future__ import annotations

from pathlib import Path

import pytest

import runner
from runner.compiler import build_flow
from runner.errors import FlowError, Problem, RunError, UnavailableError, format_path
from runner.loader import load_text
from runner.model import merge_retry, parse_statuses
from runner.redact import Redactor
from runner.secrets import Secrets, read_secret


def test_public_surface_is_pinned() -> None:
    assert sorted(runner.__all__) == sorted(
        [
            "Flow",
            "FlowError",
            "Problem",
            "RunError",
            "RunResult",
            "RunnerError",
            "UnavailableError",
            "UsageError",
            "__version__",
            "load_flow",
            "run_flow",
            "run_flow_async",
        ]
    )
    for name in runner.__all__:
        assert hasattr(runner, name)


def test_format_path() -> None:
    assert format_path(("steps", 0, "request", "method")) == "steps[0].request.method"
    assert format_path(()) == ""


def test_problem_sorts_and_formats() -> None:
    a = Problem("f.yaml", 3, 7, "steps[0].id", "bad")
    b = Problem("f.yaml", 1, 2, "", "worse", "warning")
    assert sorted([a, b]) == [b, a]
    assert str(a) == "f.yaml:3:7: steps[0].id: bad"
    assert str(b) == "f.yaml:1:2: warning: worse"
    assert str(FlowError([a, b])) == "f.yaml:1:2: warning: worse\nf.yaml:3:7: steps[0].id: bad"


def test_run_error_names_its_place() -> None:
    error = RunError(
        "unexpected status",
        method="GET",
        url="https://crm.example/v2/companies/42",
        status=500,
        reason="Internal Server Error",
        body='{"error": "database unavailable"}' + "x" * 1000,
        attempts=4,
        elapsed_s=7.9,
    ).in_context(step="companies", item_index=17)
    text = str(error)
    assert text.splitlines()[0] == (
        "run failed in step 'companies' (item 17): "
        "GET https://crm.example/v2/companies/42 -> 500 Internal Server Error"
    )
    assert "after 4 attempts over 7.9 s" in text
    assert error.body is not None and len(error.body) == 500
    # The innermost context wins: an outer step does not overwrite the inner one.
    assert error.in_context(step="outer").step == "companies"
    assert UnavailableError("x").exit_code == 69 and RunError("x").exit_code == 1


def test_redactor_masks_longest_first_and_in_data() -> None:
    redactor = Redactor()
    redactor.add("abc")
    redactor.add("abcdef")
    redactor.add("x")  # too short to mask without garbling every message
    assert redactor.redact("token=abcdef and abc, x") == "token=*** and ***, x"
    assert redactor.redact_data({"a": ["abcdef", 1], "b": None}) == {"a": ["***", 1], "b": None}


def test_secret_from_env_wins_over_file(tmp_path: Path) -> None:
    (tmp_path / "TOKEN").write_text("from-file\n")
    (tmp_path / "ONLY_FILE").write_text("file-value\n\n")
    environ = {"TOKEN": "from-env", "RUNNER_SECRETS_DIR": str(tmp_path)}
    assert read_secret("TOKEN", environ) == "from-env"
    # One trailing newline is removed, not more.
    assert read_secret("ONLY_FILE", environ) == "file-value\n"
    assert read_secret("MISSING", environ) is None


def test_secret_name_with_slash_is_refused(tmp_path: Path) -> None:
    with pytest.raises(runner.UsageError, match="may not contain '/'"):
        read_secret("../etc/passwd", {"RUNNER_SECRETS_DIR": str(tmp_path)})


def test_missing_secrets_are_reported_together() -> None:
    redactor = Redactor()
    secrets = Secrets({"A": "value-a"}, redactor)
    with pytest.raises(runner.UsageError, match="missing secrets B, C"):
        secrets.resolve(["A", "B", "C"])
    assert redactor.redact("value-a") == "***"


def test_masked_secrets_need_not_exist() -> None:
    secrets = Secrets({}, Redactor(), masked=True)
    secrets.resolve(["NOPE"])
    assert secrets["NOPE"] == "***"


@pytest.mark.parametrize(
    ("raw", "matches", "misses"),
    [
        (404, [404], [403, None]),
        ("4xx", [400, 499], [500]),
        ([401, 403], [401, 403], [402]),
        ("500-599", [500, 503, 599], [499]),
        ("error", [None], [200]),
    ],
)
def test_status_patterns(raw: object, matches: list[int | None], misses: list[int | None]) -> None:
    patterns = parse_statuses(raw)
    for status in matches:
        assert any(p.matches(status) for p in patterns)
    for status in misses:
        assert not any(p.matches(status) for p in patterns)


def test_step_retry_merges_over_the_service() -> None:
    doc = load_text(
        """\
version: 1
services:
  api:
    base_url: https://api.example.com
    retry: {max_attempts: 6, initial_delay: 2}
steps:
  - id: a
    request: {service: api, path: /a}
    retry: {initial_delay: 0.1}
    records: body
  - id: b
    request: {service: api, path: "/b/{{ steps.a.records[0].id }}"}
""",
        "flow.yaml",
    )
    flow = build_flow(doc)
    a, b = flow.steps
    assert a.retry == merge_retry(flow.services["api"].retry, {"initial_delay": 0.1})
    assert (a.retry.max_attempts, a.retry.initial_delay) == (6, 0.1)
    # Only steps that some expression reads keep their records in memory.
    assert a.referenced and not b.referenced


def test_model_collects_secret_names() -> None:
    doc = load_text(
        """\
version: 1
services:
  api:
    base_url: https://api.example.com
    auth: {type: bearer, token: "{{ secrets.API_TOKEN }}"}
steps:
  - id: a
    request: {service: api, path: /a, headers: {X-Key: "{{ secrets['other-key'] }}"}}
""",
        "flow.yaml",
    )
    assert build_flow(doc).secrets == {"API_TOKEN", "other-key"}


def test_event_loop_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from runner.errors import UsageError
    from runner.run import loop_factory

    assert loop_factory({"RUNNER_EVENT_LOOP": "asyncio"}) is None
    with pytest.raises(UsageError, match="expected one of auto, uvloop, asyncio"):
        loop_factory({"RUNNER_EVENT_LOOP": "fast"})
    # Without uvloop: auto falls back to asyncio's loop, an explicit uvloop is refused.
    monkeypatch.setitem(sys.modules, "uvloop", None)
    assert loop_factory({}) is None
    with pytest.raises(UsageError, match="uvloop is not installed"):
        loop_factory({"RUNNER_EVENT_LOOP": "uvloop"})


def test_event_loop_auto_is_uvloop_when_installed() -> None:
    from runner.run import loop_factory

    uvloop = pytest.importorskip("uvloop")
    assert loop_factory({}) is uvloop.new_event_loop
    assert loop_factory({"RUNNER_EVENT_LOOP": "uvloop"}) is uvloop.new_event_loop
