"""Command line: `evomerge <command>`. Each command's implementation is imported lazily.

Exit codes: 0 success, 2 bad input (ConfigError: one line, no traceback), 1 anything else.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence

from evomerge import __version__
from evomerge.search.catalog import SAMPLERS

# command -> "module:function"; the function takes the argparse.Namespace, returns an exit code
COMMANDS: dict[str, str] = {
    "merge": "evomerge.merge.engine:cli_merge",
    "search": "evomerge.loop.cli:cli_search",
    "status": "evomerge.loop.cli:cli_status",
    "export": "evomerge.export.run:cli_export",
    "eval": "evomerge.eval.cli:cli_eval",
    "leaderboard": "evomerge.eval.leaderboard:cli_leaderboard",
    "plan": "evomerge.loop.plan:cli_plan",
    "zoo": "evomerge.zoo.build:cli_zoo",
    "demo": "evomerge.demo:cli_demo",
    "moe": "evomerge.moe.build:cli_moe",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evomerge",
        description="Find the best merge of LLM checkpoints: search, merge, evaluate, export.",
    )
    p.add_argument("--version", action="version", version=f"evomerge {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    m = sub.add_parser("merge", help="merge a (mergekit-style) recipe YAML into OUT_DIR")
    m.add_argument("recipe", metavar="RECIPE.yaml")
    m.add_argument("out_dir", metavar="OUT_DIR")
    m.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    m.add_argument("--seed", type=int, default=None, help="random_seed for DARE/DELLA draws")
    m.add_argument("--allow-pickle", action="store_true", help="allow .bin pickles (runs code!)")
    m.add_argument("--trust-remote-code", action="store_true", help="allow custom model code")
    m.add_argument("--shard-size", default="5GB", help="max shard size (default: 5GB)")
    m.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    s = sub.add_parser("search", help="run (or resume) an Optuna study over merge recipes")
    s.add_argument("space", metavar="SPACE.yaml")
    s.add_argument("--study", default=None, help="study name (default: the space file's stem)")
    s.add_argument("--n-trials", type=int, default=None, help="trial budget (default: the space's)")
    s.add_argument("--timeout", type=float, default=None, help="seconds")
    s.add_argument("--storage", default=None, help="Optuna storage URL (default: results/NAME/)")
    s.add_argument("--sampler", default=None, choices=SAMPLERS)
    s.add_argument("--seed", type=int, default=None, help="sampler seed (default: the space's)")
    s.add_argument("--results", default="results", help="results folder (default: results)")
    s.add_argument("--device", default=None, help="cpu or cuda (default: the space's or auto)")
    s.add_argument(
        "--backend", default=None, choices=["hf", "vllm"], help="(default: the space's, else hf)"
    )
    s.add_argument("--no-prune", action="store_true", help="evaluate every trial on all chunks")

    st = sub.add_parser("status", help="leaderboard of a study's trials so far")
    st.add_argument("study_dir", metavar="results/NAME")
    st.add_argument("--storage", default=None, help="Optuna storage URL (default: the study's)")
    st.add_argument("--top", type=int, default=20, help="rows to show (default: 20)")

    e = sub.add_parser("export", help="export a trial as recipe, checkpoint, card and plots")
    e.add_argument("study_dir", metavar="results/NAME")
    e.add_argument(
        "--trial", type=int, default=None,
        help="trial number (default: the best on the held-out selection part)",
    )  # fmt: skip
    e.add_argument("--out", default=None, help="output folder (default: results/NAME/export)")
    e.add_argument("--storage", default=None, help="Optuna storage URL (default: the study's)")
    e.add_argument("--no-checkpoint", action="store_true", help="skip writing merged weights")
    e.add_argument(
        "--gguf", default=None, metavar="TYPE",
        help="also write model-TYPE.gguf for llama.cpp: f16, bf16 or q8_0 (Llama, Mistral, Qwen2)",
    )  # fmt: skip
    e.add_argument(
        "--push-to-hub", default=None, metavar="REPO", help="upload the export (needs a login)"
    )

    ev = sub.add_parser("eval", help="proxy-style evaluation of one model")
    ev.add_argument("model_dir", metavar="MODEL_DIR")
    ev.add_argument("--tasks", required=True, help="comma-separated task names or YAML paths")
    ev.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    ev.add_argument(
        "--split",
        default="heldout",
        choices=["search", "heldout", "all"],
        help="(default: heldout)",
    )
    ev.add_argument(
        "--backend", default="hf", choices=["hf", "vllm"], help="transformers or vLLM (default: hf)"
    )
    ev.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    ev.add_argument(
        "--batch-size", default="64", help="rows per forward pass, or 'auto' (hf: a token budget)"
    )
    _engine_and_task_options(ev)

    lb = sub.add_parser("leaderboard", help="full lm-eval suite on a model, into its card")
    lb.add_argument("model_dir", metavar="MODEL_DIR")
    lb.add_argument(
        "--tasks", default="leaderboard", help="lm-eval tasks or group (default: leaderboard)"
    )
    lb.add_argument(
        "--backend", default="hf", choices=["hf", "vllm"], help="transformers or vLLM (default: hf)"
    )
    lb.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    lb.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    _engine_and_task_options(lb)

    pl = sub.add_parser("plan", help="models, genome and memory plan of a space (loads no weights)")
    pl.add_argument("space", metavar="SPACE.yaml")
    pl.add_argument(
        "--device", default=None, help="cpu, cuda or cuda:N (default: the space's, cpu)"
    )
    pl.add_argument(
        "--gpu-memory", default=None, metavar="SIZE", help="e.g. 80GiB (default: the device's)"
    )
    pl.add_argument(
        "--backend", default=None, choices=["hf", "vllm"], help="(default: the space's)"
    )
    pl.add_argument("--results", default="results", help="where studies are (default: results)")
    pl.add_argument("--study", default=None, help="study name for timings (default: the space's)")
    pl.add_argument("--no-tasks", action="store_true", help="skip loading the tasks (documents)")

    z = sub.add_parser("zoo", help="build the tiny offline model zoo (idempotent)")
    z.add_argument("--out", default="zoo", help="output folder (default: zoo)")
    z.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")

    d = sub.add_parser("demo", help="zoo + search + export + card, on CPU, in minutes")
    d.add_argument("--results", default="results", help="results folder (default: results)")
    d.add_argument("--zoo", default="zoo", help="zoo folder, built if missing (default: zoo)")
    d.add_argument(
        "--n-trials", type=int, default=None, help="budget in full trials' documents (default: 40)"
    )
    d.add_argument("--seed", type=int, default=0, help="search seed (default: 0)")
    d.add_argument(
        "--backend", default="hf", choices=["hf", "vllm"], help="evaluator backend (default: hf)"
    )

    mo = sub.add_parser("moe", help="build a mixture-of-experts model from dense experts")
    mo.add_argument("config", metavar="CONFIG.yaml")
    mo.add_argument("out_dir", metavar="OUT_DIR")
    mo.add_argument("--device", default="cpu", help="cpu or cuda for the router fit (default: cpu)")
    return p


def _engine_and_task_options(p: argparse.ArgumentParser) -> None:
    """The space's `eval.vllm:` and `eval.lm_eval:` as flags (lm-eval's own spellings too)."""
    p.add_argument(
        "--vllm-arg", action="append", default=None, metavar="KEY=VALUE",
        help="a vllm.LLM argument, e.g. gpu_memory_utilization=0.5 (repeatable)",
    )  # fmt: skip
    p.add_argument("--num-fewshot", "--num_fewshot", type=int, default=None, metavar="N")
    p.add_argument(
        "--apply-chat-template", "--apply_chat_template", action="store_true", default=None,
        help="build the prompts through the model's chat template",
    )  # fmt: skip
    p.add_argument("--system-instruction", "--system_instruction", default=None, metavar="TEXT")
    p.add_argument(
        "--fewshot-as-multiturn", "--fewshot_as_multiturn",
        action=argparse.BooleanOptionalAction, default=None,
        help="few-shot examples as chat turns (with a chat template; default: on)",
    )  # fmt: skip
    p.add_argument(
        "--gen-kwargs", "--gen_kwargs", default=None, metavar="K=V,K2=V2",
        help="generation arguments for generate_until tasks, as lm-eval reads them",
    )  # fmt: skip


def _resolve(target: str) -> Callable[[argparse.Namespace], int] | None:
    module_name, func_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return None
        raise
    return getattr(module, func_name, None)


def main(argv: Sequence[str] | None = None) -> int:
    from evomerge.errors import ConfigError, EvomergeError

    args = build_parser().parse_args(argv)
    func = _resolve(COMMANDS[args.command])
    if func is None:
        print(f"evomerge {args.command}: not built yet", file=sys.stderr)
        return 1
    try:
        return int(func(args) or 0)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except EvomergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an unexpected bug: a traceback only when asked for
        if os.environ.get("EVOMERGE_DEBUG"):
            raise
        print(
            f"internal error: {type(exc).__name__}: {exc} (set EVOMERGE_DEBUG=1 for a traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
