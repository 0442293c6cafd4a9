"""The project's JSON: `json_loads` for what comes in (responses, value files), and
`json_dumps_line` / `json_dumps_line_bytes` for what goes out (JSONL records, the manifest).
Fast with orjson when it is installed, the same bytes without it."""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable
from typing import Any

__all__ = ["json_dumps_line", "json_dumps_line_bytes", "json_lines_loader", "json_loads"]

_UTF8 = "utf-8"


def _import_orjson() -> Any:
    try:
        return importlib.import_module("orjson")
    except ImportError:  # pragma: no cover - orjson is an optional dependency
        return None


_ORJSON: Any = _import_orjson()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _loads_stdlib(data: bytes | str) -> Any:
    try:
        return json.loads(data, parse_constant=_reject_constant)
    except RecursionError as exc:
        raise ValueError("JSON nested too deeply") from exc


# orjson silently turns an integer beyond 64 bits into a float; a run of 19 digits anywhere sends
# the document to the stdlib parser, which keeps it exact. Translating is far cheaper than a regex.
_DIGIT_MASK = bytes(0x30 if 0x30 <= i <= 0x39 else 0x20 for i in range(256))
_LONG_DIGIT_RUN = b"0" * 19


def _orjson_safe(buf: bytes) -> bool:
    return _LONG_DIGIT_RUN not in buf.translate(_DIGIT_MASK)


def _loads_fast(data: bytes | str) -> Any:
    try:
        buf = data.encode(_UTF8) if isinstance(data, str) else data
    except UnicodeEncodeError:  # lone surrogates: only the stdlib accepts them
        return _loads_stdlib(data)
    if _orjson_safe(buf):
        try:
            return _ORJSON.loads(buf)
        except ValueError:
            pass  # the stdlib gives the familiar message, or accepts what orjson refuses
    return _loads_stdlib(data)


# Parse JSON (NaN and Infinity refused); every failure is a ValueError.
json_loads: Callable[[bytes | str], Any] = _loads_fast if _ORJSON is not None else _loads_stdlib


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if obj - obj == 0.0 else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _dumps_stdlib(obj: Any) -> str:
    try:
        return _ENCODER.encode(obj)
    except ValueError:
        # NaN and infinities are not JSON: written as null, as orjson writes them.
        return _ENCODER.encode(_finite(obj))


# orjson and the stdlib differ only for floats below 1e-4: orjson writes `0.00001` and `1.5e-7`
# where Python writes `1e-05` and `1.5e-07` (checked over every exponent). Such output, and
# anything orjson refuses (big ints, non-str keys, surrogates), goes to the stdlib instead.
_ORJSON_FLOAT_DIFFERS = re.compile(rb"\de-\d(?:[,\]}]|$)|(?:^|[:,\[])-?0\.0000")


# Types the stdlib cannot write go to it too, so that both paths fail alike.
_ORJSON_OPTIONS = (
    _ORJSON.OPT_PASSTHROUGH_DATETIME | _ORJSON.OPT_PASSTHROUGH_DATACLASS
    if _ORJSON is not None
    else 0
)


def _dumps_fast(obj: Any) -> str:
    try:
        out: bytes = _ORJSON.dumps(obj, option=_ORJSON_OPTIONS)
    except TypeError:
        return _dumps_stdlib(obj)
    if (b"e-" in out or b"0.0000" in out) and _ORJSON_FLOAT_DIFFERS.search(out):
        return _dumps_stdlib(obj)
    return out.decode(_UTF8)


def json_dumps_line(obj: Any) -> str:
    """Compact JSON for one JSONL line (no newline): key order kept, non-ASCII unescaped.

    The output is the same byte for byte with or without orjson; NaN and infinities are null.
    """
    return _dumps_fast(obj) if _ORJSON is not None else _dumps_stdlib(obj)


_LINE_OPTIONS = _ORJSON_OPTIONS | (_ORJSON.OPT_APPEND_NEWLINE if _ORJSON is not None else 0)


def _dumps_line_bytes_fast(obj: Any) -> bytes:
    try:
        out: bytes = _ORJSON.dumps(obj, option=_LINE_OPTIONS)
    except TypeError:
        return _dumps_line_bytes_stdlib(obj)
    if (b"e-" in out or b"0.0000" in out) and _ORJSON_FLOAT_DIFFERS.search(out[:-1]):
        return _dumps_line_bytes_stdlib(obj)
    return out


def _dumps_line_bytes_stdlib(obj: Any) -> bytes:
    return (_dumps_stdlib(obj) + "\n").encode(_UTF8)


# `json_dumps_line(obj)` and a newline, as UTF-8: a JSONL line ready to write.
# With orjson the bytes come straight from it (no str round trip). A lone surrogate, which
# UTF-8 cannot hold, raises UnicodeEncodeError (orjson refuses it with TypeError first, and
# the stdlib path then fails to encode), as encoding `json_dumps_line(obj)` would.
json_dumps_line_bytes: Callable[[Any], bytes] = (
    _dumps_line_bytes_fast if _ORJSON is not None else _dumps_line_bytes_stdlib
)


def _loads_line_fast(line: bytes | str) -> Any:
    try:
        return _ORJSON.loads(line)
    except ValueError:
        return _loads_stdlib(line)


def json_lines_loader(whole: bytes, *, utf8: bool) -> Callable[[bytes | str], Any]:
    """The loader for each line of `whole` (NDJSON): orjson's own when the whole body is
    UTF-8 and safe for it, so that the check is made once for the body, not once per line."""
    if _ORJSON is not None and utf8 and _orjson_safe(whole):
        return _loads_line_fast
    return json_loads
