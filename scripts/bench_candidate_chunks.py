"""Working set and time of one in-place candidate (CandidateMerger.apply) per method and
inputs placement, against an earlier CandidateMerger given as a module file (--old).

Three bf16 inputs (base + 2 models) shaped like a 1B model's largest tensors (embedding and
lm_head 32000 x 2048, an MLP matrix, a norm), random. Each configuration runs in its own
process: build the merger, reset the peak RSS (/proc/self/clear_refs 5), run one warm-up
candidate and time three more; "merge peak" is VmHWM after them minus RSS before the
warm-up: what candidates hold beyond the resident inputs (buffers, caches: for the old
merger's methods outside the fused kernels, its float32 task vectors; for ties on device,
the magnitude orders), in MiB.

    python scripts/bench_candidate_chunks.py --old old_candidate.py > results/bench/x.md
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time

SHAPES = {
    "model.embed_tokens.weight": (32000, 2048),
    "model.layers.0.mlp.up_proj.weight": (5632, 2048),
    "model.layers.0.input_layernorm.weight": (2048,),
    "lm_head.weight": (32000, 2048),
}
PARAMS = {
    "slerp": {"t": 0.3},
    "nearswap": {"t": 0.01},
    "model_stock": {},
    "sce": {"select_topk": 0.5},
    "ties": {"weight": 0.5, "density": 0.5},
}


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def one(method: str, placement: str, old: str | None) -> str:
    import torch

    from evomerge.recipe import InputModel, MergeStage, ModelRef

    if old:
        spec = importlib.util.spec_from_file_location("old_candidate", old)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        merger_cls, kw = mod.CandidateMerger, {}
    else:
        from evomerge.merge.candidate import CandidateMerger as merger_cls

        kw = {"placement": placement}
    torch.set_num_threads(1)

    class Src:
        def __init__(self, seed: int) -> None:
            self.seed = seed

        def keys(self):
            return SHAPES.keys()

        def get_tensor(self, name: str):
            g = torch.Generator().manual_seed(self.seed * 100 + len(name))
            return torch.randn(SHAPES[name], generator=g).to(torch.bfloat16)

    srcs = {k: Src(i) for i, k in enumerate(["base", "m0", "m1"])}
    n = 1 if method in ("slerp", "nearswap") else 2
    models = [InputModel(ModelRef(f"m{i}"), {}) for i in range(n)]
    st = MergeStage(method, models=models, base_model=ModelRef("base"), parameters=PARAMS[method])
    m = merger_cls(st, srcs, num_layers=1, **kw)
    target = {k: torch.empty(s) for k, s in SHAPES.items()}
    for t in target.values():
        t.zero_()  # touched: the live model's pages are not the candidate's
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status("VmRSS")
    m.apply(st, target)  # warm-up: caches, buffers
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        m.apply(st, target)
        times.append(time.perf_counter() - t0)
    peak = _status("VmHWM") - before
    who = "old" if old else "new"
    return (
        f"| {method} | {who} | {placement} | {sorted(times)[1]:.2f} | {peak / 2**20:,.0f} | "
        f"{m.resident_bytes / 2**20:,.0f} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", help="an earlier evomerge/merge/candidate.py to compare with")
    ap.add_argument("--methods", nargs="+", default=list(PARAMS))
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(one(args.one[0], args.one[1], args.old))
        return
    print("| method | merger | inputs | median s / candidate | merge peak MiB | resident MiB |")
    print("|---|---|---|---|---|---|")
    for method in args.methods:
        runs = [(None, "device"), (None, "host")]
        if args.old:
            runs.insert(0, (args.old, "device"))
        for old, placement in runs:
            cmd = [sys.executable, __file__, "--one", method, placement]
            out = subprocess.run([*cmd, *(["--old", old] if old else [])], capture_output=True,
                                 text=True, check=True)  # fmt: skip
            print(out.stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
