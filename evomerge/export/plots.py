"""Plots of a study as PNG files (matplotlib, Agg backend: no display needed).

Each function takes plain Optuna objects and a path, writes one figure, and returns None, or a
one-line note saying why the plot was skipped (the card lists the notes).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: export runs on servers and in CI
    import matplotlib.pyplot as plt

    return plt


def _complete(study: optuna.Study) -> list[FrozenTrial]:
    from evomerge.search.study import trial_state

    return [t for t in study.get_trials(deepcopy=False) if trial_state(t) == "COMPLETE"]


def _objective_names(study: optuna.Study) -> list[str]:
    names = study.metric_names or [f"objective {i}" for i in range(len(study.directions))]
    return [str(n) for n in names]


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)


def plot_history(study: optuna.Study, path: Path, highlight: int | None = None) -> str | None:
    """Objective value of each completed trial against its number, with the best so far."""
    trials = _complete(study)
    if not trials:
        return "optimization history skipped: no completed trial"
    plt = _pyplot()
    names, dirs = _objective_names(study), study.directions
    fig, axes = plt.subplots(len(dirs), 1, figsize=(7, 3.2 * len(dirs)), squeeze=False)
    for i, (ax, direction) in enumerate(zip(axes[:, 0], dirs, strict=True)):
        xs = [t.number for t in trials]
        ys = [t.values[i] for t in trials]
        pick = max if direction.name == "MAXIMIZE" else min
        best = [pick(ys[: k + 1]) for k in range(len(ys))]
        ax.scatter(xs, ys, s=14, alpha=0.7, label="trial")
        ax.step(xs, best, where="post", color="C3", label="best so far")
        if highlight is not None and highlight in xs:
            k = xs.index(highlight)
            ax.scatter([xs[k]], [ys[k]], s=80, marker="*", color="C2", label="exported", zorder=3)
        ax.set_xlabel("trial")
        ax.set_ylabel(f"{names[i]} ({direction.name.lower()})")
        ax.legend(loc="best", fontsize=8)
    fig.suptitle("Optimization history")
    _save(fig, path)
    return None


def plot_importances(study: optuna.Study, path: Path) -> str | None:
    """fANOVA parameter importances per objective; skipped with fewer than 2 completed trials."""
    import optuna

    trials = _complete(study)
    if len(trials) < 2:
        return f"parameter importances skipped: {len(trials)} completed trial(s), 2 needed"
    plt = _pyplot()
    names = _objective_names(study)
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)  # seeded: same plot twice
    results = []
    for i, name in enumerate(names):
        try:
            imp = optuna.importance.get_param_importances(
                study, evaluator=evaluator, target=lambda t, i=i: t.values[i]
            )
        except (ValueError, RuntimeError) as exc:  # e.g. every trial has the same parameters
            return f"parameter importances skipped: {exc}"
        results.append((name, imp))
    if not any(imp for _, imp in results):
        return "parameter importances skipped: no parameter varies between completed trials"
    size = (6 * len(results), 0.4 * _rows(results) + 1.5)
    fig, axes = plt.subplots(1, len(results), figsize=size, squeeze=False)
    for ax, (name, imp) in zip(axes[0], results, strict=True):
        params = list(imp)[::-1]  # most important on top
        ax.barh(params, [imp[p] for p in params], color="C0")
        ax.set_xlabel(f"importance for {name}")
    fig.suptitle("Parameter importances (fANOVA)")
    _save(fig, path)
    return None


def _rows(results: Sequence[tuple[str, dict]]) -> int:
    return max((len(imp) for _, imp in results), default=1)


def plot_top_weights(rows: Sequence[tuple[str, dict[str, float]]], path: Path) -> str | None:
    """Grouped bars: each recipe value (x) for each of the top trials (one colour per trial).

    `rows` are (label, {parameter: value}) with values as the recipe holds them (weights on the
    simplex, densities...), not the sampler's raw parameterization.
    """
    rows = [(label, vals) for label, vals in rows if vals]
    if not rows:
        return "top-trial weights skipped: no trial with numeric parameters"
    params = list(dict.fromkeys(p for _, vals in rows for p in vals))
    plt = _pyplot()
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(min(24.0, max(6.0, 0.35 * len(params) * len(rows))), 4))
    for k, (label, vals) in enumerate(rows):
        xs = [i + (k - (len(rows) - 1) / 2) * width for i in range(len(params))]
        ax.bar(xs, [vals.get(p, float("nan")) for p in params], width=width, label=label)
    ax.set_xticks(range(len(params)), params, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("value")
    ax.legend(fontsize=8)
    ax.set_title(f"Merge parameters of the top {len(rows)} trial(s)")
    _save(fig, path)
    return None


def plot_pareto(study: optuna.Study, path: Path, highlight: int | None = None) -> str | None:
    """Completed trials in the plane of the first two objectives, the Pareto front marked."""
    if len(study.directions) < 2:
        return None
    trials = _complete(study)
    if not trials:
        return "Pareto front skipped: no completed trial"
    plt = _pyplot()
    names = _objective_names(study)
    from evomerge.search.results import pareto_front  # the front status prints

    front = {t.number for t in pareto_front(study)}
    fig, ax = plt.subplots(figsize=(6, 5))
    rest = [t for t in trials if t.number not in front]
    best = sorted((t for t in trials if t.number in front), key=lambda t: t.values[0])
    ax.scatter([t.values[0] for t in rest], [t.values[1] for t in rest], s=14, alpha=0.5,
               color="C7", label="trial")  # fmt: skip
    ax.plot([t.values[0] for t in best], [t.values[1] for t in best], "o-", color="C3",
            label="Pareto front")  # fmt: skip
    chosen = [t for t in trials if t.number == highlight]
    if chosen:
        ax.scatter([chosen[0].values[0]], [chosen[0].values[1]], s=120, marker="*", color="C2",
                   label=f"exported (trial {highlight})", zorder=3)  # fmt: skip
    ax.set_xlabel(f"{names[0]} ({study.directions[0].name.lower()})")
    ax.set_ylabel(f"{names[1]} ({study.directions[1].name.lower()})")
    ax.legend(fontsize=8)
    ax.set_title("Pareto front")
    _save(fig, path)
    return None


def write_plots(
    study: optuna.Study,
    out_dir: Path,
    top: Sequence[tuple[str, dict[str, float]]],
    highlight: int | None = None,
) -> tuple[list[str], list[str]]:
    """Every plot into out_dir; returns (file names written, notes for the skipped ones)."""
    jobs = [
        ("optimization_history.png", lambda p: plot_history(study, p, highlight)),
        ("param_importances.png", lambda p: plot_importances(study, p)),
        ("top_trials_weights.png", lambda p: plot_top_weights(top, p)),
    ]
    if len(study.directions) > 1:
        jobs.append(("pareto_front.png", lambda p: plot_pareto(study, p, highlight)))
    written, notes = [], []
    for name, job in jobs:
        note = job(out_dir / name)
        if note:
            notes.append(note)
        else:
            written.append(name)
    return written, notes
