"""Time to materialize a layer-stacking candidate: in the live model vs through disk.

For random genomes of a stacking space (default search_spaces/zoo_stacking.yaml, a hybrid:
task-arithmetic weights + stacking), seconds for (a) the search's path, LiveWorkbench._push
(weights merged in place, the layer list rebuilt from resident layers), and (b) the peer a
search without it would pay: `evomerge merge` of the decoded recipe to a folder plus
AutoModelForCausalLM.from_pretrained of it. Prints the medians and their ratio; writes
results/stacking/swap.json and swap.md. Run from the repository root.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path


def _genomes(space, n: int, seed: int) -> list[dict]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    codec = space.codec("tpe")
    out = []
    for _ in range(n):
        trial = study.ask()
        codec.suggest(trial)
        out.append(dict(trial.params))
    return out


def main() -> None:
    import torch
    import transformers

    from evomerge.loop.workbench import LiveWorkbench
    from evomerge.merge.engine import merge_recipe
    from evomerge.search.space import SearchSpace

    ap = argparse.ArgumentParser()
    ap.add_argument("--space", default="search_spaces/zoo_stacking.yaml")
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/stacking")
    args = ap.parse_args()
    space = SearchSpace.from_yaml(args.space)
    wb = LiveWorkbench.from_space(space, backend="hf", device="cpu")
    recipes = [space.decode(g) for g in _genomes(space, args.n, args.seed)]
    wb._push(recipes[0])  # first candidate: compiles/warms the merger
    live, disk = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for k, recipe in enumerate(recipes):
            t0 = time.perf_counter()
            wb._push(recipe)
            live.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = merge_recipe(recipe, Path(tmp) / f"c{k}", device="cpu", progress=False)
            transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
            disk.append(time.perf_counter() - t0)
    ml, md = statistics.median(live), statistics.median(disk)
    print(f"live stack {ml * 1e3:.1f} ms vs disk merge + load {md * 1e3:.1f} ms: {md / ml:.1f}x")
    res = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": __import__("os").cpu_count(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "space": args.space, "candidates": args.n, "seed": args.seed,
        "live_s": live, "disk_s": disk, "live_median_s": ml, "disk_median_s": md,
        "ratio": md / ml, "loadavg": __import__("os").getloadavg(),
    }  # fmt: skip
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "swap.json").write_text(json.dumps(res, indent=2) + "\n")
    (dest / "swap.md").write_text(
        f"# Layer-stacking candidate: live vs disk ({res['date']})\n\n"
        f"`python scripts/bench_stack_swap.py --space {args.space} --n {args.n}`; "
        f"{res['machine']}, {res['cpus']} CPUs, torch {torch.__version__}, transformers "
        f"{transformers.__version__}. Median of {args.n} random genomes (hybrid: "
        "task-arithmetic weights + stacking):\n\n"
        f"- live (`LiveWorkbench._push`: merge in place + layer list rebuilt): {ml * 1e3:.1f} ms\n"
        f"- disk (`evomerge merge` + `from_pretrained`): {md * 1e3:.1f} ms\n"
        f"- ratio: {md / ml:.1f}x\n\nLoad average at the end {res['loadavg'][0]:.1f} (a shared "
        "machine): absolute times move with it, the ratio compares the two paths in one run.\n"
    )


if __name__ == "__main__":
    main()
