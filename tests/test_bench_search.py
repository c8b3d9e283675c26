"""scripts/bench_search.py: budgets as prefixes, the pick at each budget, cost to reach a score
(hand-computed on fake trial lists), and the two facts the design rests on: a sampler's first
proposals do not depend on the total budget, and the docs stop rule ends a pruned run."""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import pytest
from _search_fakes import FakeWorkbench, ensure_methods, fake_space

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_search as bs


def trial(n: int, state: str, value: float | None, docs: int, t: float) -> dict:
    return {"n": n, "state": state, "value": value, "docs": docs, "t": t, "baseline": ""}


# full trials score 100 documents; pruned ones 25. Cumulative docs: 100 200 225 325 350 450
MIXED = [
    trial(0, "COMPLETE", 0.5, 100, 1.0),
    trial(1, "COMPLETE", 0.7, 100, 2.0),
    trial(2, "PRUNED", None, 25, 2.2),
    trial(3, "COMPLETE", 0.7, 100, 3.2),  # ties trial 1: the earlier trial stays the pick
    trial(4, "PRUNED", None, 25, 3.4),
    trial(5, "COMPLETE", 0.9, 100, 4.4),
]
MIXED_RUN = {"trials": MIXED, "full_docs": 100, "heldout": {"0": 0.4, "1": 0.6, "5": 0.5}}

# an unpruned run: 4 full trials
PLAIN = [trial(i, "COMPLETE", v, 100, float(i + 1)) for i, v in enumerate([0.1, 0.3, 0.2, 0.4])]
PLAIN_RUN = {"trials": PLAIN, "full_docs": 100, "heldout": {"0": 0.2, "1": 0.5, "3": 0.6}}


def test_budget_prefixes_and_picks() -> None:
    assert bs.cumulative_docs(MIXED) == [100, 200, 225, 325, 350, 450]
    assert [bs.within_budget(MIXED, d) for d in (99, 100, 200, 300, 400, 500)] == [0, 1, 2, 3, 5, 6]
    assert bs.best_trial(MIXED[:4]) == 1
    assert bs.best_trial(MIXED[2:3]) is None  # only a pruned trial: nothing to pick
    assert bs.running_best(MIXED) == [(0, 0), (1, 1), (5, 5)]
    assert bs.best_at_budgets(MIXED_RUN, [1, 2, 3, 4, 5]) == {1: 0, 2: 1, 3: 1, 4: 1, 5: 5}
    # the pick at budget 5 (trial 5) is better on the search split, worse held-out
    assert bs.budget_scores([MIXED_RUN, PLAIN_RUN], [2, 5]) == {2: [0.6, 0.5], 5: [0.5, 0.6]}


def test_cost_curves_and_first_reach() -> None:
    docs = bs.cost_curve(MIXED_RUN, "docs")
    assert docs == [(100.0, 0.4), (200.0, 0.6), (450.0, 0.5)]
    assert bs.cost_curve(MIXED_RUN, "time") == [(1.0, 0.4), (2.0, 0.6), (4.4, 0.5)]
    assert [bs.value_at(docs, c) for c in (99, 100, 449, 1000)] == [None, 0.4, 0.6, 0.5]
    other = [(150.0, 0.2), (300.0, 0.8)]
    # means at 150: 0.3, 200: 0.4, 300: 0.7 (100 has no value for the second run yet)
    assert bs.first_reach([docs, other], 0.5) == 300.0
    assert bs.first_reach([docs, other], 0.75) is None  # best mean is 0.7 at 300, 0.65 at 450


def test_pruning_fraction_and_speed() -> None:
    # PLAIN at budget 4 picks trial 3 (held-out 0.6) after 400 docs / 4 s; MIXED first holds a
    # 0.6 pick at 200 docs / 2 s: half the cost
    assert bs.pruning_fraction([MIXED_RUN], [PLAIN_RUN], 4, "docs") == (0.6, 0.5)
    assert bs.pruning_fraction([MIXED_RUN], [PLAIN_RUN], 4, "time") == (0.6, 0.5)
    target, frac = bs.pruning_fraction([MIXED_RUN], [PLAIN_RUN], 2, "docs")
    assert (target, frac) == (0.5, 1.0)  # PLAIN@2 picks trial 1 (0.5) at 200 docs
    assert bs.cost_at(PLAIN_RUN, 2, "docs") == 200.0
    assert bs.trials_per_hour(MIXED_RUN, 2) == 3600.0
    assert bs.win_counts([0.5, 0.6, 0.7], [0.5, 0.7, 0.6]) == (1, 1, 1)
    m, s = bs.mean_std([0.2, 0.4])
    assert math.isclose(m, 0.3) and math.isclose(s, math.sqrt(0.02))


@pytest.mark.parametrize("sampler", ["tpe", "cmaes", "gp", "dirichlet"])
def test_first_proposals_do_not_depend_on_budget(tmp_path: Path, sampler: str) -> None:
    from evomerge.loop.run import run_search

    ensure_methods()
    space = tmp_path / "space.yaml"
    space.write_text(fake_space("{seed: 3}"))
    params = []
    for n in (11, 13):  # past TPE's 10 random start-up trials
        kw = dict(prune=False, results=tmp_path, quiet=True, rescore=False)
        out = run_search(space, study=f"s{n}", n_trials=n, sampler=sampler,
                         workbench=FakeWorkbench(), **kw)  # fmt: skip
        params.append([t.params for t in sorted(out.study.trials, key=lambda t: t.number)])
    assert len(params[1]) == 13 and params[1][:11] == params[0]


def test_docs_budget_ends_a_pruned_run_at_equal_cost(tmp_path: Path) -> None:
    from evomerge.loop.run import run_search
    from evomerge.search.study import DocsBudget

    ensure_methods()
    space = tmp_path / "space.yaml"
    space.write_text(fake_space("{seed: 0, pruner: median}"))
    out = run_search(space, n_trials=40, sampler="tpe", results=tmp_path, quiet=True,
                     workbench=FakeWorkbench(chunks=(10, None)), stop=DocsBudget(12))  # fmt: skip
    trials = bs.study_trials(out.study)
    cum = bs.cumulative_docs(trials)
    full = 3 * 40  # three tasks of 40 documents; a pruned trial scored 3 x 10
    assert {t["docs"] for t in trials} <= {full, 30}
    assert cum[-1] >= 12 * full > cum[-2]  # stopped by the first trial that reached the budget
    assert any(t["state"] == "PRUNED" for t in trials) and len(trials) < 40
    assert all(b["t"] >= a["t"] for a, b in itertools.pairwise(trials))
