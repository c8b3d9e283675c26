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
    best_trial: Any | None  # FrozenTrial: best held-out objective, else best proxy
    best_recipe: Recipe | None
    top_trials: list[Any] = field(default_factory=list)
    heldout: dict[int, dict[str, Any]] = field(default_factory=dict)
    base: dict[str, dict[str, float]] = field(default_factory=dict)
    spearman: float | None = None
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


def ranked(study: Any) -> list[Any]:
    """Fully evaluated trials, best proxy first (first objective; Pareto front first when
    several). Trials the pruner stopped are left out: their values come from fewer documents."""
    done = [t for t in study.get_trials(deepcopy=False) if trial_state(t) == "COMPLETE"]
    sign = 1.0 if study.directions[0].name == "MAXIMIZE" else -1.0
    front = {t.number for t in study.best_trials} if len(study.directions) > 1 else set()
    return sorted(done, key=lambda t: (t.number not in front, -sign * t.values[0], t.number))


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
    """Best trial (best held-out objective when re-scored, else best proxy), top trials,
    held-out scores, the base model's scores and the proxy/held-out Spearman correlation."""
    study, url, _meta = open_saved_study(study_dir, storage)
    attrs = study.user_attrs
    if keys.SPACE_YAML not in attrs:
        raise ConfigError(f"study '{study.study_name}' was not created by evomerge search")
    space = SearchSpace.from_text(attrs[keys.SPACE_YAML], attrs.get(keys.SPACE_PATH, "<space>"))
    directions = [d.name.lower() for d in study.directions]
    top = ranked(study)
    held = heldout_scores(study)
    sign = 1.0 if directions[0] == "maximize" else -1.0
    rescored = [t for t in top if t.number in held]
    best = max(rescored, key=lambda t: sign * held[t.number]["objective"][0], default=None)
    best = best or (top[0] if top else None)
    pairs = [(t.values[0], held[t.number]["objective"][0]) for t in rescored]
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
        base={s: attrs[keys.base_key(s)] for s in keys.SPLITS if keys.base_key(s) in attrs},
        spearman=spearman([p[0] for p in pairs], [p[1] for p in pairs]),
        pareto=list(study.best_trials) if len(directions) > 1 else [],
        study=study,
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
    for k, (name, d) in enumerate(zip(out.objective_names, out.directions, strict=False)):
        done = [t for t in out.top_trials]
        if done:
            pick = (max if d == "maximize" else min)(done, key=lambda t: t.values[k])
            lines.append(f"best proxy {name} ({d}): trial {pick.number} = {pick.values[k]:.4f}")
    if out.best_trial is not None and out.best_trial.number in out.heldout:
        h = out.heldout[out.best_trial.number]["objective"][0]
        lines.append(f"best held-out: trial {out.best_trial.number} = {h:.4f}")
    if out.spearman is not None:
        lines.append(f"proxy vs held-out Spearman: {out.spearman:.3f} ({len(out.heldout)} trials)")
    if out.pareto:
        lines.append(
            "Pareto front: "
            + ", ".join(f"#{t.number} {tuple(round(v, 4) for v in t.values)}" for t in out.pareto)
        )
    for split, scores in out.base.items():
        lines.append(f"base ({split}): " + ", ".join(f"{t} {v:.4f}" for t, v in scores.items()))
    return "\n".join(lines)


def summary(recipe: Recipe, limit: int = 6) -> str:
    """Short params text: per-model scalars and global scalars (lists shown as [k vals])."""
    st = recipe.final
    parts = [st.merge_method]

    def fmt(v: Any) -> str:
        return (
            f"{v:.3g}"
            if isinstance(v, float)
            else (f"[{len(v)}]" if isinstance(v, list) else str(v))
        )

    for name in list(st.models[0].parameters)[:limit] if st.models else []:
        parts.append(f"{name}=(" + ",".join(fmt(m.parameters.get(name)) for m in st.models) + ")")
    parts += [f"{k}={fmt(v)}" for k, v in st.parameters.items()]
    return " ".join(parts)


def trial_line(st: Any, number: int, recipe: Recipe | None, seconds: float) -> str:
    """`#12 COMPLETE ties weight=(...) | add 0.61 rev 0.40 | obj 0.647 | 3.2s | best #9 0.70`."""
    t = _get(st, number)
    state = trial_state(t)
    scores = " ".join(f"{k} {v:.3f}" for k, v in keys.proxy_scores(t.user_attrs).items())
    vals = " ".join(f"{v:.4f}" for v in (t.values or [])) if state == "COMPLETE" else ""
    what = summary(recipe) if recipe is not None else t.user_attrs.get(keys.FAIL_KIND, "")
    line = f"#{t.number} {state} {what} | {scores} | obj {vals or '-'} | {seconds:.1f}s"
    if t.user_attrs.get(keys.FAIL_REASON):
        line += f" | {t.user_attrs[keys.FAIL_REASON]}"
    top = ranked(st) if len(st.directions) == 1 else []
    return line + (f" | best #{top[0].number} {top[0].value:.4f}" if top else "")


def _get(st: Any, number: int) -> Any:
    for t in st.get_trials(deepcopy=False):
        if t.number == number:
            return t
    raise KeyError(number)
