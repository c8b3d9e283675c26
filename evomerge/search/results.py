"""Reading a study back: trials.csv, the leaderboard, held-out scores, SearchOutcome.

Where things are stored (so status and export can read them without the search process):
- trial and study user attrs, named in keys.py. Held-out scores live on the study
  (`heldout_<number>`), since finished trials cannot take new user attrs in Optuna.
- results/<study>/search.json: study name, storage URL and space path.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError
from evomerge.recipe import Recipe
from evomerge.search import keys
from evomerge.search.space import SearchSpace
from evomerge.search.study import open_storage, storage_url, trial_state

META = "search.json"


@dataclass
class SearchOutcome:
    study_name: str
    study_dir: Path
    storage: str
    space: SearchSpace
    directions: list[str]
    objective_names: list[str]
    best_trial: Any | None  # FrozenTrial: best held-out "select" objective, else best proxy
    best_recipe: Recipe | None
    top_trials: list[Any] = field(default_factory=list)
    heldout: dict[int, dict[str, Any]] = field(default_factory=dict)
    base: dict[str, dict[str, float]] = field(default_factory=dict)
    spearman: float | None = None  # proxy vs held-out test over the top trials re-scored
    spearman_n: int = 0
    fidelity: float | None = None  # ... over the seeded sample of all COMPLETE trials
    fidelity_n: int = 0
    pareto: list[Any] = field(default_factory=list)
    study: Any = None


def write_meta(study_dir: Path, name: str, url: str, space_path: str) -> None:
    data = {"study": name, "storage": url, "space": space_path}
    atomic_write(study_dir / META, json.dumps(data, indent=2) + "\n")


def atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def heldout_scores(study: Any) -> dict[int, dict[str, Any]]:
    """{trial number: {"tasks": {task: mean}, "objective": [values]}} of re-scored trials."""
    numbered = ((keys.heldout_number(k), v) for k, v in study.user_attrs.items())
    return {n: v for n, v in numbered if n is not None}


def feasible(trial: Any) -> bool:
    """Whether a trial meets the space's constraint (max_drop): violation <= 0, Optuna's
    convention; a study without one stores 0."""
    return float(trial.user_attrs.get(keys.VIOLATION, 0.0)) <= 0.0


def _complete(study: Any) -> list[Any]:
    return [t for t in study.get_trials(deepcopy=False) if trial_state(t) == "COMPLETE"]


def pareto_front(study: Any) -> list[Any]:
    """The fully evaluated feasible trials no other such trial dominates, by number ([] for
    one objective). Optuna's best_trials also counts trials the pruner stopped (COMPLETE to
    Optuna); this is the front that status prints and export picks from."""
    if len(study.directions) < 2:
        return []
    signs = [1.0 if d.name == "MAXIMIZE" else -1.0 for d in study.directions]
    pool = [t for t in _complete(study) if feasible(t)]
    scored = [(t, [s * v for s, v in zip(signs, t.values, strict=True)]) for t in pool]

    def dominated(a: list[float]) -> bool:
        return any(all(x >= y for x, y in zip(b, a, strict=True)) and b != a for _, b in scored)

    return [t for t, v in scored if not dominated(v)]


def ranked(study: Any) -> list[Any]:
    """Fully evaluated trials, best first: feasible ones before those breaking the constraint,
    the Pareto front first when several objectives, then by the first objective's proxy.
    Trials the pruner stopped are left out: their values come from fewer documents."""
    sign = 1.0 if study.directions[0].name == "MAXIMIZE" else -1.0
    front = {t.number for t in pareto_front(study)}
    return sorted(
        _complete(study),
        key=lambda t: (not feasible(t), t.number not in front, -sign * t.values[0], t.number),
    )


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman rank correlation (average ranks for ties); None for fewer than 3 pairs."""
    import pandas as pd

    if len(xs) < 3:
        return None
    rx, ry = pd.Series(xs).rank(), pd.Series(ys).rank()
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(rx.corr(ry))


def trials_frame(study: Any, names: list[str] | None = None) -> Any:
    """One row per trial: state, objective(s), per-task proxy and held-out scores, duration."""
    import pandas as pd

    held = heldout_scores(study)
    names = names or study.user_attrs.get(keys.OBJECTIVE_NAMES) or ["objective"]
    rows = []
    for t in study.get_trials(deepcopy=False):
        state = trial_state(t)
        row: dict[str, Any] = {"number": t.number, "state": state}
        for k, name in enumerate(names):
            complete = state == "COMPLETE" and t.values and k < len(t.values)
            row[name] = t.values[k] if complete else None  # a PRUNED value is a partial estimate
        for key, v in sorted(t.user_attrs.items()):
            if key.startswith(keys.PROXY_PREFIX):
                row[key] = v
        h = held.get(t.number)
        if h:
            row.update({f"heldout_{task}": v for task, v in h["tasks"].items()})
            for k, name in enumerate(names):
                row[f"heldout_{name}"] = h["objective"][k]
                for part in keys.PARTS:  # the whole split's value when the study has no parts
                    row[f"{part}_{name}"] = keys.heldout_part(h, part)["objective"][k]
        row["docs_scored"] = t.user_attrs.get(keys.DOCS_SCORED)
        row["seconds"] = t.duration.total_seconds() if t.duration else None
        row["baseline"] = t.user_attrs.get(keys.BASELINE, "")
        row["fail"] = t.user_attrs.get(keys.FAIL_REASON, "")
        row.update({f"params_{k}": v for k, v in t.params.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def write_csv(study: Any, study_dir: Path) -> None:
    atomic_write(study_dir / "trials.csv", trials_frame(study).to_csv(index=False))


def open_saved_study(study_dir: str | Path, storage: str | None = None) -> tuple[Any, str, dict]:
    import optuna

    study_dir = Path(study_dir)
    meta_path = study_dir / META
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if storage is not None:
        url = storage_url(storage, study_dir)
    elif meta.get("storage"):
        url = meta["storage"]
    elif (study_dir / "study.db").is_file():
        url = storage_url(None, study_dir)
    elif (study_dir / "journal.log").is_file():
        url = storage_url("journal", study_dir)
    else:
        raise ConfigError(
            f"'{study_dir}' holds no study (expected {META}, study.db or "
            "journal.log; run `evomerge search` first)"
        )
    name = meta.get("study") or study_dir.name
    try:
        study = optuna.load_study(study_name=name, storage=open_storage(url))
    except KeyError:
        raise ConfigError(f"storage {url} has no study named '{name}'") from None
    return study, url, meta


def load_study_outcome(study_dir: str | Path, storage: str | None = None) -> SearchOutcome:
    """Best trial (best held-out "select" part objective when re-scored, else best proxy), top
    trials, held-out scores, the base model's scores and the proxy vs held-out test Spearman
    correlations (the top trials; the seeded sample of all COMPLETE trials)."""
    study, url, _meta = open_saved_study(study_dir, storage)
    attrs = study.user_attrs
    if keys.SPACE_YAML not in attrs:
        raise ConfigError(f"study '{study.study_name}' was not created by evomerge search")
    space = SearchSpace.from_text(attrs[keys.SPACE_YAML], attrs.get(keys.SPACE_PATH, "<space>"))
    directions = [d.name.lower() for d in study.directions]
    top = ranked(study)
    held = heldout_scores(study)
    sign = 1.0 if directions[0] == "maximize" else -1.0
    front = pareto_front(study)
    # the default pick: among the candidates (the Pareto front when several objectives, else the
    # feasible trials), the best first objective on the held-out "select" part, else the best
    # proxy one; the "test" part chose nothing, so it is what the reports show
    pool = front if len(directions) > 1 else [t for t in top if feasible(t)] or top
    rescored = [t for t in pool if t.number in held]
    best = max(rescored, key=lambda t: sign * _objective(held[t.number], "select"), default=None)
    numbers = {t.number for t in pool}
    best = best or next((t for t in top if t.number in numbers), top[0] if top else None)
    pairs = [(t.values[0], _objective(held[t.number], "test")) for t in top if t.number in held]
    proxy = {t.number: t.values[0] for t in top}
    drawn = [n for n in attrs.get(keys.FIDELITY, []) if n in held and n in proxy]
    fid = [(proxy[n], _objective(held[n], "test")) for n in drawn]
    splits = (*keys.SPLITS, *keys.PARTS)
    return SearchOutcome(
        study_name=study.study_name,
        study_dir=Path(study_dir),
        storage=url,
        space=space,
        directions=directions,
        objective_names=attrs.get(keys.OBJECTIVE_NAMES, ["objective"]),
        best_trial=best,
        best_recipe=space.decode(best.params) if best else None,
        top_trials=top,
        heldout=held,
        base={s: attrs[keys.base_key(s)] for s in splits if keys.base_key(s) in attrs},
        spearman=spearman([p[0] for p in pairs], [p[1] for p in pairs]),
        spearman_n=len(pairs),
        fidelity=spearman([p[0] for p in fid], [p[1] for p in fid]),
        fidelity_n=len(fid),
        pareto=front,
        study=study,
    )


def _objective(entry: dict, part: str) -> float:
    return float(keys.heldout_part(entry, part)["objective"][0])


def spearman_lines(out: SearchOutcome) -> list[str]:
    """The proxy fidelity figures: over the top trials (a narrow range of proxy scores) and over
    the seeded sample of all COMPLETE trials (how well the proxy ranks candidates)."""
    lines = []
    for what, rho, n in (
        ("top trials", out.spearman, out.spearman_n),
        ("seeded sample of all COMPLETE trials", out.fidelity, out.fidelity_n),
    ):
        if n:
            value = "n/a" if rho is None else f"{rho:.3f}"
            lines.append(f"proxy vs held-out test Spearman, {what}: {value} ({n} trials)")
    return lines


def chosen_and_tested(out: SearchOutcome, number: int | None = None) -> str:
    """Which documents chose the trial (the default pick, or `number`) and which tested it."""
    n = out.best_trial.number if number is None and out.best_trial is not None else number
    entry = out.heldout.get(n) if n is not None else None
    if entry is None:
        return "chosen on the search split (proxy); not scored on held-out"
    if not keys.has_parts(entry):
        return (
            "chosen and tested on the same held-out documents (a study without the held-out "
            "selection/test parts): its held-out score was also used for selection"
        )
    return (
        "chosen on the held-out selection part; tested on the held-out test part, which "
        "chose nothing"
    )


def status_text(out: SearchOutcome, top: int = 20) -> str:
    """The leaderboard (best proxy first), best per objective, Pareto front, base scores."""
    import pandas as pd

    df = trials_frame(out.study, out.objective_names)
    lines = [f"study {out.study_name} ({out.storage})"]
    if df.empty:
        return lines[0] + "\nno trials yet"
    lines.append("trials: " + ", ".join(f"{k} {v}" for k, v in df.state.value_counts().items()))
    order = [t.number for t in out.top_trials][:top]
    board = df.set_index("number").loc[order] if order else df.head(0)
    cols = [c for c in board.columns if not c.startswith("params_") and c not in ("fail", "state")]
    with pd.option_context(
        "display.width", 200, "display.max_columns", 50, "display.float_format", "{:.4f}".format
    ):
        lines.append(board[cols].to_string() if order else "no COMPLETE trial yet")
    lines += best_lines(out)
    lines += spearman_lines(out)
    if out.best_trial is not None:
        lines.append(f"export default: {pick_reason(out)}")
    failed = [t for t in out.study.get_trials(deepcopy=False) if t.user_attrs.get(keys.FAIL_REASON)]
    if failed:
        lines.append(f"failed trials ({len(failed)}), the last {min(len(failed), 5)}:")
        lines += [f"  #{t.number}: {t.user_attrs[keys.FAIL_REASON]}" for t in failed[-5:]]
    for split, scores in out.base.items():
        lines.append(f"base ({split}): " + ", ".join(f"{t} {v:.4f}" for t, v in scores.items()))
    return "\n".join(lines)


def _candidates(out: SearchOutcome) -> list[Any]:
    """The trials "best" is chosen among: the Pareto front (several objectives), else the
    feasible fully evaluated trials (ranked puts them first)."""
    if len(out.directions) > 1:
        return list(out.pareto)
    return [t for t in out.top_trials if feasible(t)]


def best_lines(out: SearchOutcome) -> list[str]:
    """Best proxy per objective (among the front / the feasible trials, so the lines agree
    with the front and the export default), best held-out, and the front itself."""
    pool = _candidates(out)
    lines = []
    if out.top_trials and not pool:
        lines.append("no fully evaluated trial meets the constraint (max_drop)")
    for k, (name, d) in enumerate(zip(out.objective_names, out.directions, strict=False)):
        if pool:
            pick = (max if d == "maximize" else min)(pool, key=lambda t: t.values[k])
            lines.append(f"best proxy {name} ({d}): trial {pick.number} = {pick.values[k]:.4f}")
    if out.best_trial is not None and out.best_trial.number in out.heldout:
        entry = out.heldout[out.best_trial.number]
        lines.append(
            f"held-out test of the pick: trial {out.best_trial.number} = "
            f"{_objective(entry, 'test'):.4f} ({chosen_and_tested(out)})"
        )
    if out.pareto:
        lines.append(
            "Pareto front (feasible): "
            + ", ".join(f"#{t.number} {tuple(round(v, 4) for v in t.values)}" for t in out.pareto)
        )
    return lines


def pick_reason(out: SearchOutcome) -> str:
    """Which trial export takes by default, why, and how to take another."""
    best = out.best_trial
    if best is None:
        return "none (no fully evaluated trial)"
    name = out.objective_names[0] if out.objective_names else "objective"
    held = "held-out selection-part" if best.number in out.heldout else "proxy"
    if len(out.directions) > 1:
        front = ", ".join(f"#{t.number}" for t in out.pareto)
        why = (
            f"the best {held} {name} (the first objective) of the {len(out.pareto)} points of "
            f"the Pareto front ({front})"
        )
    elif feasible(best):
        why = f"the best {held} {name} among the feasible trials"
    else:
        why = f"the best {held} {name}; no trial meets the constraint (max_drop)"
    return (
        f"trial {best.number}, {why}; take another with `evomerge export {out.study_dir} --trial N`"
    )
