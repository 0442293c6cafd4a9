"""Counts in messages: `1 record`, `2 records`."""

from __future__ import annotations


def plural(count: int, word: str, many: str | None = None) -> str:
    """The count with its noun in the right number (`many` for irregular plurals)."""
    return f"{count} {word if count == 1 else (many or word + 's')}"
