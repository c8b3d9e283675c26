"""Build a MoE of the zoo experts and report its routing and held-out scores.

    python scripts/moe_zoo_report.py [--zoo zoo] [--out results/moe_zoo] [--top-k 1]

The router rows come from each task's *search* split prompts (gate_mode hidden); routing and
scores are measured on the *held-out* split, which the router never saw:
- routing: the fraction of each task's held-out prompt tokens that each layer's router sends
  top-1 to that task's expert, averaged over layers;
- scores: the project's evaluator (what `evomerge eval OUT --tasks ...` runs) on the held-out
  split, for the MoE and, with --baselines, for the base and every expert alone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASKS = ("add", "rev", "cap", "fmt")


def split_prompts(task: str, split: str, n: int | None = None) -> list[str]:
    rows = [json.loads(line) for line in (ROOT / "evals/data" / f"zoo_{task}.jsonl").open()]
    prompts = [r["prompt"] for r in rows if r.get("split") == split]
    return prompts[:n] if n else prompts


def moe_config(zoo: Path, tasks: list[str], n_prompts: int, top_k: int, mode: str) -> dict:
    experts = [
        {"source_model": str(zoo / t), "positive_prompts": split_prompts(t, "search", n_prompts)}
        for t in tasks
    ]
    return {"base_model": str(zoo / "base"), "gate_mode": mode, "dtype": "float32",
            "experts_per_token": top_k, "experts": experts}  # fmt: skip


def routing_table(out: Path, tasks: list[str]) -> dict[str, float]:
    """task -> mean over layers of the fraction of its held-out tokens routed to its expert."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.moe_router import top1_counts

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    result = {}
    print("\nrouting (held-out prompt tokens, top-1): rows = task, columns = expert")
    print("task   " + "  ".join(f"{t:>6}" for t in tasks) + "   per-layer own-expert fraction")
    for j, t in enumerate(tasks):
        counts = top1_counts(model, tok, split_prompts(t, "heldout")).float()  # (layers, experts)
        frac = counts / counts.sum(dim=1, keepdim=True)  # (layers, experts)
        result[t] = frac[:, j].mean().item()
        per_layer = " ".join(f"{v:.2f}" for v in frac[:, j].tolist())
        print(
            f"{t:<6} " + "  ".join(f"{v:6.3f}" for v in frac.mean(0).tolist()) + f"   {per_layer}"
        )
    return result


def score(model_dir: Path, tasks: list[str]) -> dict[str, float]:
    from evomerge.eval.backends import load_backend
    from evomerge.eval.evaluator import Evaluator
    from evomerge.eval.tasks import load_tasks

    specs = [str(ROOT / "evals" / f"zoo_{t}.yaml") for t in tasks]
    backend = load_backend("hf", model_dir, device="cpu", batch_size=64)
    res = Evaluator(backend, load_tasks(specs), chunks=(None,)).evaluate("heldout")
    return {name.removeprefix("zoo_"): s.mean for name, s in res.tasks.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--zoo", default=str(ROOT / "zoo"))
    p.add_argument("--out", default=str(ROOT / "results" / "moe_zoo"))
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--gate-mode", default="hidden")
    p.add_argument("--n-prompts", type=int, default=32, help="search prompts per expert")
    p.add_argument("--baselines", action="store_true", help="also score base and each expert")
    args = p.parse_args()
    import torch

    from evomerge.moe import build_moe
    from evomerge.moe_config import parse_moe_config

    torch.set_num_threads(2)
    zoo, out, tasks = Path(args.zoo), Path(args.out), args.tasks.split(",")
    cfg = parse_moe_config(moe_config(zoo, tasks, args.n_prompts, args.top_k, args.gate_mode))
    if out.is_dir() and (out / ".evomerge-output").exists():
        shutil.rmtree(out)
    build_moe(cfg, out)
    print(f"MoE: {len(tasks)} experts, top-{args.top_k}, gate_mode {args.gate_mode}, "
          f"{args.n_prompts} search prompts per expert -> {out}")  # fmt: skip
    routing_table(out, tasks)
    rows = {"moe": score(out, tasks)}
    if args.baselines:
        for name in ("base", *tasks):
            rows[name] = score(zoo / name, tasks)
    print("\nheld-out exact match / accuracy (the project's evaluator)")
    print("model  " + "  ".join(f"{t:>6}" for t in tasks) + "    mean")
    for name, s in rows.items():
        vals = [s[t] for t in tasks]
        print(
            f"{name:<6} " + "  ".join(f"{v:6.3f}" for v in vals) + f"  {sum(vals) / len(vals):6.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
