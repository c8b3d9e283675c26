"""slot_map: tensors merged on worker slots, results taken as they finish (not in input
order, which left a core idle behind every large tensor), never two in flight on one slot."""

from __future__ import annotations

import threading
import time

import pytest

from evomerge.merge.pipeline import slot_map


def test_results_come_as_they_finish_and_slots_are_never_shared():
    lock = threading.Lock()
    busy: set[int] = set()
    clashes: list[int] = []

    def fn(item: tuple[str, float], slot: int) -> tuple[str, int]:
        with lock:
            clashes.extend([slot] if slot in busy else [])
            busy.add(slot)
        time.sleep(item[1])
        with lock:
            busy.discard(slot)
        return item[0], slot

    items = [("large", 0.6), ("small1", 0.05), ("small2", 0.05), ("small3", 0.05)]
    got = []
    for name, slot in slot_map(fn, items, 2):
        with lock:
            assert slot not in busy  # the slot's buffer is not reused until consumed
        got.append(name)
    assert got == ["small1", "small2", "small3", "large"]  # the small ones did not wait
    assert not clashes


def test_one_worker_keeps_the_order_and_errors_propagate():
    assert list(slot_map(lambda x, s: (x, s), [3, 1, 2], 1)) == [(3, 0), (1, 0), (2, 0)]

    def fail(x: int, _slot: int) -> int:
        if x == 2:
            raise ValueError("bad tensor")
        return x

    with pytest.raises(ValueError, match="bad tensor"):
        list(slot_map(fail, [1, 2, 3, 4], 2))
