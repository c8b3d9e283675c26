"""Does layer-stacking search beat weight search alone at equal evaluation budget? (#23)

    nice -n 10 python scripts/bench_stacking.py                 # 5 seeds, the default arms
    python scripts/bench_stacking.py --seeds 2 --n-trials 8     # a quick look
    python scripts/bench_stacking.py --report                   # table of the runs done

Run from the repository root with the zoo built (`evomerge zoo`: the depth experts under
zoo/depth/, whose skills live in different halves of the layers; evomerge/zoo/build.py).

Design
- Arms (search_spaces/zoo_depth_*.yaml): `weights`, task-arithmetic weights over the four depth
  experts with the weight space's default sampler (gp); `weights-tpe`, the same space with the
  stacking spaces' sampler (tpe), so a difference is not just the sampler's; `hybrid`, the same
  weight genome plus a layer-stacking genome whose positions take a layer of an expert or of the
  weight-merged candidate (tpe, the stacking default); `stack-only`, stacking over the experts
  alone. The three files differ only in the genome: tasks, chunks, pruner, baselines are equal.
- Equal evaluation budget: every arm gets the same --n-trials (the enqueued baselines are the
  first of them: uniform, each expert, defaults; in `hybrid` they stack the weight merge's own
  4 layers, so they are the same models as in `weights`), the same chunks and successive-halving
  pruner; the documents each arm actually scored are reported beside the scores.
- Each run is the real CLI, `evomerge search SPACE --study ... --seed S --n-trials N`, in a
  throwaway results folder; its winner is what `evomerge status` / export pick (best on the
  held-out *selection* part) and its score is the held-out *test* part (documents that neither
  the search nor the choice saw), read with evomerge.search.results.load_study_outcome.
- Baselines on the same test part, from the `weights` runs: the base, the uniform merge and the
  best single expert (the expert with the best test mean; an upper bound for "pick one").
Results: --out (JSON, one record per arm and seed, saved as each finishes; a rerun skips runs
whose space file and size are unchanged) and a markdown summary beside it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SPACES = REPO / "search_spaces"
ARMS: dict[str, tuple[str, str | None]] = {  # name -> (space file, --sampler or the space's)
    "weights": ("zoo_depth_weights.yaml", None),
    "weights-tpe": ("zoo_depth_weights.yaml", "tpe"),
    "hybrid": ("zoo_depth_stacking.yaml", None),
    "stack-only": ("zoo_depth_stack_only.yaml", None),
}
REFERENCE = "weights"  # the peer of every paired difference
BASELINES = "baselines"  # the run that re-scores the enqueued baselines (see run_one)
N_BASELINES = 6  # uniform, 4 experts, defaults
STACKING = "hybrid"  # the ratio line: STACKING mean / REFERENCE mean

Run = dict[str, Any]


# ---- pure functions on the records ----


def mean_sd(xs: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def paired(mine: Sequence[float], ref: Sequence[float]) -> dict[str, Any]:
    """Seed-by-seed differences mine - ref: mean, sd, and (wins, ties, losses)."""
    d = [a - b for a, b in zip(mine, ref, strict=True)]
    m, s = mean_sd(d)
    wtl = (sum(x > 1e-9 for x in d), sum(abs(x) <= 1e-9 for x in d), sum(x < -1e-9 for x in d))
    return {"diffs": d, "mean": m, "sd": s, "wins_ties_losses": wtl}


def baseline_scores(run: Run) -> dict[str, float]:
    """{label: test objective} of a run's re-scored baselines, plus `base`."""
    out = {"base": run["base_test"]} if run.get("base_test") is not None else {}
    return out | run["baselines"]


# ---- one run through the CLI ----


def study_record(study_dir: Path) -> dict[str, Any]:
    """Winner (chosen on the held-out selection part), its test-part score, the baselines'
    test scores and the budget spent, from a finished study."""
    from evomerge.search import keys
    from evomerge.search.results import load_study_outcome
    from evomerge.search.study import trial_state

    out = load_study_outcome(study_dir)
    best = out.best_trial
    entry = out.heldout[best.number]
    test, select = keys.heldout_part(entry, "test"), keys.heldout_part(entry, "select")
    trials = out.study.get_trials(deepcopy=False)
    states = [trial_state(t) for t in trials]
    baselines = {}
    for t in trials:
        label = t.user_attrs.get(keys.BASELINE)
        if label and t.number in out.heldout:
            part = keys.heldout_part(out.heldout[t.number], "test")
            baselines[label] = float(part["objective"][0])
    base = out.base.get("test")
    return {
        "winner": best.number,
        "winner_baseline": best.user_attrs.get(keys.BASELINE, ""),
        "winner_params": dict(best.params),
        "winner_recipe": best.user_attrs.get(keys.RECIPE, ""),
        "test": float(test["objective"][0]),
        "test_tasks": dict(test["tasks"]),
        "select": float(select["objective"][0]),
        "proxy": float(best.values[0]),
        "baselines": baselines,
        "base_test": None if base is None else statistics.fmean(base.values()),
        "docs": sum(int(t.user_attrs.get(keys.DOCS_SCORED, 0)) for t in trials),
        "states": {s: states.count(s) for s in sorted(set(states))},
        "spearman_top": out.spearman,
    }


def run_one(arm: str, seed: int, n_trials: int) -> Run:
    """One search of `arm` through the CLI; arm BASELINES: the weight space's enqueued
    baselines alone, unpruned and all re-scored on held-out (in a search, a pruned baseline
    is not among the re-scored top trials)."""
    space, sampler = ARMS.get(arm, ARMS[REFERENCE])
    study = f"{arm}_s{seed}"
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_stacking_") as tmp:
        path = SPACES / space
        cmd = ["evomerge", "search", str(path), "--study", study, "--seed", str(seed)]
        cmd += ["--n-trials", str(n_trials)] + (["--sampler", sampler] if sampler else [])
        if arm == BASELINES:
            path = Path(tmp) / space  # the same space with every baseline re-scored
            text = (SPACES / space).read_text()
            path.write_text(text.replace("heldout_top_k: 3", f"heldout_top_k: {n_trials}"))
            cmd[2] = str(path)
            cmd.append("--no-prune")
        t0 = time.time()
        proc = subprocess.run(
            [*cmd, "--results", tmp], cwd=REPO, capture_output=True, text=True, check=False
        )
        wall = time.time() - t0
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr)[-2000:]
            raise SystemExit(f"{arm} seed {seed}: exit {proc.returncode}\n{tail}")
        rec = study_record(Path(tmp) / study)
    shown = [c if not c.startswith(str(REPO)) else str(Path(c).relative_to(REPO)) for c in cmd]
    if arm == BASELINES:  # its space was a temporary copy: name what it was copied from
        shown[2] = f"<{space} with heldout_top_k: {n_trials}>"
    return rec | {
        "arm": arm,
        "seed": seed,
        "n_trials": n_trials,
        "command": " ".join(shown),
        "wall_s": wall,
        "load_start": load0,
        "load_end": os.getloadavg()[0],
    }


def space_sha(arm: str, n_trials: int) -> str:
    space, sampler = ARMS.get(arm, ARMS[REFERENCE])
    text = (SPACES / space).read_text() + f"|{arm}|{sampler}|{n_trials}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """Runs every (arm, seed) not yet in --out, `args.jobs` at a time (seed-major, so a run
    cut short still pairs the arms of its first seeds), saving each as it finishes."""
    from concurrent.futures import ThreadPoolExecutor

    data = json.loads(args.out.read_text()) if args.out.is_file() else {"runs": {}}
    for other in args.merge_from:  # runs made by another invocation (same spaces, same size)
        for key, run in json.loads(other.read_text())["runs"].items():
            data["runs"].setdefault(key, run)
    todo = [(BASELINES, 0, N_BASELINES)] + [
        (arm, seed, args.n_trials) for seed in range(args.seeds) for arm in args.arms
    ]
    todo = [] if args.report else todo
    todo = [
        t
        for t in todo
        if data["runs"].get(f"{t[0]}:{t[1]}", {}).get("space_sha") != space_sha(t[0], t[2])
    ]
    lock = threading.Lock()

    def one(arm: str, seed: int, n: int) -> None:
        run = run_one(arm, seed, n) | {"space_sha": space_sha(arm, n)}
        with lock:
            data["runs"][f"{arm}:{seed}"] = run
            save(args.out, data)
        print(
            f"{arm}:{seed}: test {100 * run['test']:.1f} (winner #{run['winner']}), "
            f"{run['docs']} docs, {run['wall_s']:.0f} s, load "
            f"{run['load_start']:.2f}->{run['load_end']:.2f}",
            file=sys.stderr,
        )

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for f in [pool.submit(one, *t) for t in todo]:
            f.result()
    return data


def save(path: Path, data: dict[str, Any]) -> None:
    from evomerge.search.results import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


# ---- report ----


def summary(data: dict[str, Any], arms: Sequence[str], n_seeds: int) -> dict[str, Any]:
    """Per-arm scores over the seeds every arm finished, paired differences, baselines."""
    runs = data["runs"]
    seeds = [s for s in range(n_seeds) if all(f"{a}:{s}" in runs for a in arms)]
    if not seeds:
        raise SystemExit("no seed has finished runs of every arm yet")
    score = {a: [runs[f"{a}:{s}"]["test"] for s in seeds] for a in arms}
    out: dict[str, Any] = {"seeds": seeds, "arms": {}}
    for a in arms:
        m, sd = mean_sd(score[a])
        docs = mean_sd([runs[f"{a}:{s}"]["docs"] for s in seeds])
        wall = mean_sd([runs[f"{a}:{s}"]["wall_s"] for s in seeds])
        out["arms"][a] = {"test": score[a], "mean": m, "sd": sd, "docs": docs, "wall_s": wall}
        if a != REFERENCE and REFERENCE in arms:
            out["arms"][a]["vs_" + REFERENCE] = paired(score[a], score[REFERENCE])
    base = baseline_scores(runs[f"{BASELINES}:0"])  # deterministic: the same in every arm
    experts = {k: v for k, v in base.items() if k.startswith("expert:")}
    best_expert = max(experts, key=experts.__getitem__) if experts else None
    out["baselines"] = {
        "base": base.get("base"),
        "uniform merge": next((v for k, v in base.items() if k.startswith("uniform:")), None),
        f"best single expert ({best_expert})": experts.get(best_expert),  # type: ignore[arg-type]
    }
    if STACKING in arms and REFERENCE in arms:
        out["ratio"] = out["arms"][STACKING]["mean"] / out["arms"][REFERENCE]["mean"]
    return out


def table(data: dict[str, Any], summ: dict[str, Any], arms: Sequence[str]) -> list[str]:
    runs = data["runs"]
    lines = ["| seed | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
    for s in summ["seeds"]:
        cells = [f"{100 * runs[f'{a}:{s}']['test']:.1f}" for a in arms]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    cells = [
        f"{100 * summ['arms'][a]['mean']:.1f} ± {100 * summ['arms'][a]['sd']:.1f}" for a in arms
    ]
    lines.append("| mean ± sd | " + " | ".join(cells) + " |")
    docs = [f"{summ['arms'][a]['docs'][0]:.0f}" for a in arms]
    lines.append("| documents scored (mean) | " + " | ".join(docs) + " |")
    wall = [f"{summ['arms'][a]['wall_s'][0]:.0f}" for a in arms]
    lines.append("| wall s per run (mean) | " + " | ".join(wall) + " |")
    return lines


def report(data: dict[str, Any], summ: dict[str, Any], arms: Sequence[str]) -> str:
    lines = [
        "Held-out TEST-part objective of each run's winner (points; winner chosen on the "
        f"held-out selection part), seeds {', '.join(map(str, summ['seeds']))}:",
        "",
        *table(data, summ, arms),
        "",
        f"Paired differences against `{REFERENCE}` (points, mean ± sd over seeds; "
        "wins/ties/losses):",
    ]
    for a in arms:
        p = summ["arms"][a].get("vs_" + REFERENCE)
        if p:
            w, t, lo = p["wins_ties_losses"]
            lines.append(
                f"- {a} - {REFERENCE}: {100 * p['mean']:+.1f} ± {100 * p['sd']:.1f} ({w}/{t}/{lo})"
            )
    lines += ["", "Baselines on the same test part:"]
    lines += [
        f"- {k}: {'-' if v is None else f'{100 * v:.1f}'}" for k, v in summ["baselines"].items()
    ]
    if "ratio" in summ:
        lines += ["", f"ratio {STACKING} / {REFERENCE} (mean test objective): {summ['ratio']:.3f}"]
    return "\n".join(lines)


def versions() -> dict[str, str]:
    from importlib.metadata import version

    out = {p: version(p) for p in ("torch", "transformers", "optuna", "lm_eval")}
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    )
    return out | {
        "evomerge commit (plus working tree)": head.stdout.strip(),
        "python": platform.python_version(),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    ap.add_argument("--n-trials", type=int, default=20, help="trials per run, every arm (20)")
    ap.add_argument("--arms", default="weights,hybrid", help=f"of {', '.join(ARMS)}")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "stacking.json")
    ap.add_argument("--report", action="store_true", help="no new runs: report the seeds done")
    ap.add_argument(
        "--merge-from", type=Path, action="append", default=[], help="take runs from this JSON too"
    )
    args = ap.parse_args(argv)
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in args.arms if a not in ARMS]
    if bad or args.seeds < 1 or args.n_trials < 1:
        ap.error(f"bad --arms {bad} / --seeds / --n-trials (arms: {', '.join(ARMS)})")
    args.out = args.out.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # one torch thread per run (as bench_search): several runs at a time on a shared CPU, and
    # a second thread's barriers mostly spin there (measured: a 24-trial run took 241 s of CPU
    # with 2 threads at load 13, about 6x its one-thread cost on a quiet machine)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args = parse_args(argv)
    t0 = time.time()
    data = run_all(args)
    summ = summary(data, args.arms, args.seeds)
    text = report(data, summ, args.arms)
    print(text)
    data["summary"] = summ | {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU",
        "versions": versions(),
        "size": {"seeds": args.seeds, "n_trials": args.n_trials, "arms": args.arms},
    }
    save(args.out, data)
    size = (
        f"{len(summ['seeds'])} seeds x {len(args.arms)} arms, {args.n_trials} trials per run "
        "(the 6 enqueued baselines included), chunks 16/48/128 of the 300 search documents per "
        "task, successive halving; winners and baselines re-scored on 128 held-out documents "
        "per task (64 select, 64 test); one torch thread per run, --jobs runs at a time"
    )
    made = " (runs also taken from " + ", ".join(p.name for p in args.merge_from) + ")"
    made = made if args.merge_from else ""
    vers = ", ".join(f"{k} {v}" for k, v in data["summary"]["versions"].items())
    args.out.with_suffix(".md").write_text(
        f"# Layer stacking vs weight search on the depth zoo ({data['summary']['date']})\n\n"
        f"`python scripts/bench_stacking.py --seeds {args.seeds} --n-trials {args.n_trials} "
        f"--arms {','.join(args.arms)} --jobs {args.jobs}`{made}\n\n"
        f"Machine: {data['summary']['machine']}, shared with other jobs. Versions: {vers}.\n"
        f"Size: {size}. This invocation: {time.time() - t0:.0f} s.\n\n{text}\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
