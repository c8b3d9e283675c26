"""Dot products of whole tensors whose value does not depend on how the tensor is cut.

slerp's angle, model_stock's cosines, multislerp's and karcher's geometry and sce's weights
are functions of the Gram matrix of a few vectors (dot products of models or task vectors).
A float32 `torch.sum` rounds in an order that depends on the tensor's size and the thread
count, so a sum over row chunks would differ from the whole-tensor sum in its last bits.
Here every sum is defined exactly, for any cut along dim 0:

- products in float32 (as mergekit computes them);
- "flat" (one number per tensor): each dim-0 row summed on its own (`row_sums`, float32),
  then the row sums added in float64 with math.fsum (exactly rounded, so order free);
- "last" (one number per last-dim vector): `row_sums` along the last dim;
- "first" (one number per position of the trailing dims, summed over dim 0): the rows
  added one after another in row order, in float64.

Both the whole-tensor merge and the row-chunked one call `Gram.add` (once, or once per
chunk), so their coefficients are the same bits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

MODES = ("flat", "last", "first")
_BLOCK = 1 << 22  # entries per vector in one block (bounds the temporaries; few large ops)


def row_sums(p: torch.Tensor) -> torch.Tensor:
    """Sum of each row of a contiguous p  # (N, c) -> (N,), a row's sum depending on that
    row only: with two or more outputs torch reduces every row in one fixed cascade (the
    work is split across threads by output rows); a single output would be split along
    the row, so one row is summed beside a zero row. tests/test_gram.py checks row sums
    against slices of one row and of a few rows."""
    if p.shape[0] == 1:
        return torch.cat([p, torch.zeros_like(p)]).sum(dim=1)[:1]
    return p.sum(dim=1)


class Gram:
    """Accumulates the Gram matrix of k vectors given chunk by chunk along dim 0.

    add(vectors): k tensors of one chunk's shape (r, *trail), any float dtype.
    result(): float64 (k, k, *S): S = () for "flat", (vectors,) for "last" (the last-dim
    vectors of what was added, in order), trail for "first". diag=True: only the squared
    norms are summed (the off-diagonal entries are NaN).
    """

    def __init__(self, mode: str, k: int, diag: bool = False) -> None:
        assert mode in MODES, mode
        self.mode, self.k = mode, k
        self.pairs = [(i, i) for i in range(k)] if diag else _pairs(k)
        self._parts: list[list[torch.Tensor]] = [[] for _ in self.pairs]
        self._acc: torch.Tensor | None = None
        self._prod: torch.Tensor | None = None

    def add(self, vectors: Sequence[torch.Tensor]) -> None:
        assert len(vectors) == self.k
        shape = tuple(vectors[0].shape)
        if self.mode == "first":
            width = max(1, math.prod(shape[1:]))
        else:
            width = shape[-1] if self.mode == "last" and shape else max(1, math.prod(shape[1:]))
        flat = [v.reshape(-1, width) for v in vectors]  # (rows or vectors, width)
        step = max(1, _BLOCK // width)
        for a in range(0, flat[0].shape[0], step):
            x = [f[a : a + step].to(torch.float32) for f in flat]
            prod = self._buf(x[0].shape, x[0])
            for p, (i, j) in enumerate(self.pairs):
                torch.mul(x[i], x[j], out=prod)
                if self.mode == "first":
                    self._add_rows(p, prod.view(-1, *shape[1:]))
                else:
                    self._parts[p].append(row_sums(prod).to(torch.float64))

    def _buf(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A reused float32 buffer (a fresh large one costs page faults on every block)."""
        n = math.prod(shape)
        if self._prod is None or self._prod.numel() < n:
            self._prod = torch.empty(n, dtype=torch.float32, device=like.device)
        return self._prod[:n].view(shape)

    def _add_rows(self, p: int, prod: torch.Tensor) -> None:
        if self._acc is None:
            self._acc = torch.zeros((len(self.pairs), *prod.shape[1:]), dtype=torch.float64,
                                    device=prod.device)  # fmt: skip
        for r in range(prod.shape[0]):  # row order: the same adds for any cut
            self._acc[p] += prod[r]

    def result(self) -> torch.Tensor:
        if self.mode == "first":
            assert self._acc is not None
            sums = self._acc
        elif self.mode == "flat":
            sums = torch.tensor(
                [math.fsum(torch.cat(p).tolist()) for p in self._parts], dtype=torch.float64
            )
        else:
            sums = torch.stack([torch.cat(p) for p in self._parts])
        out = torch.full((self.k, self.k, *sums.shape[1:]), math.nan, dtype=torch.float64,
                         device=sums.device)  # fmt: skip
        for s, (i, j) in zip(sums, self.pairs, strict=True):
            out[i, j] = s
            out[j, i] = s
        return out


def _pairs(k: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(k) for j in range(i, k)]


def gram_of(mode: str, vectors: Sequence[torch.Tensor], diag: bool = False) -> torch.Tensor:
    """The Gram matrix of whole tensors (one add)."""
    g = Gram(mode, len(vectors), diag)
    g.add(vectors)
    return g.result()
