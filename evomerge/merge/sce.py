"""sce (select, calculate, erase) over row chunks, bit-identical to the whole-tensor merge.

mergekit 0.1.5 `sce_merge`: keep the int(select_topk * #nonzero) entries whose task vectors
vary most across the models, weight each model by the mean square of its kept deltas, and
average the deltas whose sign agrees with their summed sign. Three whole-tensor numbers,
each taken in streaming passes with an order-free definition: the nonzero count (an
integer), the variance cut (radix.magnitude_cuts: an exact radix selection; entries
equal at the cut are kept from the highest flat index down, as a stable ascending sort
would) and the squared norms (gram.py). Per-entry sums over the models run in model order.

The per-entry steps (variance; selected task vectors; the erase-and-average) are entry
functions run by kernel.Kernels: eagerly in cache-sized pieces, or compiled into one fused
loop per pass for a large disk merge (the same bits: IEEE operations only, in one order).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from evomerge.merge import radix
from evomerge.merge.buffers import Arena
from evomerge.merge.gram import Gram
from evomerge.merge.gta import EAGER, below
from evomerge.merge.kernel import Kernels, Spec, threshold
from evomerge.merge.twopass import one_chunk

if TYPE_CHECKING:
    from evomerge.merge.contract import MergeInputs
    from evomerge.merge.twopass import Chunks, Write

Cut = tuple[float, int]  # keep var > thr, or var == thr at flat index >= first


def sce_whole(inputs: MergeInputs) -> torch.Tensor:
    return one_chunk(inputs, lambda chunks, write: sce_run(chunks, write, inputs.kernels))


def sce_run(chunks: Chunks, write: Write, kernels: Kernels | None = None) -> None:
    kernels = kernels or EAGER
    _, first = next(chunks())
    rows = first.non_base_rows()
    if not rows:
        for r0, inp in chunks():
            write(r0, inp.base.to(torch.float32, copy=True))
        return
    topk = float(first.params["select_topk"])
    # kind "select": entries are selected by the variance cut (select_topk >= 1: none is)
    spec = Spec("select" if topk < 1 else None, True, True, tuple(rows), first.base_index)
    arena = Arena(first.models.device)
    cut = _variance_cut(spec, chunks, topk, kernels, arena) if topk < 1 else (0.0, 0)
    p = torch.tensor([cut[0], below(cut[0]), *([0.0] * len(rows))], dtype=torch.float32)
    gram = Gram("flat", len(rows), diag=True)
    n = 0
    for r0, inp in chunks():
        x, a = _flat(inp), r0 * _row_size(inp)
        tv = arena.get("sce_tv", (len(rows), x.shape[1]), torch.float32)
        kernels.run_into(_selected_into, spec, list(tv), x, [], p, [cut[1]], a)
        gram.add([v.view(inp.models.shape[1:]) for v in tv])
        n += x.shape[1]
    g = gram.result()
    w = [float(g[i, i]) / max(n, 1) for i in range(g.shape[0])]  # mean squared delta
    total = math.fsum(w)
    w = [1.0 / len(w)] * len(w) if abs(total) < 1e-6 else [x / total for x in w]
    p[2:] = torch.tensor(w, dtype=torch.float32)
    for r0, inp in chunks():
        x = _flat(inp)
        out = arena.get("sce_out", (x.shape[1],), torch.float32)
        kernels.run_into(_apply_into, spec, [out], x, [], p, [cut[1]], r0 * _row_size(inp))
        write(r0, out.view(inp.models.shape[1:]))


def _flat(inp: MergeInputs) -> torch.Tensor:
    return inp.models.reshape(inp.models.shape[0], -1)


def _row_size(inp: MergeInputs) -> int:
    """Entries per dim-0 row (flat index of a chunk's first entry: r0 * this)."""
    return math.prod(inp.models.shape[2:])


# ---- entry functions (kernel.py's conventions: x  # (n_in, L), p float32, firsts) ----------


def _task_vectors(spec: Spec, x) -> list:
    base = x[spec.base].to(torch.float32)
    return [x[r].to(torch.float32) - base for r in spec.rows]


def _sum(vs: list):
    out = vs[0]
    for v in vs[1:]:
        out = out + v
    return out


def _variance(tv: list):
    """Population variance across the models, entry by entry (model order)."""
    mean = _sum(tv) / len(tv)
    dev = [v - mean for v in tv]
    return _sum([d * d for d in dev]) / len(tv)


def _variance_into(spec: Spec, outs, x, stats, p, firsts, a) -> None:
    outs[0].copy_(_variance(_task_vectors(spec, x)))


def _selection(spec: Spec, x, p, firsts, a: int):
    """(task vectors, each times the 0/1 float mask of selected entries, as mergekit
    multiplies): p[0] is the cut's variance, p[1] the float32 just below it."""
    tv = _task_vectors(spec, x)
    if spec.kind is None:
        return tv
    var = _variance(tv)
    keep = (var > threshold(p[0], p[1], firsts[0], a, var.shape[0], var.device)).to(torch.float32)
    return [v * keep for v in tv]


def _selected_into(spec: Spec, outs, x, stats, p, firsts, a) -> None:
    for out, v in zip(outs, _selection(spec, x, p, firsts, a), strict=True):
        out.copy_(v)


def _apply_into(spec: Spec, outs, x, stats, p, firsts, a) -> None:
    """base + the weighted mean of the deltas that agree with the elected sign (weights
    p[2:])."""
    tv = _selection(spec, x, p, firsts, a)
    elected = (_sum(tv) >= 0).to(torch.float32) * 2 - 1
    erased = [p[2 + j] * (v.sign() == elected).to(torch.float32) for j, v in enumerate(tv)]
    merged = _sum([v * e for v, e in zip(tv, erased, strict=True)])
    outs[0].copy_(x[spec.base].to(torch.float32) + merged / _sum(erased).clamp(min=1e-6))


def _variance_cut(spec: Spec, chunks: Chunks, topk: float, kernels: Kernels, arena) -> Cut:
    """The cut keeping int(topk * #nonzero variances) entries (none when topk <= 0). The
    nonzero count is taken during the selection's first pass, which fixes the position."""
    nonzero, first_pass = [0], [True]

    def streams():
        for _, inp in chunks():
            x = _flat(inp)
            var = arena.get("sce_var", (x.shape[1],), torch.float32)
            kernels.run_into(_variance_into, spec, [var], x, [], None)
            if first_pass[0]:
                nonzero[0] += int(torch.count_nonzero(var))
            yield (var,)
        first_pass[0] = False

    def position(n: int) -> list[tuple[int, int]]:
        k = int(nonzero[0] * topk) if topk > 0 else 0
        return [(0, n - k)]  # k == 0: position n keeps nothing, (inf, n)

    return radix.magnitude_cuts(streams, position)[0]
