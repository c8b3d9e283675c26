"""`evomerge demo`: zoo -> seeded search (pruning on) -> held-out re-scoring -> export -> table.

The closing table compares, on the held-out test part (documents neither the search nor the
choice of a winner saw; the winners are chosen on the held-out selection part): the base, each
expert alone, the uniform merge, the best of Dirichlet random search at the same budget, and the
winner.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError

DEMO_TRIALS = 40  # budget: the documents of this many full evaluations, for both searches
TRIAL_CAP = 4  # the pruned search stops after TRIAL_CAP x DEMO_TRIALS trials at the latest
SPACE = Path(__file__).resolve().parent.parent / "search_spaces" / "zoo_demo.yaml"


@dataclass
class Row:
    name: str
    scores: dict[str, float]


def _space_file(zoo: Path, results: Path) -> Path:
    """The demo space, with its zoo paths pointed at `zoo` (the shipped file uses `zoo/`)."""
    if not SPACE.is_file():
        raise ConfigError(f"demo: the search space {SPACE.name} is missing from search_spaces/")
    if zoo.resolve() == Path("zoo").resolve():
        # relative when possible: the path is recorded in results/demo (no machine paths)
        return Path(os.path.relpath(SPACE)) if SPACE.is_relative_to(Path.cwd()) else SPACE
    text = SPACE.read_text().replace("zoo/", f"{zoo.as_posix().rstrip('/')}/")
    out = results / ".demo_space.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out


def _heldout(wb: object, recipe: object) -> dict[str, float]:
    """The recipe's scores on the held-out test part (the documents no choice was made on)."""
    from evomerge.loop.heldout import heldout_entry
    from evomerge.search import keys

    res = wb.evaluate(recipe, "heldout")  # type: ignore[attr-defined]
    return dict(keys.heldout_part(heldout_entry(res.per_example, None), "test")["tasks"])


def _test_scores(entry: dict | None) -> dict[str, float]:
    from evomerge.search import keys

    return dict(keys.heldout_part(entry, "test")["tasks"]) if entry else {}


def _best_heldout(outcome: object) -> dict[str, float]:
    """The winner's held-out test part scores (it was chosen on the selection part)."""
    best = outcome.best_trial  # type: ignore[attr-defined]
    return _test_scores(outcome.heldout.get(best.number) if best is not None else None)  # type: ignore[attr-defined]


def format_table(rows: list[Row], tasks: list[str]) -> str:
    """Plain-text table: one row per model, one column per task plus the mean (in points)."""
    head = ["model", *tasks, "mean"]
    lines = []
    for r in rows:
        vals = [r.scores.get(t) for t in tasks]
        known = [v for v in vals if v is not None]
        mean = sum(known) / len(known) if known else None
        cells = [r.name, *(f"{100 * v:.1f}" if v is not None else "-" for v in [*vals, mean])]
        lines.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*head), *(fmt.format(*c) for c in lines)])


def run_demo(
    results: Path, zoo: Path, n_trials: int | None, seed: int, backend: str = "hf"
) -> list[Row]:
    from evomerge.export.run import export_study
    from evomerge.loop.run import run_search
    from evomerge.loop.workbench import LiveWorkbench
    from evomerge.search import keys
    from evomerge.search.baselines import baseline_trials
    from evomerge.search.space import SearchSpace
    from evomerge.search.study import DocsBudget, counts_toward_budget
    from evomerge.zoo.build import build_zoo

    t0 = time.time()
    print("[1/5] zoo: building (or reusing) the tiny offline model zoo", file=sys.stderr)
    build_zoo(zoo, mlp=False)  # the MLP experts serve `evomerge moe` only
    space_path = _space_file(zoo, results)
    space = SearchSpace.from_yaml(space_path)
    budget = n_trials or DEMO_TRIALS

    # one live model for both studies (a vLLM engine is costly to start): the second study
    # gets the base put back first, since each study scores the base before merging
    wb = LiveWorkbench.from_space(space, backend=backend, device="cpu")
    sampler = space.default_sampler()
    print(
        f"[2/5] search: {sampler} with pruning, for the documents of {budget} full evaluations",
        file=sys.stderr,
    )
    # equal budgets in documents scored: a pruned trial costs only what it scored, so the
    # search runs more (cheaper) trials than the random baseline's `budget` full ones
    common = dict(seed=seed, results=results)
    main = run_search(
        space_path, study="demo", n_trials=TRIAL_CAP * budget, prune=True, workbench=wb,
        stop=DocsBudget(budget), **common,
    )  # fmt: skip
    print(f"[3/5] baseline: Dirichlet random search, {budget} full trials", file=sys.stderr)
    rand = run_search(
        space_path, study="demo_dirichlet", n_trials=budget, sampler="dirichlet", prune=False,
        quiet=True, workbench=_base_restored(wb), **common,
    )  # fmt: skip
    print("[4/5] held-out scores of the base, each expert and the uniform merge", file=sys.stderr)
    rows = [Row("base", dict(main.base.get("test", main.base.get("heldout", {}))))]
    trials = {t.user_attrs.get(keys.BASELINE): t for t in main.study.get_trials(deepcopy=False)}
    for label, params in baseline_trials(space):
        kind = label.split(":")[0]
        if kind in ("expert", "uniform"):
            name = label.split(":")[1] if kind == "expert" else "uniform merge"
            done = main.heldout.get(trials[label].number) if label in trials else None
            # baselines were re-scored on held-out at the end of the search; reuse those
            scores = _test_scores(done) if done else _heldout(wb, space.decode(params))
            rows.append(Row(name, scores))
    rows.append(Row(f"dirichlet random (best of {budget})", _best_heldout(rand)))
    n_main = sum(counts_toward_budget(t) for t in main.study.get_trials(deepcopy=False))
    rows.append(Row(f"evomerge {sampler} ({n_main} trials, winner)", _best_heldout(main)))
    print("[5/5] export: recipe, checkpoint, card, plots", file=sys.stderr)
    export_dir = export_study(results / "demo", out=results / "demo" / "export").out_dir
    tasks = list(wb.task_names)
    table = format_table(rows, tasks)
    summary = {
        "tasks": tasks,
        "rows": [r.__dict__ for r in rows],
        "n_trials": budget,
        "seed": seed,
        "wall_s": round(time.time() - t0, 1),
        "scored_on": "held-out test part",
        "winners_chosen_on": "held-out selection part (disjoint from the test part)",
        "proxy_spearman": {
            "top_trials": [main.spearman, main.spearman_n],
            "seeded_sample_of_all_complete": [main.fidelity, main.fidelity_n],
        },
    }
    (results / "demo" / "demo_table.json").write_text(json.dumps(summary, indent=2) + "\n")
    (results / "demo" / "demo_table.txt").write_text(table + "\n")
    print(
        "\nHeld-out test part scores (points): neither the search nor the choice of a winner "
        "saw these documents; the winners were chosen on the held-out selection part\n" + table
    )
    print(f"\nexported to {export_dir}; whole demo {time.time() - t0:.0f} s")
    return rows


def _base_restored(wb: Any) -> Any:
    wb.restore_base()
    return wb


def cli_demo(args: argparse.Namespace) -> int:
    if args.n_trials is not None and args.n_trials < 1:
        raise ConfigError(f"--n-trials: expected a positive integer, but got {args.n_trials}")
    run_demo(Path(args.results), Path(args.zoo), args.n_trials, int(args.seed), args.backend)
    return 0
