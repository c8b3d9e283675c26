"""sce (select, calculate, erase) over row chunks, bit-identical to the whole-tensor merge.

mergekit 0.1.5 `sce_merge`: keep the int(select_topk * #nonzero) entries whose task vectors
vary most across the models, weight each model by the mean square of its kept deltas, and
average the deltas whose sign agrees with their summed sign. Three whole-tensor numbers,
each taken in streaming passes with an order-free definition: the nonzero count (an
integer), the variance cut (radix.magnitude_cuts: an exact radix selection; entries
equal at the cut are kept from the highest flat index down, as a stable ascending sort
would) and the squared norms (gram.py). Per-entry sums over the models run in model order.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from evomerge.merge import radix
from evomerge.merge.gram import Gram
from evomerge.merge.twopass import Blocks, one_chunk, row_blocks, task_vectors

if TYPE_CHECKING:
    from evomerge.merge.contract import MergeInputs
    from evomerge.merge.twopass import Chunks, Write

Cut = tuple[float, int]  # keep var > thr, or var == thr at flat index >= first


def sce_whole(inputs: MergeInputs) -> torch.Tensor:
    return one_chunk(inputs, sce_run)


def sce_run(chunks: Chunks, write: Write) -> None:
    _, first = next(chunks())
    if not first.non_base_rows():
        for r0, inp in chunks():
            write(r0, inp.base.clone())
        return
    topk = float(first.params["select_topk"])
    cut = _variance_cut(chunks, topk) if topk < 1 else None
    gram = Gram("flat", len(first.non_base_rows()), diag=True)
    n = 0
    for r0, inp in chunks():
        for a, blk in row_blocks(inp):
            tv = _selected(blk, r0 + a, cut)
            gram.add(tv)
            n += tv[0].numel()
    g = gram.result()
    w = [float(g[i, i]) / max(n, 1) for i in range(g.shape[0])]  # mean squared delta
    total = math.fsum(w)
    w = [1.0 / len(w)] * len(w) if abs(total) < 1e-6 else [x / total for x in w]
    weights = [torch.tensor(x, dtype=torch.float32) for x in w]
    out = Blocks()
    for r0, inp in chunks():
        merged = out.fill(inp, lambda a, blk: _apply(blk, _selected(blk, r0 + a, cut), weights))  # noqa: B023
        write(r0, merged)


def _variance(tv: list[torch.Tensor]) -> torch.Tensor:
    """Population variance across the models, entry by entry (model order)."""
    mean = _sum(tv) / len(tv)
    return _sum([(v - mean).square_() for v in tv]) / len(tv)


def _sum(vs: list[torch.Tensor]) -> torch.Tensor:
    out = vs[0].clone()
    for v in vs[1:]:
        out += v
    return out


def _variance_cut(chunks: Chunks, topk: float) -> Cut:
    """The cut keeping int(topk * #nonzero variances) entries (none when topk <= 0). The
    nonzero count is taken during the selection's first pass, which fixes the position."""
    nonzero, first_pass = [0], [True]

    def streams():
        for _, inp in chunks():
            for _, blk in row_blocks(inp):
                var = _variance(task_vectors(blk)).reshape(-1)
                if first_pass[0]:
                    nonzero[0] += int(torch.count_nonzero(var))
                yield (var,)
        first_pass[0] = False

    def position(n: int) -> list[tuple[int, int]]:
        k = int(nonzero[0] * topk) if topk > 0 else 0
        return [(0, n - k)]  # k == 0: position n keeps nothing, (inf, n)

    return radix.magnitude_cuts(streams, position)[0]


def _selected(inp: MergeInputs, r0: int, cut: Cut | None) -> list[torch.Tensor]:
    """The task vectors, times the 0/1 mask of selected entries (as mergekit multiplies)."""
    tv = task_vectors(inp)
    if cut is None:
        return tv
    var = _variance(tv)
    a = r0 * math.prod(var.shape[1:]) if var.dim() else 0
    index = torch.arange(a, a + var.numel(), device=var.device).view(var.shape)
    keep = (var > cut[0]) | ((var == cut[0]) & (index >= cut[1]))
    mask = keep.to(tv[0].dtype)
    return [v * mask for v in tv]


def _apply(inp: MergeInputs, tv: list[torch.Tensor], weights: list[torch.Tensor]) -> torch.Tensor:
    """base + the weighted mean of the deltas that agree with the elected sign."""
    elected = (_sum(tv) >= 0).to(tv[0].dtype) * 2 - 1
    erased = [w * (v.sign() == elected) for w, v in zip(weights, tv, strict=True)]
    merged = _sum([v * e for v, e in zip(tv, erased, strict=True)])
    return inp.base + merged / _sum(erased).clamp(min=1e-6)
