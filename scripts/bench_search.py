"""Sample efficiency of evomerge's search on the tiny zoo: best held-out score vs budget.

    python scripts/bench_search.py                                            # 5 seeds, 10-80
    python scripts/bench_search.py --quick                                    # 2 seeds, 10/20
    python scripts/bench_search.py --configs gp,dirichlet --seeds 3 --budgets 10,20,40

Run from the repository root with the zoo built (`evomerge zoo`); the space is the demo's
(search_spaces/zoo_demo.yaml) unless --space says otherwise.

Design
- One search per (config, seed), in process (`run_search` with a fresh `LiveWorkbench`, a
  throwaway SQLite study, no end-of-search re-scoring). Configs: tpe, cmaes, gp, dirichlet
  without pruning (every trial scores the whole search split), and tpe+prune / gp+prune with
  the space's pruner and chunks (gp+prune is the demo's configuration). Every config gets the
  space's enqueued baselines (the demo's: uniform, each expert, defaults; they are the first
  trials of every run, so all configs start from the same points). On a space with free weights
  (no simplex) "dirichlet" is plain uniform random search.
- Cost is counted in documents scored (deterministic, immune to machine load) and in wall time
  (from the first trial's start to a trial's end: sampler, merge, eval and loop overhead).
  A budget of k means the cost of k full trials (k x the search split): for unpruned configs
  that is exactly the first k trials; pruned configs run until they have spent the largest
  budget's documents, so every config is compared at equal cost.
- Smaller budgets are prefixes of one run: a trial's proposal depends only on the trials before
  it (sampler seed and history), never on the total budget, for tpe, cmaes, gp, dirichlet and
  the median pruner alike (tests/test_bench_search.py checks the samplers on a fake workbench).
- At budget k the pick is the COMPLETE trial with the best search-split objective among the
  trials within the budget (ties: the earlier trial): chosen on the search split, and its score
  is that trial's objective on the held-out test part (documents neither the search nor any
  choice saw; the same part the card and `evomerge status` report, so the figures compare).
  Held-out scores are computed only for trials that
  were the running best at some point (cached on the study), which covers every budget and the
  cost curves.
- Pruning: the cost at which the pruned config's mean (over seeds) best held-out first reaches
  the unpruned config's mean at budget k, as a fraction of the unpruned cost at k.
- Trials per hour of the demo configuration (gp+prune): trials over wall time for the first
  `search.n_trials` trials of each gp+prune run.
Results go to --out (JSON; one record per (config, seed), saved as each run finishes, so a rerun
skips finished runs whose space file is unchanged) and a markdown summary beside it.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIGS = {  # name -> (sampler, prune)
    "tpe": ("tpe", False),
    "cmaes": ("cmaes", False),
    "gp": ("gp", False),
    "dirichlet": ("dirichlet", False),
    "tpe+prune": ("tpe", True),
    "gp+prune": ("gp", True),
}
REFERENCE = "dirichlet"
PRUNE_PAIRS = (("tpe+prune", "tpe"), ("gp+prune", "gp"))
TESTED_ON = "held-out test part"
TRIAL_CAP = 6  # a pruned run stops after TRIAL_CAP x the largest budget trials at the latest

Trial = dict[str, Any]  # {"n", "state", "value", "docs", "t", "baseline"}
Run = dict[str, Any]  # {"config", "seed", "trials", "heldout", "full_docs", ...}


# ---- pure functions on trial lists (tested in tests/test_bench_search.py) ----


def cumulative_docs(trials: Sequence[Trial]) -> list[int]:
    out, total = [], 0
    for t in trials:
        total += int(t["docs"])
        out.append(total)
    return out


def within_budget(trials: Sequence[Trial], limit_docs: float) -> int:
    """How many leading trials fit in `limit_docs` documents."""
    return bisect.bisect_right(cumulative_docs(trials), limit_docs + 1e-9)


def best_trial(trials: Sequence[Trial]) -> int | None:
    """Number of the COMPLETE trial with the highest search value (ties: the earlier)."""
    best: Trial | None = None
    for t in trials:
        if t["state"] == "COMPLETE" and (best is None or t["value"] > best["value"]):
            best = t
    return None if best is None else int(best["n"])


def running_best(trials: Sequence[Trial]) -> list[tuple[int, int]]:
    """(index, trial number) each time the best COMPLETE trial so far changes."""
    out: list[tuple[int, int]] = []
    for i in range(len(trials)):
        b = best_trial(trials[: i + 1])
        if b is not None and (not out or out[-1][1] != b):
            out.append((i, b))
    return out


def best_at_budgets(run: Run, budgets: Sequence[int]) -> dict[int, int | None]:
    """Budget k (in full trials) -> the trial picked after spending k x full_docs documents."""
    trials = run["trials"]
    return {k: best_trial(trials[: within_budget(trials, k * run["full_docs"])]) for k in budgets}


def cost_curve(run: Run, cost: str) -> list[tuple[float, float]]:
    """Step function (cost, held-out of the current pick); cost "docs" or "time" (seconds)."""
    trials, held = run["trials"], run["heldout"]
    costs = cumulative_docs(trials) if cost == "docs" else [t["t"] for t in trials]
    return [(float(costs[i]), float(held[str(n)])) for i, n in running_best(trials)]


def value_at(curve: Sequence[tuple[float, float]], c: float) -> float | None:
    i = bisect.bisect_right([p[0] for p in curve], c + 1e-9)
    return curve[i - 1][1] if i else None


def first_reach(curves: Sequence[Sequence[tuple[float, float]]], target: float) -> float | None:
    """Smallest cost at which the mean over runs of the step functions reaches `target`."""
    for c in sorted({p[0] for cv in curves for p in cv}):
        vals = [v for v in (value_at(cv, c) for cv in curves) if v is not None]
        if len(vals) == len(curves) and statistics.fmean(vals) >= target - 1e-12:
            return c
    return None


def cost_at(run: Run, k: int, cost: str) -> float:
    """Cost of the first k trials (the unpruned runs' cost of budget k)."""
    trials = run["trials"][:k]
    return float(cumulative_docs(trials)[-1] if cost == "docs" else trials[-1]["t"])


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def budget_scores(runs: Sequence[Run], budgets: Sequence[int]) -> dict[int, list[float]]:
    """Budget -> best held-out objective per run (runs in seed order)."""
    out: dict[int, list[float]] = {k: [] for k in budgets}
    for run in runs:
        for k, n in best_at_budgets(run, budgets).items():
            out[k].append(float(run["heldout"][str(n)]) if n is not None else float("nan"))
    return out


def win_counts(mine: Sequence[float], ref: Sequence[float]) -> tuple[int, int, int]:
    """(wins, ties, losses) seed by seed."""
    pairs = list(zip(mine, ref, strict=True))
    return (
        sum(a > b + 1e-12 for a, b in pairs),
        sum(abs(a - b) <= 1e-12 for a, b in pairs),
        sum(a < b - 1e-12 for a, b in pairs),
    )


def pruning_fraction(
    pruned: Sequence[Run], plain: Sequence[Run], k: int, cost: str
) -> tuple[float, float | None]:
    """(target held-out, cost fraction): the pruned config's mean best held-out first reaches
    the plain config's mean at budget k at this fraction of the plain config's cost at k."""
    target = statistics.fmean(budget_scores(plain, [k])[k])
    reach = first_reach([cost_curve(r, cost) for r in pruned], target)
    ref = statistics.fmean(cost_at(r, k, cost) for r in plain)
    return target, (None if reach is None else reach / ref)


def trials_per_hour(run: Run, n: int) -> float:
    trials = run["trials"][:n]
    return 3600.0 * len(trials) / trials[-1]["t"]


# ---- running the searches ----


def study_trials(study: Any) -> list[Trial]:
    """The trials that count toward the budget, in order, as plain records."""
    from evomerge.search.study import counts_toward_budget, trial_state

    done = sorted(
        (t for t in study.get_trials(deepcopy=False) if counts_toward_budget(t)),
        key=lambda t: t.number,
    )
    t0 = done[0].datetime_start if done else None
    return [
        {
            "n": t.number,
            "state": trial_state(t),
            "value": t.value if trial_state(t) == "COMPLETE" else None,
            "docs": int(t.user_attrs.get("docs_scored", 0)),
            "t": (t.datetime_complete - t0).total_seconds(),
            "baseline": t.user_attrs.get("baseline", ""),
        }
        for t in done
    ]


def run_one(space_path: Path, config: str, seed: int, max_budget: int) -> Run:
    from evomerge.loop.heldout import score_heldout
    from evomerge.loop.run import run_search
    from evomerge.loop.workbench import LiveWorkbench
    from evomerge.search import keys
    from evomerge.search.objective import Objectives
    from evomerge.search.space import SearchSpace
    from evomerge.search.study import DocsBudget

    sampler, prune = CONFIGS[config]
    space = SearchSpace.from_yaml(space_path)
    wb = LiveWorkbench.from_space(space)
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_search_") as tmp:
        out = run_search(
            space_path,
            study=f"bench_{config.replace('+', '_')}_{seed}",
            n_trials=TRIAL_CAP * max_budget if prune else max_budget,
            sampler=sampler,
            seed=seed,
            results=tmp,
            prune=prune,
            workbench=wb,
            quiet=True,
            rescore=False,
            stop=DocsBudget(max_budget) if prune else None,
        )
        trials = study_trials(out.study)
        obj = Objectives.build(space.spec.objectives, wb.higher_is_better, space.spec.max_drop)
        by_number = {t.number: t for t in out.study.get_trials(deepcopy=False)}
        picks = [by_number[n] for _, n in running_best(trials)]
        held = score_heldout(out.study, space, wb, obj, picks)
    return {
        "config": config,
        "seed": seed,
        "trials": trials,
        # the test part (the whole held-out split when a task has under 2 held-out documents)
        "heldout": {
            str(t.number): keys.heldout_part(held[t.number], "test")["objective"][0] for t in picks
        },
        "chosen_on": "search split (proxy)",
        "tested_on": TESTED_ON,
        "full_docs": max(t["docs"] for t in trials if t["state"] == "COMPLETE"),
        "max_budget": max_budget,
        "load_start": load0,
        "load_end": os.getloadavg()[0],
    }


def load_results(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {"runs": {}}


def save_results(path: Path, data: dict[str, Any]) -> None:
    from evomerge.search.results import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(data, indent=1) + "\n")


def run_all(args: argparse.Namespace, space_sha: str) -> dict[str, list[Run]]:
    data = load_results(args.out)
    max_budget = max(args.budgets)
    for seed in range(0 if args.report else args.seeds):  # seed-major: a cut-short run
        for config in args.configs:  # still pairs the configs
            key = f"{config}:{seed}"
            old = data["runs"].get(key)
            # a record from before the held-out selection/test split scored the whole held-out
            # split: it is rerun, not mixed with test-part scores
            fresh = old and old.get("tested_on") == TESTED_ON and old.get("space_sha") == space_sha
            if fresh and old["max_budget"] >= max_budget:
                continue
            t0 = time.time()
            run = run_one(args.space, config, seed, max_budget) | {"space_sha": space_sha}
            data["runs"][key] = run
            save_results(args.out, data)
            print(
                f"{key}: {len(run['trials'])} trials in {time.time() - t0:.0f} s, load "
                f"{run['load_start']:.2f}->{run['load_end']:.2f}",
                file=sys.stderr,
            )
    seeds = [s for s in range(args.seeds) if all(f"{c}:{s}" in data["runs"] for c in args.configs)]
    if not seeds:
        raise SystemExit(f"{args.out}: no seed has finished runs of every config yet")
    return {c: [data["runs"][f"{c}:{s}"] for s in seeds] for c in args.configs}


# ---- report ----


def score_table(runs: dict[str, list[Run]], budgets: Sequence[int]) -> list[str]:
    ref = budget_scores(runs[REFERENCE], budgets) if REFERENCE in runs else None
    head = "| config | " + " | ".join(f"{k}" for k in budgets) + " |"
    lines = [head, "|---" * (len(budgets) + 1) + "|"]
    for config, rs in runs.items():
        scores = budget_scores(rs, budgets)
        cells = []
        for k in budgets:
            m, s = mean_std(scores[k])
            cell = f"{100 * m:.1f} ± {100 * s:.1f}"
            if ref is not None and config != REFERENCE:
                cell += " ({}/{}/{})".format(*win_counts(scores[k], ref[k]))
            cells.append(cell)
        lines.append(f"| {config} | " + " | ".join(cells) + " |")
    return lines


def pruning_lines(runs: dict[str, list[Run]], budgets: Sequence[int]) -> list[str]:
    lines = []
    for pruned, plain in PRUNE_PAIRS:
        if pruned not in runs or plain not in runs:
            continue
        for k in sorted({max(budgets), sorted(budgets)[len(budgets) // 2]}):
            parts = []
            for cost in ("docs", "time"):
                target, frac = pruning_fraction(runs[pruned], runs[plain], k, cost)
                parts.append(f"{cost} {'not reached' if frac is None else f'{frac:.2f}'}")
            lines.append(
                f"- {pruned} reaches {plain}@{k} ({100 * target:.1f}) at this fraction of "
                f"{plain}'s cost: " + ", ".join(parts)
            )
    return lines


def speed_lines(runs: dict[str, list[Run]], n_demo: int) -> list[str]:
    lines = []
    for config, rs in runs.items():
        n = min(n_demo, *(len(r["trials"]) for r in rs))
        tph = [trials_per_hour(r, n) for r in rs]
        m, s = mean_std(tph)
        loads = [x for r in rs for x in (r["load_start"], r["load_end"])]
        lines.append(
            f"- {config}: {m:.0f} ± {s:.0f} trials/hour over the first {n} trials "
            f"(load average {min(loads):.2f}-{max(loads):.2f})"
        )
    return lines


def report(runs: dict[str, list[Run]], budgets: Sequence[int], n_demo: int) -> str:
    n_seeds = len(next(iter(runs.values())))
    return "\n".join(
        [
            f"Best held-out objective (points, mean ± std over {n_seeds} seeds) at budget k "
            "(cost of k full trials); (wins/ties/losses vs dirichlet, seed by seed):",
            "",
            *score_table(runs, budgets),
            "",
            "Pruning (cost fraction; < 0.5 means the same quality in under half the cost):",
            *pruning_lines(runs, budgets),
            "",
            "Speed (the demo configuration is gp+prune):",
            *speed_lines(runs, n_demo),
        ]
    )


DOCUMENTED = {"seeds": 5, "budgets": [10, 20, 40, 80], "configs": list(CONFIGS)}


def write_md(args: argparse.Namespace, text_report: str, n_seeds: int) -> None:
    """The summary beside --out: date, machine, versions, and the size reported (the seeds
    with every config finished) against the documented one (a reduced run says so)."""
    import importlib.metadata

    sys.path.insert(0, str(REPO / "scripts"))
    from bench_report import environment

    env = environment(optuna=importlib.metadata.version("optuna"))
    size = {"seeds": n_seeds, "budgets": args.budgets, "configs": args.configs}
    note = "documented size" if size == DOCUMENTED else f"reduced from {DOCUMENTED}"
    cmd = (
        f"python scripts/bench_search.py --seeds {n_seeds} "
        f"--budgets {','.join(map(str, args.budgets))} --configs {','.join(args.configs)}"
    )
    lines = [
        f"# Search benchmark ({args.space.name})",
        "",
        *(f"- {k}: {v}" for k, v in env.items()),
        f"- size: {size} ({note})",
        "",
        f"`{cmd}`",
        "",
        text_report,
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", type=Path, default=REPO / "search_spaces" / "zoo_demo.yaml")
    ap.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 5)")
    ap.add_argument("--budgets", default=None, help="default 10,20,40,80")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"of {', '.join(CONFIGS)}")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "search.json")
    ap.add_argument("--quick", action="store_true", help="defaults 2 seeds, budgets 10,20")
    ap.add_argument("--report", action="store_true", help="no new runs: report the seeds done")
    args = ap.parse_args(argv)
    if args.quick and args.out == ap.get_default("out"):
        args.out = args.out.with_name("search_quick.json")
    args.seeds = args.seeds or (2 if args.quick else 5)
    args.budgets = args.budgets or ("10,20" if args.quick else "10,20,40,80")
    args.budgets = sorted(int(b) for b in args.budgets.split(","))
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown or args.seeds < 1 or args.budgets[0] < 1:
        ap.error(f"bad --configs {unknown} / --seeds / --budgets (configs: {', '.join(CONFIGS)})")
    args.space, args.out = args.space.resolve(), args.out.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    import yaml

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    os.chdir(REPO)  # the space's model and task paths are relative to the repository root
    text = args.space.read_text()
    space_sha = hashlib.sha256(text.encode()).hexdigest()[:16]
    runs = run_all(args, space_sha)
    n_demo = int((yaml.safe_load(text).get("search") or {}).get("n_trials", 40))
    text_report = report(runs, args.budgets, n_demo)
    print(text_report)
    write_md(args, text_report, len(next(iter(runs.values()))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
