"""common/heap.py: a disk merge hands the C heap's free pages back once they pass a limit
(glibc fragmented to several GB of free heap on 7B-shaped merges holding ~0.5 GB)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import sys
    import evomerge.common.heap as heap
    heap.FREE_LIMIT = int(sys.argv[1])

    def rss():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) << 10 for line in f if line.startswith("RssAnon"))

    # 100 KB blocks (under glibc's mmap threshold: heap), every other one kept: ~100 MB of
    # free heap that no free() returns, as between a merge's chunks
    blocks = [bytearray(100_000) for _ in range(2_000)]
    kept = blocks[::2]
    del blocks
    before = rss()
    heap.release_free_memory()
    print(before - rss())
""")


def _released(limit: int) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(limit)], capture_output=True,
                         text=True, check=True)  # fmt: skip
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_free_heap_past_the_limit_goes_back_to_the_os():
    from evomerge.common.heap import _libc

    if _libc() is None:
        pytest.skip("not glibc")
    assert _released(50 << 20) > 60e6  # ~100 MB of free heap returned
    assert abs(_released(1 << 30)) < 10e6  # under the limit: kept (no trim's page faults)
