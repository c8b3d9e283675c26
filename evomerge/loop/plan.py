"""`evomerge plan SPACE.yaml`: what a search would hold and search, before any weight loads.

Prints the models (architecture, parameters, dtype: config.json and safetensors headers), the
genome (every searched dimension and its bounds, as the search's start-up line), the memory
plan (loop/memory.py), the documents per evaluation chunk and, when results/NAME holds a
study with finished trials, the time per trial they took. A plan that cannot fit is exit 2
with the numbers. `search_memory` gives the search the same placement of the inputs and the
same gpu_memory_utilization.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError
from evomerge.loop.memory import (
    MemoryPlan,
    ModelInfo,
    describe_model,
    device_budget,
    parse_bytes,
    plan_memory,
)
from evomerge.loop.preflight import check_eval, engine_options, load_space_tasks, summary
from evomerge.search.space import SearchSpace
from evomerge.search.spec import default_sampler
from evomerge.search.stacking import MERGED


def input_refs(space: SearchSpace) -> list[str]:
    """The merger's inputs in its order: the base first (when there is one), then the models."""
    spec = space.spec
    return list(dict.fromkeys([*([spec.base_model] if spec.base_model else []), *spec.models]))


def stack_copies(space: SearchSpace) -> int:
    """Source models a layer-stacking search keeps resident (workbench.live_stack)."""
    spec, stack = space.spec, space.spec.stacking
    if stack is None:
        return 0
    loaded = None if stack.hybrid else (spec.base_model or spec.models[0])
    return sum(1 for s in stack.sources if s not in (MERGED, loaded))


def build_plan(
    space: SearchSpace, *, backend: str, device: str, gpu_memory: int | None
) -> tuple[list[ModelInfo], MemoryPlan]:
    """Models and memory plan from headers only (ConfigError when the plan cannot fit)."""
    from evomerge.merge.io import open_checkpoint

    readers = []
    try:
        for ref in input_refs(space):
            readers.append(open_checkpoint(ref))
        infos = [describe_model(ref, r) for ref, r in zip(input_refs(space), readers, strict=True)]
        engine_kw = engine_options(space) if backend == "vllm" else {}
        stack = space.spec.stacking
        plan = plan_memory(
            space.spec.methods, readers, infos, backend=backend, device=device,
            budget=device_budget(device, gpu_memory), engine_kw=engine_kw,
            merges=stack is None or stack.hybrid, stack_copies=stack_copies(space),
            inputs=space.spec.eval.get("inputs", "auto"),
        )  # fmt: skip
    finally:
        for r in readers:
            r.close()
    return infos, plan


def search_memory(
    space: SearchSpace, backend: str, device: str, engine_kw: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """(inputs placement, engine options to add) a search runs by. On CUDA: the plan's
    (ConfigError when it cannot fit): the placement, and for vLLM without a user
    gpu_memory_utilization the plan's figure (what is left beside the merger's share), so
    the engine never takes the inputs' memory. Elsewhere: eval.inputs (auto: the device)."""
    option = space.spec.eval.get("inputs", "auto")
    if not str(device).startswith("cuda"):
        return ("host" if option == "host" else "device"), {}
    _, plan = build_plan(space, backend=backend, device=device, gpu_memory=None)
    if backend != "vllm" or "gpu_memory_utilization" in engine_kw or plan.utilization is None:
        return plan.placement, {}
    return plan.placement, {"gpu_memory_utilization": plan.utilization}


def trial_times(results: Path, name: str) -> str | None:
    """Median seconds of the finished trials stored in results/NAME (None: no study there)."""
    folder = results / name
    if not (folder / "study.db").is_file():
        return None
    import optuna

    from evomerge.search.study import storage_url

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storage_url(None, folder)
    names = optuna.get_all_study_names(storage=url)
    if not names:
        return None
    study = optuna.load_study(study_name=name if name in names else names[0], storage=url)
    by_state: dict[str, list[float]] = {}
    for t in study.get_trials(deepcopy=False):
        if t.duration is not None:
            by_state.setdefault(t.state.name.lower(), []).append(t.duration.total_seconds())
    if not by_state:
        return f"study {study.study_name}: no finished trial yet"
    parts = [
        f"{state} {len(v)} x median {statistics.median(v):.2f} s"
        for state, v in sorted(by_state.items())
    ]
    return f"time per trial (study {study.study_name}): " + ", ".join(parts)


def chunk_docs(space: SearchSpace) -> str:
    """Documents per evaluation chunk over all tasks (the search split, as the search grows)."""
    tasks = load_space_tasks(space)
    chunks = list(space.spec.eval.get("chunks", (16, 64, None)))
    sizes = [sum(len(t.doc_ids("search")[:c]) for t in tasks) for c in chunks]
    shown = [f"{'all' if c is None else c}: {n}" for c, n in zip(chunks, sizes, strict=True)]
    return f"documents per chunk ({len(tasks)} tasks, search split): " + ", ".join(shown)


def cli_plan(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    space = SearchSpace.from_yaml(args.space)
    spec = space.spec
    backend = args.backend or spec.eval.get("backend", "hf")
    device = args.device or spec.eval.get("device") or "cpu"
    gpu_memory = check_budget_text(args.gpu_memory)
    check_eval(space, backend)
    sampler = spec.search.get("sampler") or default_sampler(spec)
    codec = space.codec(sampler)
    infos, plan = build_plan(space, backend=backend, device=device, gpu_memory=gpu_memory)
    print("models:")
    for i in infos:
        role = "base " if i.ref == spec.base_model else "model"
        extra = f", adapter {i.adapter_bytes:,d} B" if i.adapter_bytes else ""
        print(f"  {role} {i.ref}: {i.architecture}, {i.params:,d} parameters, {i.dtype}{extra}")
    print(summary(codec, sampler))
    print("\n".join(plan.lines()))
    print(f"planned in {time.perf_counter() - t0:.2f} s (no weights loaded)", file=sys.stderr)
    if not args.no_tasks:
        print(chunk_docs(space))
    times = trial_times(Path(args.results), args.study or spec.name)
    if times:
        print(times)
    return 0


def check_budget_text(text: str | None) -> int | None:
    if text is None:
        return None
    n = parse_bytes(text)
    if n <= 0:
        raise ConfigError(f"--gpu-memory: expected a positive size, but got {text!r}")
    return n
