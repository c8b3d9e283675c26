"""Build a MoE of the zoo experts and report its routing and held-out scores.

    python scripts/moe_zoo_report.py [--zoo zoo] [--experts mlp] [--gate-mode logistic]
                                     [--top-k 1] [--out results/moe_zoo] [--baselines]
    # gate tuning: every combination, one build per (n-prompts, prompt-seed)
    python scripts/moe_zoo_report.py --top-k 1,2,3,4 --temperature 0.5,1,2 \
        --n-prompts 30,300 --prompt-seed 0,1 --json sweep.json

The experts are ZOO/EXPERTS/<task>: by default the MLP experts (zoo/mlp/<task>, trained with
attention frozen), `--experts .` for the full fine-tunes. The router rows come from each task's
*search* split (prompt + answer, so the tokens the MoE generates are covered too; --no-answers
for prompts only); routing and scores are measured on the *held-out* split, never seen:
- routing: the fraction of each task's held-out prompt tokens that each layer's router sends
  top-1 to that task's expert, averaged over layers ("tokens"), and the fraction of prompts
  whose every token goes there at every layer ("prompts");
- scores: the project's evaluator (what `evomerge eval OUT --tasks ...` runs) on the held-out
  split, for the MoE and, with --baselines, for the base and every expert alone.

Gate knobs (comma lists; every combination is scored):
- --n-prompts N: search texts per expert that the router is fit on; --prompt-seed S draws them
  at random (seed S) from the search split instead of taking the first N.
- --top-k K: experts per token. --temperature T: router logits divided by T (the gate rows
  scaled by 1/T). With top-1 the chosen expert gets weight 1 whatever T is, so T only changes
  how top-k >= 2 mixes; top-1 runs only at T = 1.
top-k and T are set on the loaded MoE (the routers' top_k and weights), so the variants of one
build share everything else. Each variant is compared with the first one on the same held-out
documents: mean difference, paired standard error, documents won / lost.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASKS = ("add", "rev", "cap", "fmt")


def split_texts(
    task: str, split: str, n: int | None = None, answers: bool = False, seed: int | None = None
) -> list[str]:
    """The split's prompts (with their gold answers appended if `answers`): the first n, or
    n drawn at random with `seed`."""
    rows = [json.loads(line) for line in (ROOT / "evals/data" / f"zoo_{task}.jsonl").open()]
    texts = [r["prompt"] + (r["answer"] if answers else "") for r in rows if r["split"] == split]
    if seed is not None and n:
        return random.Random(seed).sample(texts, min(n, len(texts)))
    return texts[:n] if n else texts


def moe_config(
    zoo: Path,
    experts: str,
    tasks: list[str],
    n_prompts: int,
    top_k: int,
    mode: str,
    answers: bool,
    seed: int | None = None,
) -> dict:
    ex = [
        {
            "source_model": str(zoo / experts / t),
            "positive_prompts": split_texts(t, "search", n_prompts, answers, seed),
        }
        for t in tasks
    ]
    return {"base_model": str(zoo / "base"), "gate_mode": mode, "dtype": "float32",
            "experts_per_token": top_k, "experts": ex}  # fmt: skip


def routing_table(out: Path, tasks: list[str]) -> dict[str, tuple[float, float]]:
    """task -> (token fraction, whole-prompt fraction) routed top-1 to its own expert."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.moe.router import top1_choices

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


def _evaluate(backend: object, tasks: list[str]) -> dict[str, dict[int, float]]:
    """Held-out per-example scores: task -> doc id -> score."""
    from evomerge.eval.evaluator import Evaluator
    from evomerge.eval.tasks import load_tasks

    specs = [str(ROOT / "evals" / f"zoo_{t}.yaml") for t in tasks]
    res = Evaluator(backend, load_tasks(specs), chunks=(None,)).evaluate("heldout")  # type: ignore[arg-type]
    return {name.removeprefix("zoo_"): dict(s) for name, s in res.per_example.items()}


def score(model_dir: Path, tasks: list[str]) -> dict[str, float]:
    from evomerge.eval.backends import load_backend

    backend = load_backend("hf", model_dir, device="cpu", batch_size=64)
    return {t: _mean(s) for t, s in _evaluate(backend, tasks).items()}


def _mean(scores: dict[int, float]) -> float:
    return sum(scores.values()) / len(scores)


def set_gates(model: object, rows: list[object], top_k: int, temperature: float) -> None:
    """Every layer's router: top_k experts, logits scaled by 1/temperature (rows: the built
    gate weights, one (n_experts, hidden) tensor per layer)."""
    import torch

    with torch.no_grad():
        for layer, w in zip(model.model.layers, rows, strict=True):  # type: ignore[attr-defined]
            router = layer.mlp.gate
            if not hasattr(router, "top_k"):
                raise SystemExit(f"{type(router).__name__} has no top_k: unknown MoE router")
            router.top_k = top_k
            router.weight.copy_(w / temperature)  # type: ignore[operator]


def compare(
    got: dict[str, dict[int, float]], ref: dict[str, dict[int, float]]
) -> tuple[float, float, int, int]:
    """Mean over tasks of the difference of task means, its paired standard error, and the
    documents where `got` scores higher / lower than `ref`."""
    diff, var, won, lost = 0.0, 0.0, 0, 0
    for t, scores in got.items():
        d = [scores[i] - ref[t][i] for i in scores]  # paired on the same documents
        m = sum(d) / len(d)
        diff += m / len(got)
        var += sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d) / len(got) ** 2
        won += sum(x > 0 for x in d)
        lost += sum(x < 0 for x in d)
    return diff, math.sqrt(var), won, lost


def print_scores(rows: dict[str, dict[str, float]], tasks: list[str]) -> None:
    print("\nheld-out exact match / accuracy (the project's evaluator)")
    width = max(11, *map(len, rows))
    print(f"{'model':<{width}} " + "  ".join(f"{t:>6}" for t in tasks) + "    mean")
    for name, s in rows.items():
        vals = [s[t] for t in tasks]
        cells = "  ".join(f"{v:6.3f}" for v in vals)
        print(f"{name:<{width}} {cells}  {sum(vals) / len(vals):6.3f}")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def _seeds(text: str | None) -> list[int | None]:
    return [None] if text is None else [int(x) for x in text.split(",")]


def sweep(args: argparse.Namespace, zoo: Path, out: Path, tasks: list[str]) -> dict[str, dict]:
    """Every (n-prompts, prompt-seed) build x (top-k, temperature) variant -> per-example
    scores, printed against the first variant as they come."""
    from evomerge.eval.backends import load_backend
    from evomerge.moe.build import build_moe
    from evomerge.moe.config import parse_moe_config

    ks, temps = _ints(args.top_k), [float(x) for x in args.temperature.split(",")]
    results: dict[str, dict] = {}
    ref: dict[str, dict[int, float]] | None = None
    for n in _ints(args.n_prompts):
        for seed in _seeds(args.prompt_seed):
            t0 = time.time()
            raw = moe_config(zoo, args.experts, tasks, n, ks[0], args.gate_mode,
                             not args.no_answers, seed)  # fmt: skip
            if out.is_dir() and (out / ".evomerge-output").exists():
                shutil.rmtree(out)
            build_moe(parse_moe_config(raw), out)
            print(f"\nMoE: experts {zoo / args.experts}/<task>, gate_mode {args.gate_mode}, "
                  f"{n} search texts per expert ({'first' if seed is None else f'seed {seed}'}"
                  f", {'prompts' if args.no_answers else 'prompt + answer'}) -> {out} "
                  f"[built in {time.time() - t0:.0f} s]")  # fmt: skip
            if not args.no_routing:
                routing_table(out, tasks)
            backend = load_backend("hf", out, device="cpu", batch_size=64)
            model = backend.model  # type: ignore[attr-defined]
            rows = [layer.mlp.gate.weight.detach().clone() for layer in model.model.layers]
            for k in ks:
                for temp in temps if k > 1 else [1.0]:
                    t0 = time.time()
                    set_gates(model, rows, k, temp)
                    per_ex = _evaluate(backend, tasks)
                    name = f"n={n} seed={seed} k={k} T={temp:g}"
                    results[name] = per_ex
                    ref = ref or per_ex
                    means = "  ".join(f"{_mean(per_ex[t]):6.3f}" for t in tasks)
                    avg = sum(_mean(per_ex[t]) for t in tasks) / len(tasks)
                    d, se, won, lost = compare(per_ex, ref)
                    print(f"{name:<28} {means}  {avg:6.3f}   vs first: {100 * d:+5.2f} "
                          f"+- {100 * se:4.2f} pts (won {won}, lost {lost})  "
                          f"[{time.time() - t0:.0f} s]", flush=True)  # fmt: skip
            del backend, model
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--zoo", default=str(ROOT / "zoo"))
    p.add_argument("--experts", default="mlp", help="folder under --zoo holding <task> experts")
    p.add_argument("--out", default=str(ROOT / "results" / "moe_zoo"))
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--top-k", default="1", help="experts per token (comma list)")
    p.add_argument("--temperature", default="1", help="router temperature (comma list)")
    p.add_argument("--gate-mode", default="logistic")
    p.add_argument("--n-prompts", default="300", help="search texts per expert (comma list)")
    p.add_argument("--prompt-seed", help="draw the texts at random with these seeds (comma list)")
    p.add_argument("--no-answers", action="store_true", help="router texts without answers")
    p.add_argument("--no-routing", action="store_true", help="skip the routing table")
    p.add_argument("--baselines", action="store_true", help="also score base and each expert")
    p.add_argument("--json", help="write every variant's per-example scores here")
    args = p.parse_args()
    import torch

    torch.set_num_threads(2)
    zoo, out, tasks = Path(args.zoo), Path(args.out), args.tasks.split(",")
    results = sweep(args, zoo, out, tasks)
    rows = {"moe " + name: {t: _mean(s) for t, s in r.items()} for name, r in results.items()}
    if args.baselines:
        rows["base"] = score(zoo / "base", tasks)
        for t in tasks:
            rows[f"expert {t}"] = score(zoo / args.experts / t, tasks)
    print_scores(rows, tasks)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
