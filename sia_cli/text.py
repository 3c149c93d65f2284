"""How messages and reports name a list of things: the first few, and how many are left out."""

from __future__ import annotations

from typing import Iterable


def first_few(items: Iterable[str], shown: int, separator: str = ", ") -> str:
    """`a, b, c and 4 more`: the first `shown` items, then the count of the rest (if any)."""
    items = list(items)
    text = separator.join(items[:shown])
    return text + (f" and {len(items) - shown} more" if len(items) > shown else "")
