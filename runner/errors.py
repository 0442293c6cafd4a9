"""One error hierarchy for the whole runner; each error is structured data that formats itself.

    RunnerError                      exit 1   base: the CLI catches this and nothing else
    ├── FlowError                    exit 2   invalid flow: one or more located Problems
    ├── UsageError                   exit 2   bad command line, inputs or secrets
    ├── ExpressionError              exit 2   a template or JMESPath expression that won't compile
    ├── LockedError                  exit 75  another run holds the state file
    ├── InterruptedRun               exit 130 / 143 (SIGINT / SIGTERM)
    └── RunError                     exit 1   a failed run: step, item, method, URL, status, body
        ├── RenderError                       a template or expression failed while running
        ├── DecodeError                       a body that does not decode as its format
        ├── SecurityError                     a request refused for safety (cross-origin, http://)
        ├── ExpectError                       an `expect` that did not hold
        ├── InvalidRecordError                a record that fails its stream's schema
        └── UnavailableError         exit 69  a service stayed unavailable, or --timeout was reached

Errors raised below the engine carry what they know (a URL, a status); the engine adds the
step and item with `RunError.in_context`, so that every failure names its place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 69
EXIT_LOCKED = 75
EXIT_SIGINT = 130
EXIT_SIGTERM = 143

# Every `error.kind` a summary can hold, besides the `kind` a flow's own `fail` rule names.
# docs/FORMAT.md ("Error kinds") lists the same; a test holds the docs and the code together.
ERROR_KINDS = (
    "invalid_flow",  # exit 2: the flow has problems (FlowError)
    "usage",  # exit 2: command line, inputs, environment, secrets, --services, sink
    "http",  # a status no rule accepted, a transport failure, a pagination loop
    "unavailable",  # exit 69: 408, 429, 5xx or no response after the retries
    "timeout",  # exit 69: --timeout reached, or a poll that never ended
    "expect",  # an `expect` that did not hold
    "invalid_record",  # a record its stream's schema refuses
    "decode",  # a body that does not decode as its format
    "security",  # a request refused for safety (origin, scheme, header value)
    "render",  # a template or expression that failed while running
    "limit",  # a bound of the run's own reached (max_records)
    "cursor",  # a cursor value that cannot be compared with the others
    "io",  # an output or state file that cannot be written
    "destination",  # a database destination that refused or failed
    "locked",  # exit 75: another run holds the state, the outputs or the database
    "interrupted",  # exit 130 / 143: SIGINT or SIGTERM
    "internal",  # a bug of the runner's own, or a broken installation
)

BODY_EXCERPT_CHARS = 500
# What an error keeps of a body: more than it shows, so that a secret that straddles the
# excerpt's end is still whole when the body is redacted, and masked, not cut in two.
BODY_KEEP_CHARS = BODY_EXCERPT_CHARS + 16384


def format_path(path: tuple[str | int, ...] | list[str | int]) -> str:
    """`("steps", 0, "request", "method")` -> `steps[0].request.method`."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif out:
            out += f".{part}"
        else:
            out = str(part)
    return out


def closest(word: str, choices: Sequence[str]) -> list[str]:
    """The one closest choice, if any is close enough: for "did you mean"."""
    import difflib  # only a flow with a mistake needs it

    return difflib.get_close_matches(word, list(choices), n=1)


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    """` (did you mean 'x'?)`, or nothing when no choice is close."""
    close = closest(word, choices)
    return f" (did you mean '{close[0]}'?)" if close else ""


@dataclass(frozen=True, slots=True, order=True)
class Problem:
    """One located problem in a flow file. Sorts by file, line, column.

    A problem inside a template or expression also has the `expression` and, when known,
    the `offset` in it where the problem is: the text format draws a caret under it (the
    message's second line); `json` and `github` give them as fields and the first line."""

    file: str
    line: int
    column: int
    path: str
    message: str
    severity: str = field(default="error", compare=False)  # "error" | "warning"
    expression: str | None = field(default=None, compare=False)
    offset: int | None = field(default=None, compare=False)

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}: "
        if self.path:
            where += f"{self.path}: "
        if self.severity == "warning":
            where += "warning: "
        # Continuation lines (a JMESPath caret) are indented to stay under the expression.
        first, *rest = self.message.split("\n")
        indent = "\n" + " " * len(where)
        return where + first + "".join(indent + line for line in rest)

    @property
    def summary(self) -> str:
        """The message on one line: without the caret drawing of an expression's problem."""
        return self.message.split("\n", 1)[0] if self.expression is not None else self.message

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "file": self.file,
            "line": self.line,
            "column": self.column,
            "path": self.path,
            "message": self.summary,
            "severity": self.severity,
        }
        if self.expression is not None:
            data["expression"] = self.expression
            data["offset"] = self.offset
        return data


class RunnerError(Exception):
    """Base of every error the runner raises on purpose."""

    exit_code: ClassVar[int] = EXIT_FAILED
    kind: str = "internal"  # raised as it is only when the installation is broken

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class FlowError(RunnerError):
    """An invalid flow: every problem found, sorted."""

    exit_code = EXIT_USAGE
    kind = "invalid_flow"

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = sorted(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]


class UsageError(RunnerError):
    """A bad command line, input value, inputs file or missing secret."""

    exit_code = EXIT_USAGE
    kind = "usage"


class ExpressionError(RunnerError):
    """A Jinja template or JMESPath expression that does not compile.

    Raised without a location by templates.py and expressions.py; the compile pass turns it
    into a located Problem.
    """

    exit_code = EXIT_USAGE
    kind = "invalid_flow"

    def __init__(
        self, message: str = "", *, expression: str | None = None, offset: int | None = None
    ) -> None:
        super().__init__(message)
        self.expression = expression  # the text it is about, as the message shows it
        self.offset = offset  # where in `expression`, when the parser says


class LockedError(RunnerError):
    exit_code = EXIT_LOCKED
    kind = "locked"


class InterruptedRun(RunnerError):
    kind = "interrupted"

    def __init__(self, signal_name: str) -> None:
        super().__init__(f"interrupted by {signal_name}: nothing was committed")
        self.signal_name = signal_name

    @property
    def code(self) -> int:
        return EXIT_SIGTERM if self.signal_name == "SIGTERM" else EXIT_SIGINT


class RunError(RunnerError):
    """A failed run. Every field it knows is shown; the engine adds step and item."""

    exit_code = EXIT_FAILED
    kind = "http"

    def __init__(
        self,
        message: str,
        *,
        kind: str | None = None,
        step: str | None = None,
        item_index: int | None = None,
        method: str | None = None,
        url: str | None = None,
        status: int | None = None,
        reason: str | None = None,
        body: str | None = None,
        attempts: int | None = None,
        elapsed_s: float | None = None,
    ) -> None:
        super().__init__(message)
        if kind is not None:
            self.kind = kind
        self.step = step
        self.item_index = item_index
        self.method = method
        self.url = url
        self.status = status
        self.reason = reason
        self._body = body[:BODY_KEEP_CHARS] if body is not None else None
        self.attempts = attempts
        self.elapsed_s = elapsed_s

    def in_context(self, **context: Any) -> RunError:
        """Fill in the fields not already known (the innermost context wins); returns self."""
        for name, value in context.items():
            if getattr(self, name, None) is None and value is not None:
                setattr(self, name, value)
        return self

    @property
    def body(self) -> str | None:
        """The start of the response body, as shown (BODY_EXCERPT_CHARS)."""
        return self._body[:BODY_EXCERPT_CHARS] if self._body is not None else None

    @body.setter
    def body(self, value: str | None) -> None:
        self._body = value[:BODY_KEEP_CHARS] if value is not None else None

    def redacted(self, redact: Callable[[str], str]) -> RunError:
        """Masks secrets in every field shown, the body before it is cut to its excerpt (a
        secret across the cut is masked whole); returns self."""
        self.message = redact(self.message)
        self.args = (self.message,)
        if self.url is not None:
            self.url = redact(self.url)
        if self.reason is not None:
            self.reason = redact(self.reason)
        if self._body is not None:
            self._body = redact(self._body)
        return self

    def __str__(self) -> str:
        head = "run failed"
        if self.step is not None:
            head += f" in step '{self.step}'"
            if self.item_index is not None:
                head += f" (item {self.item_index})"
        lines = []
        request = ""
        if self.method and self.url:
            request = f"{self.method} {self.url}"
        elif self.url:
            request = self.url
        if request and self.status is not None:
            request += f" -> {self.status}" + (f" {self.reason}" if self.reason else "")
        if request:
            lines.append(f"{head}: {request}")
            if self.message:
                lines.append(f"  {self.message}")
        else:
            lines.append(f"{head}: {self.message}")
        if self.body:
            lines.append(f"  body: {self.body}")
        if self.attempts is not None and self.attempts > 1:
            over = f" over {self.elapsed_s:.1f} s" if self.elapsed_s is not None else ""
            lines.append(f"  after {self.attempts} attempts{over}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "step": self.step,
            "item_index": self.item_index,
            "method": self.method,
            "url": self.url,
            "status": self.status,
            "message": self.message,
        }


class RenderError(RunError):
    kind = "render"


class DecodeError(RunError):
    kind = "decode"


class SecurityError(RunError):
    kind = "security"


class ExpectError(RunError):
    kind = "expect"


class InvalidRecordError(RunError):
    kind = "invalid_record"


class UnavailableError(RunError):
    exit_code = EXIT_UNAVAILABLE
    kind = "unavailable"
