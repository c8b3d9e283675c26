"""`evomerge merge` of a small model, whole process: this checkout against a reference commit.

    python scripts/bench_merge_startup.py [--ref 1c554f3] [--runs 5] [--base DIR]

SmolLM2-135M in bf16, base + 2 perturbed variants (scripts/bench_merge.py builds and caches them).
A linear and a ties recipe are merged by `python -m evomerge merge` from this checkout and from a
git worktree of REF (by default 1c554f3, the last commit before work on issue #25), interleaved,
RUNS times each, in one run of this script. `python -c "import torch"` is timed beside them: no
merge built on torch can take less. Each version's merge also runs once under `-X importtime`,
which records the heavy packages it imported (a merge of safetensors needs neither transformers
nor optuna).

Writes results/bench/merge_startup.{json,md} (or --out). Only ratios within one run mean much.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import CACHE, prepare_models, recipe, timed_child

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "optuna", "lm_eval", "pandas", "peft", "vllm", "tokenizers")
METHODS = ("linear", "ties")


def merge_cmd(cfg: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "evomerge", "merge", str(cfg), str(out), "--no-progress",
            "--seed", "0"]  # fmt: skip


def imported(cmd: list[str], env: dict[str, str]) -> list[str]:
    """The HEAVY top-level packages a run imports, from `-X importtime` (written to stderr)."""
    proc = subprocess.run([cmd[0], "-X", "importtime", *cmd[1:]], env=env, text=True,
                          capture_output=True, check=True)  # fmt: skip
    names = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1]
            if not name.startswith("  "):  # a top-level import, not one nested in another
                names.add(name.strip().split(".")[0])
    return [h for h in HEAVY if h in names]


def worktree(ref: str, where: Path) -> Path:
    path = where / "ref"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), ref],
                   check=True, capture_output=True)  # fmt: skip
    return path


def versions(ref_tree: Path, ref: str) -> dict[str, dict[str, str]]:
    """The environment of each version; checks that each imports evomerge from its own tree."""
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], text=True,
                          capture_output=True, check=True).stdout.strip()  # fmt: skip
    envs = {f"this checkout ({head})": {**os.environ, "PYTHONPATH": str(ROOT)},
            f"reference ({ref})": {**os.environ, "PYTHONPATH": str(ref_tree)}}  # fmt: skip
    for name, env in envs.items():
        probe = [sys.executable, "-c", "import evomerge; print(evomerge.__file__)"]
        where = subprocess.run(probe, env=env, text=True, capture_output=True, check=True).stdout
        if not where.startswith(env["PYTHONPATH"]):
            raise SystemExit(f"{name}: evomerge imported from {where.strip()}, not its own tree")
    return envs


def bench(models: tuple[Path, Path, Path], envs: dict, runs: int, tmp: Path) -> dict:
    floor = [sys.executable, "-c", "import torch"]
    cases: dict[str, dict] = {"import torch": {"": {"runs": [], "imports": ["torch"]}}}
    cfgs = {}
    for m in METHODS:
        cfgs[m] = tmp / f"{m}.yaml"
        cfgs[m].write_text(yaml.safe_dump(recipe(m, *models), sort_keys=False))
        cases[f"135M {m}"] = {v: {"runs": [], "rss": []} for v in envs}
    for _ in range(runs):  # interleaved, so a slow spell of the machine hits every version alike
        cases["import torch"][""]["runs"].append(timed_child(floor)[0])
        for m in METHODS:
            for v, row in cases[f"135M {m}"].items():
                wall, rss = _merge_once(cfgs[m], tmp / "out", envs[v])
                row["runs"].append(wall)
                row["rss"].append(rss)
    for m in METHODS:
        for v, row in cases[f"135M {m}"].items():
            row["imports"] = imported(merge_cmd(cfgs[m], tmp / "out"), envs[v])
            shutil.rmtree(tmp / "out", ignore_errors=True)
    for per in cases.values():
        for row in per.values():
            row["median"] = statistics.median(row["runs"])
    return cases


def _merge_once(cfg: Path, out: Path, env: dict[str, str]) -> tuple[float, float]:
    try:
        return timed_child(merge_cmd(cfg, out), env)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def report(cases: dict, args: argparse.Namespace, load: tuple[float, ...]) -> str:
    lines = [
        f"# `evomerge merge` of SmolLM2-135M, whole process (scripts/bench_merge_startup.py "
        f"--ref {args.ref} --runs {args.runs})",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}; load average {' '.join(f'{x:.2f}' for x in load)} at the "
        f"start, {' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end. bf16 inputs "
        "(base + 2 variants, page-cached after the first run), bf16 output; runs interleaved.",
        "",
        "| case | version | wall s (runs) | median s | x reference | peak RSS MB | heavy imports |",
        "|---|---|---|---|---|---|---|",
    ]
    for case, per in cases.items():
        ref = next((r["median"] for v, r in per.items() if v.startswith("reference")), None)
        for v, r in per.items():
            ratio = f"{r['median'] / ref:.2f}" if ref else ""
            rss = f"{statistics.median(r['rss']):.0f}" if r.get("rss") else ""
            walls = ", ".join(f"{x:.2f}" for x in r["runs"])
            lines.append(f"| {case} | {v} | {walls} | {r['median']:.2f} | {ratio} | {rss} | "
                         f"{', '.join(r['imports'])} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", default="1c554f3", help="the commit to compare with")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--base", help="an already converted SmolLM2 folder (skips the GGUF step)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench" / "merge_startup")
    args = ap.parse_args()
    models = prepare_models(args.base)
    CACHE.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as d:
        tmp = Path(d)
        tree = worktree(args.ref, tmp)
        os.chdir(tmp)  # `python -m` and `-c` put the working folder first on sys.path
        try:
            envs = versions(tree, args.ref)
            load = os.getloadavg()
            cases = bench(models, envs, args.runs, tmp)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                           check=False, capture_output=True)  # fmt: skip
    text = report(cases, args, load)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(cases, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
