"""How many intra-op threads an in-place candidate's fused kernels get, chosen by measuring.

More threads merge faster on an idle CPU (measured on 2 cores: a TIES candidate of
SmolLM2-135M in 0.17-0.23 s with 2 threads vs 0.25-0.36 s with 1), but every kernel call
ends at a barrier, and on a busy machine a preempted worker stalls each one (2 threads up
to 40x slower than 1). Load averages cannot tell this process's own threads from anyone
else's, so the choice is measured instead: per method, candidates are timed with each
count in turn until each has SAMPLES timings, then the count with the lower best recent
time is used (the best of two: a spike from another process does not decide), and the
other one is tried again now and then (load changes), less often each time it loses again.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")
SAMPLES = 2  # timings kept per count: a count's time is the best of its last SAMPLES
PROBE_EVERY = 16  # candidates between retries of the losing count (doubling while it loses)


@dataclass
class _State:
    runs: int = 0
    times: dict[int, deque] = field(default_factory=dict)
    next_probe: int | None = None
    gap: int = PROBE_EVERY
    probed: int | None = None


class ThreadChoice:
    """Picks 1 or `most` threads per key (a method name) from timed runs."""

    def __init__(self, most: int) -> None:
        self.most = max(1, most)
        self._state: dict[str, _State] = {}

    def run(self, key: str, fn: Callable[[int], T]) -> T:
        """fn(threads) with the count chosen for key, timed to inform the next choice."""
        if self.most == 1:
            return fn(1)
        st = self._state.setdefault(key, _State())
        threads = self._pick(st)
        t0 = time.perf_counter()
        out = fn(threads)
        if st.runs > 0:  # the first run also compiles and fills caches: not a measurement
            st.times.setdefault(threads, deque(maxlen=SAMPLES)).append(time.perf_counter() - t0)
        st.runs += 1
        return out

    def _best(self, st: _State) -> int:
        return min(st.times, key=lambda c: min(st.times[c]))

    def _pick(self, st: _State) -> int:
        counts = (1, self.most)
        if st.runs == 0:
            return 1
        short = [c for c in counts if len(st.times.get(c, ())) < SAMPLES]
        if short:  # alternate until each count has its timings
            return min(short, key=lambda c: len(st.times.get(c, ())))
        if st.next_probe is None:  # just chosen: the first retry of the loser is due later
            st.next_probe = st.runs + PROBE_EVERY
        best = self._best(st)
        if st.runs < st.next_probe:
            return best
        # time to retry the loser; if it loses again, wait twice as long before the next try
        loser = counts[1] if best == counts[0] else counts[0]
        st.gap = st.gap * 2 if st.probed == loser else PROBE_EVERY
        st.probed, st.next_probe = loser, st.runs + st.gap
        return loser

    def chosen(self, key: str) -> int | None:
        """The count currently preferred for key (None until both counts were timed)."""
        if self.most == 1:
            return 1
        st = self._state.get(key)
        if st is None or any(len(st.times.get(c, ())) < SAMPLES for c in (1, self.most)):
            return None
        return self._best(st)
