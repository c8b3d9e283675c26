"""Disk merges in parallel across tensors, not within ops.

A merge is thousands of torch ops of a few milliseconds each. Parallelizing each op (torch's
intra-op threads) puts a barrier after every one of them; on a busy machine a preempted
worker thread stalls the whole process at each barrier (measured on a loaded 2-core box:
3-4x slower than one thread). Instead, each worker merges whole tensors on one thread
(torch ops release the GIL).

Results come back as they finish, not in input order: the writer lays every tensor out up
front, so order does not matter for the bytes, and waiting for the oldest tensor left a core
idle whenever a small tensor finished behind a large one (measured on a 7B TIES merge: one
core busy for a third of the run).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def slot_map(fn: Callable[[T, int], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """fn(item, slot) for every item, yielded as each finishes, at most `workers` in flight.

    Two items in flight never share a slot (0 <= slot < workers), and a slot takes its next
    item only after its last result was consumed, so fn may return a per-slot reused buffer.
    """
    if workers <= 1:
        for item in items:
            yield fn(item, 0)
        return
    from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

    todo = iter(items)
    end = object()
    with ThreadPoolExecutor(workers, thread_name_prefix="evomerge-merge") as pool:
        running: dict[Future, int] = {}

        def start(slot: int) -> None:
            item = next(todo, end)
            if item is not end:
                running[pool.submit(fn, item, slot)] = slot  # type: ignore[arg-type]

        try:
            for slot in range(workers):
                start(slot)
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for f in done:
                    slot = running.pop(f)
                    yield f.result()
                    start(slot)
        finally:
            for f in running:
                f.cancel()
