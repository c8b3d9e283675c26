"""Keep the C heap from holding freed memory during a disk merge (glibc).

A disk merge allocates and frees chunk-sized buffers and thousands of cache-sized block
temporaries from two worker threads. glibc keeps freed heap memory for reuse, and this mix
fragments it: resident memory grew to 2-6 GB on merges holding ~0.5 GB, nearly all of it
free heap (measured with mallinfo2: model_stock and sce on a 7B-shaped model).
malloc_trim(0) returns the free pages inside the heaps, not only at their tops. Trimming
after every chunk held those merges at 0.6 GB but cost DELLA ~10% (the next chunk
page-faults its buffers back in), so it runs only once the free heap passes FREE_LIMIT.
Elsewhere than glibc this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache
from typing import Any

FREE_LIMIT = 512 << 20  # free heap bytes tolerated before a trim


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]  # fmt: skip


@cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = libc.malloc_trim if libc is not None else None
    except (OSError, AttributeError):  # not glibc
        return None
    if trim is None:
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    info = getattr(libc, "mallinfo2", None)  # glibc >= 2.33
    if info is not None:
        info.restype = _MallInfo2
    return libc


def release_free_memory() -> None:
    """malloc_trim(0) once the heaps hold more than FREE_LIMIT of free memory (or every
    call where glibc cannot say how much: before 2.33); nothing elsewhere than glibc."""
    libc = _libc()
    if libc is None:
        return
    info = getattr(libc, "mallinfo2", None)
    if info is None or info().fordblks > FREE_LIMIT:
        libc.malloc_trim(0)
