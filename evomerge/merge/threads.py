"""How many intra-op threads an in-place candidate's fused kernels get, chosen by measuring.

More threads merge faster on an idle CPU (measured on 2 cores: a TIES candidate of
SmolLM2-135M in 0.17-0.23 s with 2 threads vs 0.25-0.36 s with 1), but every kernel call
ends at a barrier, and on a busy machine a preempted worker stalls each one (2 threads up
to 40x slower than 1). Load averages cannot tell this process's own threads from anyone
else's, so the choice is measured instead: per method, one candidate is timed with each
count, the faster one is used, and the slower one is tried again now and then (load
changes), less often each time it loses again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
PROBE_EVERY = 16  # candidates between retries of the losing count (doubling while it loses)


class ThreadChoice:
    """Picks 1 or `most` threads per key (a method name) from timed runs."""

    def __init__(self, most: int) -> None:
        self.most = max(1, most)
        self._state: dict[str, dict] = {}

    def run(self, key: str, fn: Callable[[int], T]) -> T:
        """fn(threads) with the count chosen for key, timed to inform the next choice."""
        if self.most == 1:
            return fn(1)
        st = self._state.setdefault(key, {"n": 0, "time": {}, "gap": PROBE_EVERY})
        threads = self._pick(st)
        t0 = time.perf_counter()
        out = fn(threads)
        if st["n"] > 0:  # the first run also compiles and fills caches: not a measurement
            st["time"][threads] = time.perf_counter() - t0
        st["n"] += 1
        return out

    def _pick(self, st: dict) -> int:
        times, counts = st["time"], (1, self.most)
        if st["n"] == 0:
            return 1
        missing = [c for c in counts if c not in times]
        if missing:
            return missing[0]
        st.setdefault("next", st["n"] + PROBE_EVERY)  # both timed: the first retry is due
        best = min(counts, key=lambda c: times[c])
        if st["n"] < st["next"]:
            return best
        # time to retry the loser; if it loses again, wait twice as long before the next try
        loser = counts[1] if best == counts[0] else counts[0]
        st["gap"] = st["gap"] * 2 if st.get("probed") == loser else PROBE_EVERY
        st["probed"], st["next"] = loser, st["n"] + st["gap"]
        return loser

    def chosen(self, key: str) -> int | None:
        """The count currently preferred for key (None before both were timed)."""
        times = self._state.get(key, {}).get("time", {})
        if self.most == 1:
            return 1
        if len(times) < 2:
            return None
        return min(times, key=times.get)
