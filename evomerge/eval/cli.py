"""`evomerge eval MODEL_DIR --tasks T1,T2`: proxy-style evaluation of one model, as a table."""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from evomerge.errors import ConfigError
from evomerge.eval.evaluator import EvalResult
from evomerge.eval.task_options import TaskOptions, parse_vllm_args, task_options


def cli_eval(args: argparse.Namespace) -> int:
    from evomerge.eval.backends import load_backend
    from evomerge.eval.evaluator import Evaluator
    from evomerge.eval.tasks import load_tasks

    if not Path(args.model_dir).is_dir():
        raise ConfigError(f"expected a model folder, got '{args.model_dir}' (not a directory)")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    specs = [s.strip() for s in args.tasks.split(",") if s.strip()]
    options, engine = cli_options(args)
    batch_size = _batch_size(args.batch_size)
    _quiet_libraries()
    t0 = time.perf_counter()
    tasks = load_tasks(specs, options=options)
    extra = engine if args.backend == "vllm" else {}
    backend = load_backend(
        args.backend, args.model_dir, device=args.device, batch_size=batch_size, **extra
    )
    t1 = time.perf_counter()
    result = Evaluator(backend, tasks, chunks=(None,)).evaluate(args.split, limit=args.limit)
    t2 = time.perf_counter()
    print(format_table(result))
    n = sum(s.n for s in result.tasks.values())
    print(f"{n} documents ({args.split}) in {t2 - t1:.2f} s; loading took {t1 - t0:.2f} s",
          file=sys.stderr)  # fmt: skip
    return 0


def cli_options(args: argparse.Namespace) -> tuple[TaskOptions, dict]:
    """The lm-eval task options and vllm.LLM arguments of `evomerge eval`/`leaderboard`,
    checked as a space's `eval.lm_eval:` and `eval.vllm:` are (one line, "did you mean")."""
    from evomerge.eval.vllm.engine_args import check_engine_args

    given = {
        "num_fewshot": args.num_fewshot,
        "apply_chat_template": args.apply_chat_template,
        "system_instruction": args.system_instruction,
        "fewshot_as_multiturn": args.fewshot_as_multiturn,
        "gen_kwargs": args.gen_kwargs,
    }
    options = task_options({k: v for k, v in given.items() if v is not None}, "options")
    engine = check_engine_args(parse_vllm_args(args.vllm_arg), "--vllm-arg")
    if engine and args.backend != "vllm":
        raise ConfigError(f"--vllm-arg applies to --backend vllm, but got --backend {args.backend}")
    return options, engine


def _batch_size(text: str) -> int | str:
    if text == "auto" or (text.isdigit() and int(text) >= 1):
        return text if text == "auto" else int(text)
    raise ConfigError(f"--batch-size must be an integer >= 1 or 'auto', got {text!r}")


def format_table(result: EvalResult) -> str:
    """One row per task: task, metric, mean, stderr, n."""
    rows = [("task", "metric", "mean", "stderr", "n")]
    for s in result.tasks.values():
        err = "nan" if math.isnan(s.stderr) else f"{s.stderr:.4f}"
        rows.append((s.task, s.metric, f"{s.mean:.4f}", err, str(s.n)))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = []
    for r in rows:
        left = [r[i].ljust(widths[i]) for i in range(2)]
        right = [r[i].rjust(widths[i]) for i in range(2, 5)]
        lines.append("  ".join(left + right).rstrip())
    return "\n".join(lines)


def _quiet_libraries() -> None:
    """lm-eval and datasets log per-task chatter at INFO/WARNING; the table is the output."""
    import logging

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass
