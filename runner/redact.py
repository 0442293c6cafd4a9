"""Secret values known to a run, and their replacement by `***` in anything shown to a user.

A secret is masked in every form it takes on the wire: as is, percent-encoded (whatever set
of characters the encoder left alone, either case of hex, `+` for a space), JSON-escaped
(`\\/`, `\\"`, `\\uXXXX`), in base64 (standard and URL-safe alphabets, each of those forms
again), and inside a `Basic` credential.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

MASK = "***"
# Values shorter than this are not masked: masking "a" or "1" would garble every message.
MIN_SECRET_LENGTH = 3
# JSON's two-character escapes, as regular expressions.
_SHORT_JSON_ESCAPES = {'"': '\\\\"', "\\": "\\\\\\\\", "/": "\\\\/", "\b": "\\\\b",
                       "\f": "\\\\f", "\n": "\\\\n", "\r": "\\\\r", "\t": "\\\\t"}  # fmt: skip
_BASIC = re.compile(r"(Basic\s+)([A-Za-z0-9+/_-]{4,}={0,2})")


def _hex_any_case(data: bytes) -> str:
    """`%2b` or `%2B` for each byte."""
    out = []
    for byte in data:
        digits = f"{byte:02X}"
        out.append("%" + "".join(f"[{d}{d.lower()}]" if d.isalpha() else d for d in digits))
    return "".join(out)


def _unicode_escape(char: str) -> str:
    """`\\u002f` in either case of hex; a surrogate pair for a character above U+FFFF."""
    code = ord(char)
    if code > 0xFFFF:
        code -= 0x10000
        units = [0xD800 + (code >> 10), 0xDC00 + (code & 0x3FF)]
    else:
        units = [code]
    parts = []
    for unit in units:
        digits = f"{unit:04X}"
        parts.append("\\\\u" + "".join(f"[{d}{d.lower()}]" if d.isalpha() else d for d in digits))
    return "".join(parts)


def _char_pattern(char: str) -> str:
    """Every way one character of a secret can be written in a URL, a form or JSON."""
    options = [re.escape(char), _hex_any_case(char.encode("utf-8")), _unicode_escape(char)]
    if char == " ":
        options.append(r"\+")
    short = _SHORT_JSON_ESCAPES.get(char)
    if short is not None:
        options.append(short)
    return "(?:" + "|".join(options) + ")"


def wire_pattern(value: str) -> str:
    """A regular expression matching `value` in any of its encodings on the wire."""
    return "".join(_char_pattern(c) for c in value)


def _base64_forms(value: str) -> list[str]:
    """The secret in base64, standard and URL-safe, without padding (the padding is no
    secret, and a padded form contains the unpadded one)."""
    raw = value.encode("utf-8")
    standard = base64.b64encode(raw).decode("ascii").rstrip("=")
    urlsafe = base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")
    return [standard] if standard == urlsafe else [standard, urlsafe]


class Redactor:
    """Holds every secret value of a run; masks them in text (`redact`), in JSON-like data
    (`redact_data`) and in a body before it is cut to an excerpt (`excerpt`)."""

    def __init__(self) -> None:
        self._values: set[str] = set()
        self._forms: dict[str, str] = {}  # a form (the value or its base64) -> its pattern
        self._pattern: re.Pattern[str] | None = None

    def add(self, value: Any) -> None:
        """A secret learnt now: masked from the next call on."""
        if not isinstance(value, str) or len(value) < MIN_SECRET_LENGTH or value in self._values:
            return
        self._values.add(value)
        for form in (value, *_base64_forms(value)):
            if len(form) >= MIN_SECRET_LENGTH and form not in self._forms:
                self._forms[form] = wire_pattern(form)
        # Longest first, so that a secret containing another is masked whole.
        ordered = sorted(self._forms, key=len, reverse=True)
        self._pattern = re.compile("|".join(self._forms[f] for f in ordered))

    def redact(self, text: str) -> str:
        """The text with every secret masked, in every encoding."""
        if self._pattern is None or not text:
            return text
        text = self._pattern.sub(MASK, text)
        if "Basic" in text:
            # base64 of `user:secret`: the secret's own base64 does not appear in it.
            text = _BASIC.sub(self._mask_basic, text)
        return text

    def _mask_basic(self, match: re.Match[str]) -> str:
        encoded = match.group(2).rstrip("=")
        try:
            # altchars: the URL-safe alphabet too; the standard one still decodes.
            decoded = base64.b64decode(encoded + "=" * (-len(encoded) % 4), altchars=b"-_")
        except (binascii.Error, ValueError):
            return match.group(0)
        text = decoded.decode("utf-8", "replace")
        return match.group(1) + MASK if self.redact_plain(text) != text else match.group(0)

    def redact_plain(self, text: str) -> str:
        """`redact` without the look inside `Basic` credentials (used by that look)."""
        if self._pattern is None or not text:
            return text
        return self._pattern.sub(MASK, text)

    def redact_data(self, data: Any) -> Any:
        """A copy of JSON-like data with every secret masked in its strings and keys."""
        if self._pattern is None:
            return data
        if isinstance(data, str):
            return self.redact(data)
        if isinstance(data, dict):
            return {
                (self.redact(k) if isinstance(k, str) else k): self.redact_data(v)
                for k, v in data.items()
            }
        if isinstance(data, list | tuple):
            return [self.redact_data(v) for v in data]
        return data

    def excerpt(self, body: bytes | str | None, limit: int) -> str | None:
        """The start of a body, redacted before it is cut: a secret that straddles the cut
        is masked whole, never shown in part."""
        if body is None:
            return None
        if isinstance(body, bytes):
            # A character takes at most 4 bytes; the margin keeps a secret at the cut whole.
            body = body[: (limit + _MARGIN) * 4].decode("utf-8", "replace")
        else:
            body = body[: limit + _MARGIN]
        return self.redact(body)[:limit]

    def __bool__(self) -> bool:
        return bool(self._values)


# Characters kept past an excerpt's end before redaction: longer than any encoded secret.
_MARGIN = 16384
