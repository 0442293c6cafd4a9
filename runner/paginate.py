"""Pagination strategies: where the page token goes in a request, and when the pages end."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urljoin

from .errors import RunError
from .expressions import truthy
from .model import PaginateSpec

_LINK_PART = re.compile(r"<([^>]*)>\s*((?:;\s*[^;,]+)*)")
_REL = re.compile(r"""rel\s*=\s*(?:"([^"]*)"|([^\s;,]+))""", re.IGNORECASE)


def next_link(link_header: str | None) -> str | None:
    """The `rel="next"` target of an RFC 8288 Link header (rel may list several relations)."""
    if not link_header:
        return None
    for match in _LINK_PART.finditer(link_header):
        params = match.group(2) or ""
        for rel in _REL.finditer(params):
            relations = (rel.group(1) or rel.group(2) or "").lower().split()
            if "next" in relations:
                return match.group(1).strip()
    return None


def as_number(value: Any) -> float | None:
    """A total read from JSON or from text (XML gives strings): a number, or None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


class Pagination:
    """The state of one pagination: one step's pages for one visit (and one item)."""

    def __init__(self, spec: PaginateSpec | None) -> None:
        self.spec = spec
        self.pages = 0
        self.number = spec.start if spec and spec.type == "page_number" else 1
        self.offset = 0
        self.records = 0  # records the pages held so far, before `filter`
        self.cursor: Any = None
        self.next_url: str | None = None  # next_url and link_header: the URL to send as given
        self.cut_short = False  # max_pages stopped it with pages left
        self.repeated_page = False  # the server sent the same records again
        self._seen_tokens: set[str] = set()
        self._previous_records: Any = None

    def scope(self) -> dict[str, Any]:
        return {"number": self.number, "offset": self.offset, "cursor": self.cursor}

    def tokens(self) -> list[tuple[str, Any]]:
        """The (param, value) pairs to place in this page's request, at `spec.location`."""
        spec = self.spec
        if spec is None or spec.location == "none":
            return []
        if spec.type == "page_number":
            out: list[tuple[str, Any]] = [(spec.param, self.number)]
            if spec.size_param and spec.size is not None:
                out.append((spec.size_param, spec.size))
            return out
        if spec.type == "offset":
            out = [(spec.param, self.offset)]
            if spec.limit_param and spec.limit is not None:
                out.append((spec.limit_param, spec.limit))
            return out
        if spec.type == "cursor" and self.cursor not in (None, ""):
            return [(spec.param, self.cursor)]
        return []

    def repeats(self, records: Any) -> bool:
        """True if this page holds the same records as the previous one (checked before mapping,
        so that a server repeating its last page forever adds no duplicates)."""
        if self.spec is None or not records:
            return False
        if records == self._previous_records:
            self.repeated_page = True
            return True
        self._previous_records = records
        return False

    def advance(self, scope: Mapping[str, Any], count: int) -> bool:
        """After a page was mapped: True if another page is to be fetched.

        `count` is how many records the page held, before `filter`.
        """
        spec = self.spec
        if spec is None:
            return False
        self.pages += 1
        self.records += count
        if count == 0:
            return False
        has_next = self._find_next(spec, scope, count)
        if has_next and spec.max_pages is not None and self.pages >= spec.max_pages:
            self.cut_short = True
            return False
        return has_next

    def _find_next(self, spec: PaginateSpec, scope: Mapping[str, Any], count: int) -> bool:
        if spec.type == "page_number":
            if spec.total_pages is not None:
                total = as_number(spec.total_pages.search(scope))
                if total is not None and self.number - spec.start + 1 >= total:
                    return False
            if spec.total is not None:
                # `total` counts records (an X-Total-Count header): stop once all came.
                total = as_number(spec.total.search(scope))
                if total is not None and self.records >= total:
                    return False
            self.number += 1
            return True
        if spec.type == "offset":
            self.offset += count
            if spec.total is not None:
                total = as_number(spec.total.search(scope))
                if total is not None and self.offset >= total:
                    return False
            self.number += 1
            return True
        if spec.type == "cursor":
            assert spec.cursor is not None
            cursor = spec.cursor.search(scope)
            if not truthy(cursor) or cursor == "":
                return False
            self._check_loop(str(cursor), "cursor")
            self.cursor = cursor
            self.number += 1
            return True
        if spec.type == "next_url":
            assert spec.next_url is not None
            target = spec.next_url.search(scope)
        else:  # link_header
            headers = scope.get("headers") or {}
            target = next_link(headers.get("link"))
        if not isinstance(target, str) or not target.strip():
            return False
        absolute = urljoin(str(scope.get("url") or ""), target.strip())
        self._check_loop(absolute, "next URL")
        self.next_url = absolute
        self.number += 1
        return True

    def _check_loop(self, token: str, what: str) -> None:
        if token in self._seen_tokens:
            raise RunError(f"pagination loop: the same {what} {token!r} came twice", kind="http")
        self._seen_tokens.add(token)
