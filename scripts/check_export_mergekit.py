"""Check that mergekit, run on an exported recipe.yaml as it is, gives the exported tensors.

    python scripts/check_export_mergekit.py [EXPORT_DIR] [--mergekit-yaml PATH] [--atol 1e-5]

Without EXPORT_DIR it builds its own case in a temporary folder: three tiny random Llama
checkpoints, a short study (fake evaluator, real Optuna) over task_arithmetic weights, and
`evomerge export` of the best trial. Then it runs `mergekit-yaml recipe.yaml OUT` (the separate
venv .mergekit-venv with mergekit 0.1.5 by default) and compares every tensor: exit 0 when all
agree within --atol, 1 otherwise. Deterministic methods only (mergekit draws DARE/DELLA masks
its own way).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MK = ROOT / ".mergekit-venv" / "bin" / "mergekit-yaml"


def build_case(work: Path) -> Path:
    """Tiny models + a 6-trial study + export; returns the export folder."""
    sys.path.insert(0, str(ROOT / "tests"))
    from _search_fakes import FakeWorkbench, ensure_methods
    from conftest import write_tiny_model

    from evomerge.export.run import export_study
    from evomerge.loop.run import run_search

    ensure_methods()
    models = {k: write_tiny_model(work / "models" / k, seed=s, num_layers=2, hidden=32)
              for k, s in (("base", 0), ("a", 1), ("b", 2))}  # fmt: skip
    space = work / "check.yaml"
    space.write_text(
        f"base_model: {models['base']}\nmodels: [{models['a']}, {models['b']}]\n"
        "method: task_arithmetic\nparameters:\n  weight: {simplex: true}\n  lambda: 0.9\n"
        "tasks: [task0, task1]\nsearch: {n_trials: 6, seed: 0}\n"
    )
    bench = FakeWorkbench(target=(0.7, 0.3), n_docs=12, chunks=(None,))
    run_search(space, results=work / "results", workbench=bench, quiet=True)
    return export_study(work / "results" / "check", out=work / "export", progress=False).out_dir


def compare(ours: Path, theirs: Path, atol: float) -> int:
    from safetensors.torch import load_file

    def tensors(folder: Path) -> dict:
        out: dict = {}
        for f in sorted(folder.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    a, b = tensors(ours), tensors(theirs)
    if set(a) != set(b):
        print(f"tensor names differ: only evomerge {sorted(set(a) - set(b))[:5]}, "
              f"only mergekit {sorted(set(b) - set(a))[:5]}")  # fmt: skip
        return 1
    worst = max(((a[n].float() - b[n].float()).abs().max().item(), n) for n in a)
    print(f"{len(a)} tensors; max |evomerge - mergekit| = {worst[0]:.3g} at '{worst[1]}'")
    if worst[0] > atol:
        print(f"FAIL: above --atol {atol}")
        return 1
    print(f"OK: within {atol}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("export_dir", nargs="?", help="an `evomerge export` folder (default: build one)")
    p.add_argument("--mergekit-yaml", default=str(DEFAULT_MK), help="mergekit-yaml executable")
    p.add_argument("--atol", type=float, default=1e-5)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="check-export-") as tmp:
        work = Path(tmp)
        export = Path(args.export_dir) if args.export_dir else build_case(work)
        out = work / "mergekit-out"
        t0 = time.time()
        run = subprocess.run([args.mergekit_yaml, str(export / "recipe.yaml"), str(out)],
                             capture_output=True, text=True)  # fmt: skip
        print(f"mergekit-yaml: exit {run.returncode} in {time.time() - t0:.1f} s")
        if run.returncode != 0:
            print(run.stderr[-3000:])
            return 1
        return compare(export, out, args.atol)


if __name__ == "__main__":
    sys.exit(main())
