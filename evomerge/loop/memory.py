"""The memory plan of a search, made before anything loads (configs and safetensors headers).

Bytes per device for what the search keeps while it runs:
- resident inputs: CandidateMerger stacks every input (base and models) per tensor in one
  flat (n_inputs, entries) buffer per dtype, in the sources' dtype when they share a float
  dtype float32 holds exactly, else float32 (merge/candidate.py `_meta`/`_load`);
- mask statistics (merge/sparsify.py, per entry and model row): magnitude order int32
  (TIES, breadcrumbs: 4 B), 16-bit draws as two uint8 planes (DARE, DELLA: 2 B), DELLA ranks
  as two uint8 planes (2 B); kept only by the fused methods on device-resident inputs;
- low-rank adapters: the factors of each BASE+ADAPTER input (read while its rows load);
- merge buffers: the row-chunk working set, merge/memory.py `memory_figures(...).peak_bytes`
  of the largest tensor -- the function that also sets the candidate path's chunking;
- vLLM: the merged float32 tensor handed to the engine (the largest one);
- layer stacking: each stacking source's layers in the engine's dtype (not `merged`, nor the
  loaded model in a stacking-only space, whose own modules serve);
- the engine: its weights in the engine's dtype and its KV cache (vLLM on CUDA: the fraction
  `gpu_memory_utilization` of the device; vLLM on CPU: `kv_cache_memory_bytes`; HF: none
  reserved, it grows with the batch).

Placement of the resident inputs (eval.inputs: auto | device | host): on the device, or in
host memory (pinned on CUDA) from which every candidate streams them in row chunks, so the
device holds only the chunk buffers. `auto`: the device when the plan fits there, else the
host; a plan that does not fit even with host placement is an exit 2.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from evomerge.errors import ConfigError, did_you_mean
from evomerge.merge.memory import memory_figures
from evomerge.merge.resident import PLACEMENTS
from evomerge.merge.table import get_method

GIB = 1 << 30
CUDA_RESERVE = 2 * GIB  # CUDA context, allocator slack and activations outside the engine
MIN_KV = GIB  # below this a vLLM engine on CUDA holds too few sequences to be worth starting
_ITEM = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
# mask statistics, bytes per entry and model row, by sparsification kind (merge/sparsify.py)
_MASK_STATS = {
    "magnitude": {"order": 4},
    "breadcrumbs": {"order": 4},
    "random": {"draws": 2},
    "della": {"draws": 2, "ranks": 2},
}
INPUTS = ("auto", *PLACEMENTS)  # eval.inputs: where the merger's inputs live
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}  # fmt: skip


def parse_bytes(text: str, where: str = "--gpu-memory") -> int:
    """'80GiB', '141GB', '8e9' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else ""
    if m is None or unit not in _UNITS:
        raise ConfigError(f"{where}: expected a size such as 80GiB or 141GB, but got {text!r}")
    return int(float(m.group(1)) * _UNITS[unit])


def fmt_bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


@dataclass
class ModelInfo:
    ref: str
    architecture: str
    params: int
    dtype: str  # the tensors' dtype ("mixed: a, b" when they differ)
    adapter_bytes: int = 0  # BASE+ADAPTER: the adapter's factors


@dataclass
class MemoryPlan:
    backend: str
    device: str
    budget: int | None  # bytes of the device (None: unknown, nothing is checked)
    inputs: dict[str, int] = field(default_factory=dict)  # the merger's share, by part
    engine: dict[str, int] = field(default_factory=dict)  # the engine's share, by part
    utilization: float | None = None  # vLLM gpu_memory_utilization the search uses
    user_utilization: bool = False
    placement: str = "device"  # where the resident inputs live: "device" or "host"
    host: dict[str, int] = field(default_factory=dict)  # host placement: the inputs, by part
    host_budget: int | None = None  # the host's RAM, when known

    @property
    def total(self) -> int:
        """Bytes on the device."""
        return sum(self.inputs.values()) + sum(self.engine.values())

    def lines(self) -> list[str]:
        where = f"{self.device} ({fmt_bytes(self.budget)})" if self.budget else self.device
        out = [f"memory plan on {where}, backend {self.backend}:"]
        if self.placement == "host":
            pinned = "pinned " if str(self.device).startswith("cuda") else ""
            out.append(
                f"  inputs placement: host ({pinned}host memory, streamed per candidate in row "
                "chunks; the device holds the chunk buffers)"
            )
            host = sum(self.host.values())
            for part, n in [*self.host.items(), ("total in host memory", host)]:
                out.append(f"  {'host: ' + part:<44} {n:>16,d} B  {fmt_bytes(n):>12}")
            if self.host_budget and host > self.host_budget:
                out.append(f"  (more than this machine's {fmt_bytes(self.host_budget)})")
        elif self.inputs:
            out.append("  inputs placement: device (resident beside the engine)")
        for part, n in [*self.inputs.items(), *self.engine.items()]:
            out.append(f"  {part:<44} {n:>16,d} B  {fmt_bytes(n):>12}")
        label = "total on the device" if self.host else "total"
        out.append(f"  {label:<44} {self.total:>16,d} B  {fmt_bytes(self.total):>12}")
        if self.utilization is not None:
            how = "set in eval.vllm" if self.user_utilization else "from what is left"
            out.append(f"  vLLM gpu_memory_utilization {self.utilization:.2f} ({how})")
        return out


def describe_model(ref: str, reader: Any) -> ModelInfo:
    """Architecture, parameter count and dtype from config.json and the headers."""
    cfg = reader.config
    arch = ",".join(cfg.get("architectures") or [cfg.get("model_type", "?")])
    dtypes = sorted({reader.dtype_name(n) for n in reader.keys()})
    params = sum(math.prod(reader.shape(n)) for n in reader.keys())
    factors = _adapter_bytes(getattr(reader, "adapter", None))
    dtype = dtypes[0] if len(dtypes) == 1 else "mixed: " + ", ".join(dtypes)
    return ModelInfo(ref, arch, params, dtype, factors)


def _adapter_bytes(adapter: Any) -> int:
    """The adapter file's tensor bytes (its factors), from the file size: no tensor is read."""
    path = getattr(adapter, "path", None)
    files = sorted(path.glob("adapter_model*.safetensors")) if path is not None else []
    return sum(f.stat().st_size for f in files)


def _resident(readers: list[Any]) -> tuple[dict[str, int], int, int]:
    """({resident dtype: entries per input}, entries per input, largest tensor's entries)."""
    first = readers[0]
    by_dtype: dict[str, int] = {}
    largest = 0
    for name in first.keys():
        numel = math.prod(first.shape(name))
        kinds = {r.dtype_name(name) for r in readers}
        dt = kinds.pop() if len(kinds) == 1 else "float32"
        dt = dt if dt in ("bfloat16", "float16", "float32") else "float32"
        by_dtype[dt] = by_dtype.get(dt, 0) + numel
        largest = max(largest, numel)
    return by_dtype, sum(by_dtype.values()), largest


def merge_buffers(methods: list[str], readers: list[Any]) -> tuple[str, int]:
    """(method, bytes) of the largest row-chunk working set among `methods`: what the
    candidate path holds while it merges (memory_figures, which also sets its chunks)."""
    by_dtype, _, largest = _resident(readers)
    held = _ITEM[next(iter(by_dtype))] if len(by_dtype) == 1 else 4
    figures = [memory_figures(m, len(readers), held) for m in methods]
    top = max(figures, key=lambda f: f.peak_bytes(largest))
    return top.method, top.peak_bytes(largest)


def merger_share(
    methods: list[str], readers: list[Any], infos: list[ModelInfo], *, backend: str = "hf",
    placement: str = "device",
) -> tuple[dict[str, int], dict[str, int]]:  # fmt: skip
    """The CandidateMerger's bytes by part (see the module docstring): (on the device, in
    host memory); with host placement the device holds only the merge buffers."""
    n = len(readers)
    by_dtype, entries, largest = _resident(readers)
    resident: dict[str, int] = {}
    for dt, e in by_dtype.items():
        resident[f"resident inputs ({n} x {dt})"] = n * e * _ITEM[dt]
    adapters = sum(i.adapter_bytes for i in infos)
    if adapters:
        resident["low-rank adapters (factors)"] = adapters
    table = [get_method(m) for m in methods]
    rows = n - 1  # the models' rows beside the base
    stats: dict[str, int] = {}
    for m in table:
        stats.update(_MASK_STATS.get(str(dict(m.options).get("kind")), {}))
    device: dict[str, int] = {} if placement == "host" else resident
    if stats and placement == "device":  # host placement streams: no statistic is kept
        label = "+".join(sorted(stats))
        device[f"mask statistics ({label}, {rows} rows)"] = rows * entries * sum(stats.values())
    method, peak = merge_buffers(methods, readers)
    device[f"merge buffers ({method} row chunks)"] = peak
    if backend == "vllm":  # merged() hands the engine whole float32 tensors
        device["merged tensor for vLLM (largest, float32)"] = largest * 4
    return device, ({} if placement == "device" else resident)


def engine_dtype(backend: str, device: str, engine_kw: dict, model_dtype: str) -> str:
    """The dtype the engine holds its weights in (its own defaults, see the backends)."""
    if str(device).startswith("cpu"):
        return str(engine_kw.get("dtype") or "float32")  # both backends: fp32 on CPU
    if backend == "hf":
        return "bfloat16"  # eval/hf/settings.resolve_dtype's GPU default
    dt = str(engine_kw.get("dtype") or "auto")
    dt = model_dtype if dt == "auto" else {"half": "float16", "float": "float32"}.get(dt, dt)
    return dt if dt in _ITEM else "bfloat16"


def device_budget(device: str, gpu_memory: int | None) -> int | None:
    """--gpu-memory, else the CUDA device's total memory, else the host's RAM on CPU."""
    if gpu_memory is not None:
        return gpu_memory
    if str(device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: no CUDA device here; give --gpu-memory SIZE")
        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def host_budget() -> int | None:
    """This machine's RAM (None: unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def check_placement(value: Any, where: str) -> str:
    if value not in INPUTS:
        raise ConfigError(f"{where}: {did_you_mean(str(value), INPUTS, 'placement')}")
    return str(value)


def plan_memory(
    methods: list[str], readers: list[Any], infos: list[ModelInfo], *, backend: str,
    device: str, budget: int | None, engine_kw: dict, merges: bool = True, stack_copies: int = 0,
    inputs: str = "auto",
) -> MemoryPlan:  # fmt: skip
    """The whole plan; ConfigError (exit 2, with the numbers) when it cannot fit. `merges`
    False: no weights are merged (a stacking-only space); `stack_copies`: the source models a
    layer-stacking search keeps resident beside the engine (loop/stacking.py); `inputs`: the
    placement (auto: the device when it fits there, else the host; on a CPU device, auto is
    the device, the same memory)."""
    check_placement(inputs, "eval.inputs")
    kw = dict(budget=budget, engine_kw=engine_kw, merges=merges, stack_copies=stack_copies)
    args = (methods, readers, infos, backend, device)
    if inputs != "auto" or not merges:
        return _plan_at(*args, placement="device" if inputs == "auto" else inputs, **kw)
    try:
        return _plan_at(*args, placement="device", **kw)
    except ConfigError:
        if not str(device).startswith("cuda"):
            raise
    return _plan_at(*args, placement="host", **kw)


def _plan_at(
    methods: list[str], readers: list[Any], infos: list[ModelInfo], backend: str, device: str,
    *, placement: str, budget: int | None, engine_kw: dict, merges: bool, stack_copies: int,
) -> MemoryPlan:  # fmt: skip
    """The plan with the inputs at `placement`; ConfigError when it does not fit."""
    on_device, on_host = (
        merger_share(methods, readers, infos, backend=backend, placement=placement)
        if merges
        else ({}, {})
    )
    plan = MemoryPlan(backend, device, budget, inputs=on_device, placement=placement,
                      host=on_host, host_budget=host_budget() if on_host else None)  # fmt: skip
    base = readers[0]
    weights = sum(math.prod(base.shape(n)) for n in base.keys())
    dt = engine_dtype(backend, device, engine_kw, infos[0].dtype)
    plan.engine[f"engine weights ({dt})"] = weights * _ITEM[dt]
    if stack_copies:
        plan.engine[f"resident stacking sources ({stack_copies} x {dt})"] = (
            stack_copies * weights * _ITEM[dt]
        )
    merger = sum(plan.inputs.values())
    cuda = str(device).startswith("cuda")
    if backend == "vllm" and cuda and budget:
        util = engine_kw.get("gpu_memory_utilization")
        plan.user_utilization = util is not None
        if util is None:  # what is left beside the merger, floored to a hundredth
            util = math.floor(100 * (budget - merger - CUDA_RESERVE) / budget) / 100
        plan.utilization = float(util)
        share = int(plan.utilization * budget)
        plan.engine["engine KV cache + activations (vLLM)"] = max(0, share - weights * _ITEM[dt])
        if share - weights * _ITEM[dt] < MIN_KV or merger + share > budget:
            raise ConfigError(_no_fit(plan, merger, share))
    elif backend == "vllm":
        plan.engine["engine KV cache (vLLM CPU)"] = int(
            engine_kw.get("kv_cache_memory_bytes") or GIB
        )
    shared = 0 if cuda else sum(on_host.values())  # on the CPU, host memory is the device's
    if budget and plan.total + shared > budget:
        raise ConfigError(_no_fit(plan, merger + shared, sum(plan.engine.values())))
    return plan


def _no_fit(plan: MemoryPlan, merger: int, engine: int) -> str:
    parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in plan.inputs.items())
    util = f" at gpu_memory_utilization {plan.utilization:.2f}" if plan.utilization else ""
    where, hint = "the merger's inputs", "keep the inputs in host memory (eval.inputs: host), "
    if plan.placement == "host":
        host = sum(plan.host.values())
        where = f"the merger with its inputs in host memory ({fmt_bytes(host)} there)"
        hint = ""
    return (
        f"the search does not fit on {plan.device}: it needs {fmt_bytes(merger)} for "
        f"{where} ({parts}) plus {fmt_bytes(engine)} for the {plan.backend} engine"
        f"{util} (its weights alone {fmt_bytes(next(iter(plan.engine.values())))} and at least "
        f"{fmt_bytes(MIN_KV)} of KV cache on CUDA), but the device has "
        f"{fmt_bytes(plan.budget or 0)} (--gpu-memory); {hint}"
        "use fewer or smaller models, or a larger device"
    )
