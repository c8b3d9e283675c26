"""The document-id ranges a study records (which documents chose and which tested a trial).

Stored as text ("0-63,100,128-191") in study attributes and recipe provenance: compact for
thousands of ids, and readable.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def compress_ids(ids: Iterable[Any]) -> str | list[Any]:
    """Sorted integer ids as ranges ("0-63,100,128-191"); other ids are returned as a list."""
    ids = list(ids)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        return ids
    nums = sorted(set(ids))
    parts: list[str] = []
    start = prev = None
    for n in [*nums, None]:
        if n is not None and prev is not None and n == prev + 1:
            prev = n
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = n
    return ",".join(parts)


def expand_ids(text: str) -> list[int]:
    """Inverse of compress_ids for the range form."""
    out: list[int] = []
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out
