"""Held-out re-scoring: the top trials by proxy, every baseline and a seeded sample of all
COMPLETE trials, scored once each on the documents the search never saw, and stored on the
study (`heldout_<number>`, see keys.py).

The held-out split has two disjoint parts (eval/tasks.py `heldout_parts`): the winner is chosen
on the "select" part (search/results.py) and reported on the "test" part, which chose nothing.
One evaluation of the whole split gives both, from its per-example scores.
"""

from __future__ import annotations

import random
import sys
from typing import Any

from evomerge.eval.tasks import heldout_parts
from evomerge.loop.workbench import Workbench
from evomerge.search import keys
from evomerge.search.objective import Objectives
from evomerge.search.results import heldout_scores, ranked, spearman
from evomerge.search.space import SearchSpace

DEFAULT_FIDELITY_SAMPLE = 10


def rescore_heldout(
    st: Any,
    space: SearchSpace,
    wb: Workbench,
    obj: Objectives,
    k: int,
    quiet: bool = False,
    sample: int | None = None,
) -> None:
    """Re-score the top-k trials by proxy, every baseline and a seeded sample of `sample`
    COMPLETE trials (eval.fidelity_sample) on the held-out split (once each, stored on the
    study) and print the proxy vs held-out-test Spearman rank correlations."""
    from optuna.trial import TrialState

    if sample is None:
        sample = int(space.spec.eval.get("fidelity_sample", DEFAULT_FIDELITY_SAMPLE))
    ordered = ranked(st)
    top = ordered[:k]
    # every baseline too, pruned ones included: the card and the demo compare against them
    # (held-out scoring is reporting, outside the search's budget)
    baselines = [
        t
        for t in st.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.user_attrs.get(keys.BASELINE) and t not in top
    ]
    drawn = fidelity_sample(ordered, sample, st.user_attrs.get(keys.SEED, 0))
    if st.user_attrs.get(keys.FIDELITY) != [t.number for t in drawn]:
        st.set_user_attr(keys.FIDELITY, [t.number for t in drawn])
    extra = [t for t in drawn if t not in top and t not in baselines]
    done = score_heldout(st, space, wb, obj, top + baselines + extra)
    if not quiet and done:
        proxy = {t.number: t.values[0] for t in ordered}
        for what, group in (("top", top), ("sample", drawn)):
            numbers = [t.number for t in group]
            pairs = [(proxy[n], _test(done[n])) for n in numbers if n in done and n in proxy]
            rho = spearman([p[0] for p in pairs], [p[1] for p in pairs])
            print(
                f"held-out re-scoring ({what}): {len(pairs)} trials; proxy vs held-out test "
                f"Spearman {'n/a' if rho is None else f'{rho:.3f}'}",
                file=sys.stderr,
            )


def _test(entry: dict) -> float:
    return float(keys.heldout_part(entry, "test")["objective"][0])


def fidelity_sample(complete: list[Any], n: int, seed: Any) -> list[Any]:
    """A seeded sample of `n` of the fully evaluated trials, in trial-number order: the whole
    range of proxy scores, not only the best, so its Spearman says how well the proxy ranks."""
    pool = sorted(complete, key=lambda t: t.number)
    if n >= len(pool):
        return pool
    rng = random.Random(f"fidelity/{seed}/{len(pool)}")
    return sorted(rng.sample(pool, n), key=lambda t: t.number)


def score_heldout(
    st: Any, space: SearchSpace, wb: Workbench, obj: Objectives, trials: list[Any]
) -> dict[int, dict[str, Any]]:
    """Score `trials` on the held-out split (each once: cached as study attr `heldout_<n>`);
    returns every held-out entry of the study, {number: {"tasks", "objective", "select",
    "test"}}."""
    done = heldout_scores(st)
    for t in trials:
        if t.number in done:
            continue
        res = wb.evaluate(space.decode(t.params), "heldout")
        entry = heldout_entry(res.per_example, obj)
        st.set_user_attr(keys.heldout_key(t.number), entry)
        done[t.number] = entry
    return done


def heldout_entry(
    per_example: dict[str, dict[int, float]], obj: Objectives | None
) -> dict[str, Any]:
    """{"tasks", "objective"} of the whole held-out split, and the same for each part ("select",
    "test") when every task has at least 2 held-out documents (no objective without `obj`)."""
    entry = part_scores(per_example, obj)
    parts = {task: heldout_parts(task, list(scores)) for task, scores in per_example.items()}
    if all(p is not None for p in parts.values()):
        for name in keys.PARTS:
            kept = {}
            for task, scores in per_example.items():
                ids = set(parts[task][name])  # type: ignore[index]
                kept[task] = {i: s for i, s in scores.items() if i in ids}
            entry[name] = part_scores(kept, obj)
    return entry


def part_scores(per_example: dict[str, dict[int, float]], obj: Objectives | None) -> dict[str, Any]:
    means = {task: sum(s.values()) / len(s) for task, s in per_example.items() if s}
    return {"tasks": means, **({"objective": obj.values(means)} if obj is not None else {})}
