"""Held-out re-scoring: the top trials by proxy and every baseline, scored once each on the
documents the search never saw, and stored on the study (`heldout_<number>`, see keys.py)."""

from __future__ import annotations

import sys
from typing import Any

from evomerge.loop.workbench import Workbench
from evomerge.search import keys
from evomerge.search.objective import Objectives
from evomerge.search.results import heldout_scores, ranked, spearman
from evomerge.search.space import SearchSpace


def rescore_heldout(
    st: Any, space: SearchSpace, wb: Workbench, obj: Objectives, k: int, quiet: bool = False
) -> None:
    """Re-score the top-k trials by proxy and every baseline on the held-out split (once each,
    stored on the study) and print the proxy vs held-out Spearman rank correlation."""
    from optuna.trial import TrialState

    top = ranked(st)[:k]
    # every baseline too, pruned ones included: the card and the demo compare against them
    # (held-out scoring is reporting, outside the search's budget)
    baselines = [
        t
        for t in st.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.user_attrs.get(keys.BASELINE) and t not in top
    ]
    done = score_heldout(st, space, wb, obj, top + baselines)
    if not quiet and done:
        proxy = {t.number: t.values[0] for t in ranked(st)}
        pairs = [(proxy[n], h["objective"][0]) for n, h in done.items() if n in proxy]
        rho = spearman([p[0] for p in pairs], [p[1] for p in pairs])
        print(
            f"held-out re-scoring: {len(pairs)} trials; proxy vs held-out Spearman "
            f"{'n/a' if rho is None else f'{rho:.3f}'}",
            file=sys.stderr,
        )


def score_heldout(
    st: Any, space: SearchSpace, wb: Workbench, obj: Objectives, trials: list[Any]
) -> dict[int, dict[str, Any]]:
    """Score `trials` on the held-out split (each once: cached as study attr `heldout_<n>`);
    returns every held-out entry of the study, {number: {"tasks": ..., "objective": ...}}."""
    done = heldout_scores(st)
    for t in trials:
        if t.number in done:
            continue
        res = wb.evaluate(space.decode(t.params), "heldout")
        means = {task: float(s.mean) for task, s in res.tasks.items()}
        entry = {"tasks": means, "objective": obj.values(means)}
        st.set_user_attr(keys.heldout_key(t.number), entry)
        done[t.number] = entry
    return done
