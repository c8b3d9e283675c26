"""Build a MoE of the zoo experts and report its routing and held-out scores.

    python scripts/moe_zoo_report.py [--zoo zoo] [--experts mlp] [--gate-mode logistic]
                                     [--top-k 1] [--out results/moe_zoo] [--baselines]

The experts are ZOO/EXPERTS/<task>: by default the MLP experts (zoo/mlp/<task>, trained with
attention frozen), `--experts .` for the full fine-tunes. The router rows come from each task's
*search* split (prompt + answer, so the tokens the MoE generates are covered too; --no-answers
for prompts only); routing and scores are measured on the *held-out* split, never seen:
- routing: the fraction of each task's held-out prompt tokens that each layer's router sends
  top-1 to that task's expert, averaged over layers ("tokens"), and the fraction of prompts
  whose every token goes there at every layer ("prompts");
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


def split_texts(task: str, split: str, n: int | None = None, answers: bool = False) -> list[str]:
    """The split's prompts (with their gold answers appended if `answers`)."""
    rows = [json.loads(line) for line in (ROOT / "evals/data" / f"zoo_{task}.jsonl").open()]
    texts = [r["prompt"] + (r["answer"] if answers else "") for r in rows if r["split"] == split]
    return texts[:n] if n else texts


def moe_config(
    zoo: Path, experts: str, tasks: list[str], n_prompts: int, top_k: int, mode: str, answers: bool
) -> dict:
    ex = [
        {
            "source_model": str(zoo / experts / t),
            "positive_prompts": split_texts(t, "search", n_prompts, answers),
        }
        for t in tasks
    ]
    return {"base_model": str(zoo / "base"), "gate_mode": mode, "dtype": "float32",
            "experts_per_token": top_k, "experts": ex}  # fmt: skip


def routing_table(out: Path, tasks: list[str]) -> dict[str, tuple[float, float]]:
    """task -> (token fraction, whole-prompt fraction) routed top-1 to its own expert."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.moe_router import top1_choices

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    result = {}
    print("\nrouting (held-out prompt tokens, top-1): rows = task, columns = expert")
    print("task   " + "  ".join(f"{t:>6}" for t in tasks) + "   prompts   per-layer own fraction")
    for j, t in enumerate(tasks):
        picks = top1_choices(model, tok, split_texts(t, "heldout"))  # [(layers, tokens)]
        flat = torch.cat(picks, dim=1)  # (layers, all tokens)
        frac = torch.stack([(flat == e).float().mean(dim=1) for e in range(len(tasks))], dim=1)
        whole = sum(bool((p == j).all()) for p in picks) / len(picks)
        result[t] = (frac[:, j].mean().item(), whole)
        per_layer = " ".join(f"{v:.2f}" for v in frac[:, j].tolist())
        cells = "  ".join(f"{v:6.3f}" for v in frac.mean(0).tolist())
        print(f"{t:<6} {cells}   {whole:7.3f}   {per_layer}")
    return result


def score(model_dir: Path, tasks: list[str]) -> dict[str, float]:
    from evomerge.eval.backends import load_backend
    from evomerge.eval.evaluator import Evaluator
    from evomerge.eval.tasks import load_tasks

    specs = [str(ROOT / "evals" / f"zoo_{t}.yaml") for t in tasks]
    backend = load_backend("hf", model_dir, device="cpu", batch_size=64)
    res = Evaluator(backend, load_tasks(specs), chunks=(None,)).evaluate("heldout")
    return {name.removeprefix("zoo_"): s.mean for name, s in res.tasks.items()}


def print_scores(rows: dict[str, dict[str, float]], tasks: list[str]) -> None:
    print("\nheld-out exact match / accuracy (the project's evaluator)")
    print("model       " + "  ".join(f"{t:>6}" for t in tasks) + "    mean")
    for name, s in rows.items():
        vals = [s[t] for t in tasks]
        cells = "  ".join(f"{v:6.3f}" for v in vals)
        print(f"{name:<11} {cells}  {sum(vals) / len(vals):6.3f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--zoo", default=str(ROOT / "zoo"))
    p.add_argument("--experts", default="mlp", help="folder under --zoo holding <task> experts")
    p.add_argument("--out", default=str(ROOT / "results" / "moe_zoo"))
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--gate-mode", default="logistic")
    p.add_argument("--n-prompts", type=int, default=300, help="search texts per expert")
    p.add_argument("--no-answers", action="store_true", help="router texts without answers")
    p.add_argument("--baselines", action="store_true", help="also score base and each expert")
    args = p.parse_args()
    import torch

    from evomerge.moe import build_moe
    from evomerge.moe_config import parse_moe_config

    torch.set_num_threads(2)
    zoo, out, tasks = Path(args.zoo), Path(args.out), args.tasks.split(",")
    raw = moe_config(
        zoo, args.experts, tasks, args.n_prompts, args.top_k, args.gate_mode, not args.no_answers
    )
    if out.is_dir() and (out / ".evomerge-output").exists():
        shutil.rmtree(out)
    build_moe(parse_moe_config(raw), out)
    print(f"MoE: experts {zoo / args.experts}/<task>, top-{args.top_k}, gate_mode "
          f"{args.gate_mode}, {args.n_prompts} search texts per expert "
          f"({'prompts' if args.no_answers else 'prompt + answer'}) -> {out}")  # fmt: skip
    routing_table(out, tasks)
    rows = {"moe": score(out, tasks)}
    if args.baselines:
        rows["base"] = score(zoo / "base", tasks)
        for t in tasks:
            rows[f"expert {t}"] = score(zoo / args.experts / t, tasks)
    print_scores(rows, tasks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
