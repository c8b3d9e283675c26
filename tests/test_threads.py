"""ThreadChoice: kernel threads picked from timed runs, the loser retried less and less often."""

from __future__ import annotations

import pytest

import evomerge.merge.threads as th
from evomerge.merge.threads import ThreadChoice


@pytest.fixture
def clock(monkeypatch):
    """A fake perf_counter: each run takes cost[threads] seconds."""
    state = {"now": 0.0, "cost": {1: 1.0, 2: 0.5}}
    monkeypatch.setattr(th.time, "perf_counter", lambda: state["now"])
    return state


def _runs(choice: ThreadChoice, clock, n: int, key: str = "ties") -> list[int]:
    used = []

    def fn(threads: int) -> int:
        clock["now"] += clock["cost"][threads]
        used.append(threads)
        return threads

    for _ in range(n):
        assert choice.run(key, fn) == used[-1]
    return used


def test_a_spike_does_not_decide(clock):
    c = ThreadChoice(2)
    clock["cost"] = {1: 1.0, 2: 0.5}
    assert _runs(c, clock, 4) == [1, 1, 2, 1]  # warm-up, then 1 and 2 in turn
    clock["cost"] = {1: 1.0, 2: 30.0}  # one run of 2 threads hit by another process
    assert _runs(c, clock, 1) == [2]
    clock["cost"] = {1: 1.0, 2: 0.5}
    assert _runs(c, clock, 3) == [2, 2, 2]
    assert c.chosen("ties") == 2


def test_warm_up_then_both_timed_then_the_faster(clock):
    c = ThreadChoice(2)
    used = _runs(c, clock, 8)
    assert used == [1, 1, 2, 1, 2, 2, 2, 2]  # warm-up (not timed), 1 and 2 twice, 2 wins
    assert c.chosen("ties") == 2
    assert c.chosen("linear") is None  # per method


def test_loser_is_retried_with_doubling_gaps_and_a_switch_when_load_changes(clock):
    c = ThreadChoice(2)
    used = _runs(c, clock, 140)
    probes = [i for i, t in enumerate(used) if t == 1 and i > 1]
    assert probes == [3, 21, 37, 69, 133]  # timing; 16 after the choice, 16, then 32, 64
    clock["cost"] = {1: 1.0, 2: 40.0}  # the machine got busy: 2 threads stall
    later = _runs(c, clock, 200)
    assert later[:3] == [2, 2, 1]  # two slow runs with 2 threads (its best of 2), then 1
    probes = [140 + i for i, t in enumerate(later) if t == 2][2:]
    assert probes == [261, 277, 309]  # 2 threads retried: 128 after the last probe, then anew
    assert c.chosen("ties") == 1


def test_one_thread_machine_never_probes(clock):
    c = ThreadChoice(1)
    assert _runs(c, clock, 5) == [1] * 5
    assert c.chosen("x") == 1
