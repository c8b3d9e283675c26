"""What export reads from a finished study: the trial to export, its recipe as scored, the
scores of the winner and the baselines, and the search summary for the card.

Where the search stores things is documented in evomerge/search/results.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import ConfigError, did_you_mean
from evomerge.export.card import ScoreRow, SearchSummary
from evomerge.search import keys
from evomerge.search.study import trial_state

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

    from evomerge.recipe import MergeStage, Recipe
    from evomerge.search.results import SearchOutcome


def check_study_dir(study_dir: Path) -> None:
    """ConfigError for a missing study folder, with the study folders next to it as hints."""
    if study_dir.is_dir():
        return
    parent = study_dir.parent if str(study_dir.parent) else Path(".")
    siblings = sorted(p.name for p in parent.glob("*") if p.is_dir() and _is_study(p))
    if siblings:
        hint = did_you_mean(study_dir.name, siblings, "study folder")
        raise ConfigError(f"study folder '{study_dir}' not found: {hint}")
    raise ConfigError(f"study folder '{study_dir}' not found (run `evomerge search` first)")


def _is_study(p: Path) -> bool:
    return any((p / f).is_file() for f in ("search.json", "study.db", "journal.log"))


def pick_trial(outcome: SearchOutcome, number: int | None) -> FrozenTrial:
    """The trial to export: `number`, or the best held-out one; must be COMPLETE."""
    best = outcome.best_trial
    complete = sorted(t.number for t in outcome.top_trials)
    valid = ", ".join(map(str, complete)) or "none"
    best_txt = f"; best held-out: {best.number}" if best is not None else ""
    if number is None:
        if best is None:
            raise ConfigError(f"study '{outcome.study_name}' has no COMPLETE trial to export")
        return best
    trials = {t.number: t for t in outcome.study.get_trials(deepcopy=False)}
    if number not in trials:
        raise ConfigError(
            f"--trial {number}: no such trial in study '{outcome.study_name}'. "
            f"Did you mean one of the COMPLETE trials: {valid}{best_txt}?"
        )
    trial = trials[number]
    if trial_state(trial) != "COMPLETE":
        raise ConfigError(
            f"--trial {number}: expected a COMPLETE trial, but it is {trial_state(trial)}. "
            f"COMPLETE trials: {valid}{best_txt}"
        )
    return trial


def pick_note(outcome: SearchOutcome, trial: FrozenTrial, number: int | None) -> str | None:
    """What the export says about its choice: the default pick and why (always for several
    objectives: a front has many points), or how an explicit --trial relates to the front
    and the constraint."""
    from evomerge.search.results import feasible, pick_reason

    multi = len(outcome.directions) > 1
    if number is None:
        return f"exported {pick_reason(outcome)}" if multi or not feasible(trial) else None
    front = {t.number for t in outcome.pareto}
    if not feasible(trial):
        return f"trial {number} does not meet the constraint (max_drop)"
    if multi and number not in front:
        return f"trial {number} is not on the Pareto front ({', '.join(f'#{n}' for n in front)})"
    return None


def scored_recipe(outcome: SearchOutcome, trial: FrozenTrial) -> Recipe:
    """The recipe the search scored for `trial` (its stored YAML, else decoded from its params),
    with the random_seed the candidate used written out (CandidateMerger's default is 0)."""
    from evomerge.recipe import load_recipe

    text = trial.user_attrs.get(keys.RECIPE)
    recipe = load_recipe(text) if text else outcome.space.decode(trial.params)
    for stage in recipe.stages:
        if stage.random_seed is None:
            stage.random_seed = 0
    return recipe


def num_layers(outcome: SearchOutcome, stage: MergeStage) -> int:
    """Layer count for gradient positions: the space's, else the base's config (as the loop),
    else 1 (a config that does not say has no layer groups to spread a gradient over)."""
    from evomerge.common.model_dir import num_layers as config_layers
    from evomerge.merge.io import open_checkpoint

    if outcome.space.spec.num_layers:
        return int(outcome.space.spec.num_layers)
    ref = stage.base_model or stage.models[0].model
    with open_checkpoint(ref) as reader:
        n = config_layers(reader.config)
    return 1 if n is None else n


def task_list(outcome: SearchOutcome, trial: FrozenTrial) -> list[str]:
    names = list(getattr(outcome.space.spec, "task_names", None) or [])
    proxy = list(keys.proxy_scores(trial.user_attrs))
    return names if names and set(proxy) <= set(names) else sorted(proxy)


def _proxy(trial: FrozenTrial) -> dict[str, float]:
    return {task: float(v) for task, v in keys.proxy_scores(trial.user_attrs).items()}


def _baseline_label(label: str) -> str:
    """`uniform:ties` -> `uniform merge (ties)`; `expert:math:ties` -> `math alone`."""
    parts = label.split(":")
    if parts[0] == "uniform":
        return f"uniform merge ({parts[-1]})"
    if parts[0] == "expert" and len(parts) >= 2:
        return f"{parts[1]} alone"
    if parts[0] == "defaults":
        return f"method defaults ({parts[-1]})"
    return label


def _test(outcome: SearchOutcome, number: int) -> dict[str, float]:
    """A trial's held-out "test" part scores per task (the whole held-out split for a study
    without parts; {} when not re-scored)."""
    entry = outcome.heldout.get(number)
    return dict(keys.heldout_part(entry, "test")["tasks"]) if entry else {}


def score_rows(outcome: SearchOutcome, trial: FrozenTrial) -> list[ScoreRow]:
    """Winner first, then the base model, then every baseline trial (uniform, each expert...);
    held-out columns: the test part, which chose nothing (search_summary says so)."""
    rows = [ScoreRow(f"this merge (trial {trial.number})", _proxy(trial),
                     _test(outcome, trial.number))]  # fmt: skip
    if outcome.base:
        base_test = outcome.base.get("test", outcome.base.get("heldout", {}))
        rows.append(ScoreRow("base model", dict(outcome.base.get("search", {})),
                             dict(base_test)))  # fmt: skip
    for t in outcome.study.get_trials(deepcopy=False):
        label = t.user_attrs.get(keys.BASELINE)
        state = trial_state(t)
        if not label or t.number == trial.number or state not in ("COMPLETE", "PRUNED"):
            continue
        pruned = " (pruned: search score partial)" if state == "PRUNED" else ""
        name = _baseline_label(str(label)) + pruned
        rows.append(ScoreRow(name, _proxy(t), _test(outcome, t.number)))
    return rows


def chosen_tested(outcome: SearchOutcome, trial: FrozenTrial) -> tuple[str, str]:
    """(which documents chose the exported trial, which tested it) for the card."""
    entry = outcome.heldout.get(trial.number)
    best = outcome.best_trial
    default = best is not None and best.number == trial.number
    chosen = "the held-out selection part" if entry is not None else "the search split (proxy)"
    if not default:
        chosen = f"--trial {trial.number} (chosen by hand)"
    if entry is None:
        return chosen, ""
    if not keys.has_parts(entry):
        return chosen.replace("selection part", "split"), (
            "the held-out split; this study predates the held-out selection/test parts, so its "
            "held-out score was also used for selection (optimistic)"
        )
    counts = _part_counts(outcome)
    return chosen + counts.get("select", ""), (
        "the held-out test part" + counts.get("test", "") + ", which chose nothing"
    )


def _part_counts(outcome: SearchOutcome) -> dict[str, str]:
    """{"select": " (N documents)", "test": ...} from the study's doc_ids record."""
    from evomerge.search.doc_ids import expand_ids

    ids = outcome.study.user_attrs.get(keys.DOC_IDS) or {}
    out = {}
    for part in keys.PARTS:
        texts = [v.get(part) for v in ids.values() if isinstance(v, dict)]
        if texts and all(isinstance(x, str) for x in texts):
            n = sum(len(expand_ids(x)) for x in texts)
            out[part] = f" ({n} documents over {len(texts)} tasks)"
    return out


def search_summary(outcome: SearchOutcome, trial: FrozenTrial) -> SearchSummary:
    trials = outcome.study.get_trials(deepcopy=False)
    states = [trial_state(t) for t in trials]
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    wall = (max(ends) - min(starts)).total_seconds() if starts and ends else None
    attrs = outcome.study.user_attrs
    names = outcome.objective_names or ["objective"]
    chosen, tested = chosen_tested(outcome, trial)
    return SearchSummary(
        study=outcome.study_name,
        trial=trial.number,
        sampler=attrs.get(keys.SAMPLER),
        seed=attrs.get(keys.SEED),
        n_trials=len(trials),
        n_complete=states.count("COMPLETE"),
        n_pruned=states.count("PRUNED"),
        n_failed=states.count("FAIL"),
        wall_time_s=wall,
        objectives=[f"{d} {n}" for d, n in zip(outcome.directions, names, strict=False)],
        chosen_on=chosen,
        tested_on=tested,
    )


def study_provenance(outcome: SearchOutcome, trial: FrozenTrial, tasks: list[str]) -> dict:
    """The study facts of the provenance block (sources and versions are added by export)."""
    attrs = outcome.study.user_attrs
    out: dict[str, Any] = {
        "study": outcome.study_name,
        "trial": trial.number,
        "sampler": attrs.get(keys.SAMPLER),
        "seed": attrs.get(keys.SEED),
        "objectives": dict(zip(outcome.objective_names, outcome.directions, strict=False)),
        "tasks": tasks,
    }
    doc_ids = attrs.get(keys.DOC_IDS)
    if doc_ids:
        out["doc_ids"] = doc_ids  # {task: {search: "0-63,...", heldout: "..."}}
    return {k: v for k, v in out.items() if v is not None}


def recipe_values(stage: MergeStage) -> dict[str, float]:
    """Flat numeric view of a stage's parameters for plots: `weight[model]`, gradient runs as
    `weight[model][L0-3]`, filter entries as `density[model][mlp]`."""
    out: dict[str, float] = {}
    for m in stage.models:
        label = Path(str(m.model.path).rstrip("/")).name or str(m.model)
        for name, value in m.parameters.items():
            _flatten(out, f"{name}[{label}]", value)
    for name, value in stage.parameters.items():
        _flatten(out, name, value)
    return out


def _flatten(out: dict[str, float], key: str, value: Any) -> None:
    from evomerge.recipe import FilterEntry

    if isinstance(value, bool) or isinstance(value, str):
        return
    if isinstance(value, (int, float)):
        out[key] = float(value)
        return
    if value and isinstance(value[0], FilterEntry):
        for e in value:
            _flatten(out, f"{key}[{e.filter or '*'}]", e.value)
        return
    start = 0
    for i in range(1, len(value) + 1):  # runs of equal values (layer groups) -> one bar
        if i == len(value) or value[i] != value[start]:
            out[f"{key}[L{start}-{i - 1}]" if i - 1 > start else f"{key}[L{start}]"] = float(
                value[start]
            )
            start = i
