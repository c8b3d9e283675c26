"""Per-candidate proxy evaluation time: evomerge's Evaluator vs lm-eval's simple_evaluate.

Both score the same live model (one model object, shared) on the same tasks and documents,
for several candidates (weights changed in place between candidates, as the search does).
lm-eval is given its best case for a loop: the HFLM wrapper and the TaskManager index are
built once; each call still loads the task data and builds the requests, as simple_evaluate
does. Prints per-candidate times, the speed ratio, and whether every per-example score is
identical.

    python scripts/bench_eval.py                          # zoo/ models on evals/ tasks
    python scripts/bench_eval.py --model DIR --tasks T1,T2
    python scripts/bench_eval.py --model DIR --synthetic   # built-in arithmetic tasks

The synthetic tasks (a generation and a multiple-choice task, written to a temporary folder)
suit an instruct model such as SmolLM2-135M; evals/ tasks suit the zoo.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

GEN_YAML = """task: bench_arith_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: data/bench_arith_gen.jsonl
test_split: test
output_type: generate_until
doc_to_text: "Question: What is {{a}} plus {{b}}?\\nAnswer:"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
filter_list:
  - name: strip
    filter:
      - function: remove_whitespace
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

MC_YAML = """task: bench_arith_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: data/bench_arith_mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Question: What is {{a}} plus {{b}}?\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_synthetic_tasks(folder: Path, n: int) -> list[str]:
    """Two arithmetic tasks (YAML + JSONL, data path relative to the YAML) in `folder`."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    gen, mc = [], []
    for i in range(n):
        a, b = (17 * i + 4) % 40 + 1, (29 * i + 7) % 40 + 1
        gen.append({"id": i, "a": a, "b": b, "answer": str(a + b)})
        wrong = [a + b + d for d in (-2, 1, 10)]
        label = i % 4
        choices = [str(x) for x in [*wrong[:label], a + b, *wrong[label:]]]
        mc.append({"id": i, "a": a, "b": b, "choices": choices, "label": label})
    for name, yaml_text, recs in (
        ("bench_arith_gen", GEN_YAML, gen),
        ("bench_arith_mc", MC_YAML, mc),
    ):
        (folder / f"{name}.yaml").write_text(yaml_text)
        lines = "".join(json.dumps(r) + "\n" for r in recs)
        (folder / "data" / f"{name}.jsonl").write_text(lines)
    return [str(folder / "bench_arith_gen.yaml"), str(folder / "bench_arith_mc.yaml")]


def zoo_models() -> list[Path]:
    zoo = REPO / "zoo"
    return sorted(p for p in zoo.glob("*") if (p / "config.json").is_file()) if zoo.is_dir() else []


def perturb(backend, base: dict, k: int, scale: float) -> None:
    """Candidate k: base weights plus seeded noise (candidate 0 = the model as saved)."""
    import torch

    gen = torch.Generator().manual_seed(k)
    with torch.no_grad():
        for name, t in backend.live_tensors().items():
            t.copy_(base[name])
            if k and t.is_floating_point():
                noise = torch.randn(t.shape, generator=gen, dtype=torch.float32)
                t.add_(noise.to(t.dtype), alpha=scale * float(base[name].float().std()))


def lm_eval_scores(lm, manager, samples: dict[str, list[int]]):
    """One simple_evaluate call; returns (seconds, {task: {position: score}}, results)."""
    from lm_eval import simple_evaluate

    t0 = time.perf_counter()
    res = simple_evaluate(
        model=lm,
        tasks=list(samples),
        task_manager=manager,
        samples=samples,
        log_samples=True,
        cache_requests=False,
    )
    dt = time.perf_counter() - t0
    scores = {}
    for name in samples:
        metric = next(k for k in res["results"][name] if "," in k and "stderr" not in k)
        key = metric.split(",")[0]
        scores[name] = {s["doc_id"]: float(s[key]) for s in res["samples"][name]}
    return dt, scores


def bench_model(model_dir: Path, specs: list[str], args) -> dict:
    from lm_eval.models.huggingface import HFLM

    from evomerge.eval.evaluator import Evaluator
    from evomerge.eval.hf_backend import HFBackend
    from evomerge.eval.task_specs import local_task_manager
    from evomerge.eval.tasks import load_tasks

    t0 = time.perf_counter()
    tasks = load_tasks(specs)
    backend = HFBackend(model_dir, device="cpu", batch_size=args.batch_size)
    ours_setup = time.perf_counter() - t0
    evaluator = Evaluator(backend, tasks, chunks=(None,))
    base = {n: t.clone() for n, t in backend.live_tensors().items()}

    # lm-eval gets the same model object and documents; its TaskManager index is built once
    manager = local_task_manager(specs)
    lm = HFLM(pretrained=backend.model, tokenizer=backend.tokenizer, batch_size=args.batch_size)
    chosen = {t.name: evaluator.order(t, "all")[: args.limit] for t in tasks}
    samples = {t.name: sorted(t.position(i) for i in chosen[t.name]) for t in tasks}

    ours_t, theirs_t, identical = [], [], True
    for k in range(args.candidates):
        perturb(backend, base, k, args.noise)
        t = time.perf_counter()
        res = evaluator.evaluate("all", limit=args.limit)
        ours_t.append(time.perf_counter() - t)
        dt, theirs = lm_eval_scores(lm, manager, samples)
        theirs_t.append(dt)
        for task in tasks:
            mine = {task.position(i): v for i, v in res.per_example[task.name].items()}
            same = mine == theirs[task.name]
            identical &= same
            print(f"  candidate {k} {task.name}: ours {statistics.fmean(mine.values()):.4f} "
                  f"lm-eval {statistics.fmean(theirs[task.name].values()):.4f} "
                  f"n={len(mine)} identical={same}")  # fmt: skip
        print(f"  candidate {k}: ours {ours_t[-1]:.2f} s, lm-eval {theirs_t[-1]:.2f} s")
    steady = slice(1, None) if args.candidates > 1 else slice(None)
    o, t = statistics.fmean(ours_t[steady]), statistics.fmean(theirs_t[steady])
    return {"model": model_dir.name, "setup": ours_setup, "ours": o, "lm_eval": t,
            "first_lm_eval": theirs_t[0], "ratio": t / o, "identical": identical}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", action="append", default=[], help="model folder (repeatable)")
    p.add_argument("--tasks", default=None, help="comma-separated specs (default: evals/)")
    p.add_argument("--synthetic", action="store_true", help="use the built-in arithmetic tasks")
    p.add_argument("--n-synthetic", type=int, default=40, help="documents per synthetic task")
    p.add_argument("--limit", type=int, default=None, help="documents per task")
    p.add_argument("--candidates", type=int, default=3)
    p.add_argument("--noise", type=float, default=0.01, help="relative weight noise per candidate")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import logging

    import torch

    torch.set_num_threads(args.threads)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    models = [Path(m) for m in args.model] or zoo_models()
    if not models:
        print("no models: pass --model DIR or build the zoo (evomerge zoo)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        if args.synthetic:
            specs = write_synthetic_tasks(Path(tmp), args.n_synthetic)
        elif args.tasks:
            specs = [s.strip() for s in args.tasks.split(",") if s.strip()]
        else:
            specs = sorted(str(f) for f in (REPO / "evals").glob("*.yaml"))
        rows = []
        load_before = os.getloadavg()[0]
        for m in models:
            print(f"{m.name}: tasks {', '.join(Path(s).stem for s in specs)}")
            rows.append(bench_model(m, specs, args))
    print(f"\n{'model':24} {'ours s':>8} {'lm-eval s':>10} {'ratio':>6}  identical  "
          "(steady state: mean over candidates after the first)")  # fmt: skip
    for r in rows:
        print(f"{r['model']:24} {r['ours']:8.2f} {r['lm_eval']:10.2f} {r['ratio']:6.1f}x  "
              f"{r['identical']!s:9}  (lm-eval first call {r['first_lm_eval']:.1f} s; "
              f"our one-off setup {r['setup']:.1f} s)")  # fmt: skip
    print(f"load average (1 min) before {load_before:.2f}, after {os.getloadavg()[0]:.2f} "
          f"on {os.cpu_count()} CPUs; torch threads {args.threads}")  # fmt: skip
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
