"""Where the time of a disk TIES / DARE / DELLA / sce merge of one large tensor goes.

Writes three bf16 safetensors checkpoints holding one tensor (rows x cols) of realistic data
-- base ~ N(0, 0.02), each model = base + N(0, 0.002), rounded to bf16, so |delta| spreads
over many exponent buckets (the sparse-header benchmark's zeros put every entry in the
exact-zero bucket) -- then merges it with `evomerge merge` in this process under cProfile
and prints the wall time and the torch operations that take it.

    python scripts/bench_gta_tensor.py --rows 32768 --methods ties dare_ties della
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

PARAMS = {"ties": "weight: 0.5, density: 0.5", "dare_ties": "weight: 0.5, density: 0.5",
          "della": "weight: 0.5, density: 0.5, epsilon: 0.1",
          "linear": "weight: 0.5", "sce": ""}  # fmt: skip
GLOBAL = {"sce": "parameters: {select_topk: 0.5}\n"}  # a method's stage parameters


def write_models(root: Path, rows: int, cols: int, seed: int = 0) -> list[Path]:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(rows, cols, generator=g) * 0.02).to(torch.bfloat16)
    out = []
    for i in range(3):
        folder = root / f"m{i}"
        folder.mkdir(parents=True)
        t = base if i == 0 else (base.float() + torch.randn(rows, cols, generator=g) * 0.002)
        save_file({"model.embed_tokens.weight": t.to(torch.bfloat16).contiguous()},
                  str(folder / "model.safetensors"))  # fmt: skip
        cfg = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
               "hidden_size": cols, "vocab_size": rows, "torch_dtype": "bfloat16"}  # fmt: skip
        (folder / "config.json").write_text(json.dumps(cfg))
        out.append(folder)
    return out


def recipe(method: str, models: list[Path], path: Path) -> Path:
    base = "" if method == "linear" else f"base_model: {models[0]}\n"
    rows = "".join(f"- model: {m}\n  parameters: {{{PARAMS[method]}}}\n" for m in models[1:])
    stage = GLOBAL.get(method, "")
    path.write_text(f"merge_method: {method}\n{base}models:\n{rows}{stage}dtype: bfloat16\n")
    return path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=32768)
    ap.add_argument("--cols", type=int, default=3584)
    ap.add_argument("--methods", nargs="+", default=["ties", "dare_ties"])
    ap.add_argument("--top", type=int, default=18, help="profile lines per method (0: none)")
    ap.add_argument("--compiled", action="store_true",
                    help="run the per-entry passes compiled (each method twice: the first "
                    "run compiles)")  # fmt: skip
    args = ap.parse_args()
    from evomerge.cli import main as cli
    from evomerge.merge import chunked, engine

    engine._workers = lambda device: 1  # one tensor: merge it in this thread, profiled
    if args.compiled:
        chunked.DISK_COMPILE_MIN_ENTRIES = 0

    work = Path(tempfile.mkdtemp(prefix="evomerge-gta-"))
    try:
        models = write_models(work, args.rows, args.cols)
        runs = [m for m in args.methods for _ in range(2 if args.compiled else 1)]
        for method in runs:
            r = recipe(method, models, work / f"{method}.yaml")
            out = work / "out"
            prof = cProfile.Profile()
            t0, c0 = time.perf_counter(), time.process_time()
            prof.runcall(cli, ["merge", str(r), str(out), "--no-progress"])
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            n = args.rows * args.cols
            print(f"{method}: wall {wall:.2f} s ({wall / n * 1e9:.2f} ns per entry), CPU "
                  f"{cpu:.2f} s ({cpu / n * 1e9:.2f} ns per entry)", flush=True)  # fmt: skip
            if args.top:
                pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(args.top)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
