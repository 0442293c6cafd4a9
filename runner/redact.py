"""Secret values known to a run, and their replacement by `***` in anything shown to a user."""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
# Values shorter than this are not masked: masking "a" or "1" would garble every message.
MIN_SECRET_LENGTH = 3


class Redactor:
    """Holds every secret value of a run; `redact` masks them in text and in data."""

    def __init__(self) -> None:
        self._values: set[str] = set()
        self._pattern: re.Pattern[str] | None = None

    def add(self, value: Any) -> None:
        if not isinstance(value, str) or len(value) < MIN_SECRET_LENGTH or value in self._values:
            return
        self._values.add(value)
        # Longest first, so that a secret containing another is masked whole.
        ordered = sorted(self._values, key=len, reverse=True)
        self._pattern = re.compile("|".join(re.escape(v) for v in ordered))

    def redact(self, text: str) -> str:
        if self._pattern is None or not text:
            return text
        return self._pattern.sub(MASK, text)

    def redact_data(self, data: Any) -> Any:
        """A copy of JSON-like data with every secret masked in its strings."""
        if self._pattern is None:
            return data
        if isinstance(data, str):
            return self.redact(data)
        if isinstance(data, dict):
            return {k: self.redact_data(v) for k, v in data.items()}
        if isinstance(data, list):
            return [self.redact_data(v) for v in data]
        return data

    def __bool__(self) -> bool:
        return bool(self._values)
