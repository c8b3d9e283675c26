"""Merges that need dot products over the whole tensor, in two streaming passes.

slerp, nuslerp, multislerp, karcher and model_stock are each a Plan: the vectors whose
Gram matrix (gram.py) the method reads, how the Gram matrix becomes coefficients, and how
the coefficients apply to one chunk of rows entry by entry. `run` takes the Gram matrix in
a first pass over the row chunks (none when each last-dim vector is merged on its own)
and applies it in a second; the whole-tensor merge (`whole`) is the same run over one
chunk, so both give the same bits for every cut (tests/test_chunked.py). sce, which also
selects entries, is in sce.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from evomerge.errors import ConfigError, MergeError
from evomerge.merge import spherical as sph
from evomerge.merge.gram import Gram, gram_of

if TYPE_CHECKING:
    from evomerge.merge.contract import MergeInputs

Chunks = Callable[[], Iterator[tuple[int, "MergeInputs"]]]  # (first row, inputs of the chunk)
Write = Callable[[int, torch.Tensor], None]  # (first row, merged rows)
Vectors = Callable[["MergeInputs"], list[torch.Tensor]]
BlockFn = Callable[[int, "MergeInputs"], torch.Tensor]  # (first row, row block) -> its rows


@dataclass(frozen=True)
class Plan:
    """mode: gram.py's "flat" / "last" / "first", or None (entry by entry, no statistic)."""

    mode: str | None
    vectors: Vectors
    finish: Callable[[torch.Tensor], Any]  # Gram matrix -> coefficients
    apply: Callable[[MergeInputs, Any], torch.Tensor]  # (chunk, coefficients) -> rows


def run(method: str, chunks: Chunks, write: Write) -> None:
    """Merge one tensor given as row chunks with `method` (a name in PLANS)."""
    _, first = next(chunks())
    plan = PLANS[method](first)
    out = Blocks()
    if plan.mode is None:
        for r0, inp in chunks():
            write(r0, out.fill(inp, lambda _, blk: plan.apply(blk, None)))
    elif plan.mode == "last":  # each vector lies inside one row: one pass
        last = lambda _, blk: plan.apply(blk, plan.finish(gram_of("last", plan.vectors(blk))))  # noqa: E731
        for r0, inp in chunks():
            write(r0, out.fill(inp, last))
    else:
        gram = Gram(plan.mode, len(plan.vectors(next(row_blocks(first))[1])))
        for _, inp in chunks():
            for _, blk in row_blocks(inp):
                gram.add(plan.vectors(blk))
        coeffs = plan.finish(gram.result())
        for r0, inp in chunks():
            write(r0, out.fill(inp, lambda _, blk: plan.apply(blk, coeffs)))


BLOCK = 1 << 18  # entries of a row block (a MiB of float32: its temporaries stay in cache)


def row_blocks(inp: MergeInputs) -> Iterator[tuple[int, MergeInputs]]:
    """(first row, inputs) of consecutive blocks of whole dim-0 rows, about BLOCK entries
    each. Every per-entry step and every row sum of these methods reads whole rows, so
    blocks give the chunk's bits; whole-chunk temporaries (a fresh 32 MiB each, a dozen a
    chunk) cost page faults and fragmented the C heap to several GB (measured: sce at 7B)."""
    shape = tuple(inp.models.shape[1:])
    step = max(1, BLOCK // max(1, math.prod(shape[1:]))) if shape else 1
    if not shape or step >= shape[0]:
        yield 0, inp
        return
    for a in range(0, shape[0], step):
        rows = slice(a, a + step)
        yield (
            a,
            replace(
                inp,
                models=inp.models[:, rows],
                base=None if inp.base is None else inp.base[rows],
                deltas=None if inp.deltas is None else inp.deltas[:, rows],
                out=None,
            ),
        )


class Blocks:
    """A chunk's result assembled from its row blocks in one buffer, reused by the next
    chunk (a chunk's rows are written before the next chunk is merged)."""

    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None

    def fill(
        self, inp: MergeInputs, fn: Callable[[int, MergeInputs], torch.Tensor]
    ) -> torch.Tensor:
        """fn(first row, block) over inp's row blocks, as one tensor of the chunk's shape."""
        blocks = row_blocks(inp)
        a, blk = next(blocks)
        part = fn(a, blk)
        shape = tuple(inp.models.shape[1:])
        if tuple(part.shape) == shape:  # one block: the chunk itself
            return part
        n = math.prod(shape)
        if self._buf is None or self._buf.numel() < n or self._buf.dtype != part.dtype:
            self._buf = torch.empty(n, dtype=part.dtype, device=part.device)
        out = self._buf[:n].view(shape)
        out[: part.shape[0]].copy_(part)
        for a, blk in blocks:
            part = fn(a, blk)
            out[a : a + part.shape[0]].copy_(part)
        return out


def whole(inputs: MergeInputs, method: str) -> torch.Tensor:
    """The merge of a whole tensor: `run` over a single chunk."""
    return one_chunk(inputs, lambda chunks, write: run(method, chunks, write))


def one_chunk(inputs: MergeInputs, streamed: Callable[[Chunks, Write], None]) -> torch.Tensor:
    """What a streamed merge writes when the whole tensor is its only chunk."""
    out: list[torch.Tensor] = []
    streamed(lambda: iter([(0, inputs)]), lambda _, rows: out.append(rows))
    return out[0]


def task_vectors(inp: MergeInputs) -> list[torch.Tensor]:
    """Each non-base row minus the base (precomputed deltas when the caller has them)."""
    rows = inp.non_base_rows()
    if inp.deltas is not None:
        return list(inp.deltas.unbind(0))
    return [inp.models[r] - inp.base for r in rows]


def broadcast(mode: str | None, c: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Per-vector numbers  # (*S) shaped to broadcast over a chunk of `shape`."""
    if mode == "last" and len(shape) >= 2:
        return c.reshape(*shape[:-1], 1)
    if mode == "first" and len(shape) >= 2:
        return c.reshape(1, *shape[1:])
    return c.reshape(())


def mode_for(vector_dim: int, inp: MergeInputs) -> str:
    """gram mode of vectors along dim `vector_dim` (-1, 0, or None: the flattened tensor);
    a 1-D tensor is a single vector either way."""
    if vector_dim is None or inp.models.dim() < 3:
        return "flat"
    return "last" if vector_dim == -1 else "first"


def _slerp(inp: MergeInputs) -> Plan:
    bi, other = inp.base_index, inp.non_base_rows()[0]
    t = float(inp.params["t"])

    def apply(x: MergeInputs, c) -> torch.Tensor:
        return c[0] * x.models[bi] + c[1] * x.models[other]

    return Plan(
        "flat",
        lambda x: [x.models[bi], x.models[other]],
        lambda g: sph.slerp_coeffs(t, g),
        apply,
    )


def _nuslerp(inp: MergeInputs) -> Plan:
    rows = inp.non_base_rows()
    if len(rows) != 2:
        raise ConfigError(f"nuslerp merges exactly 2 models besides the base, but got {len(rows)}")
    w = inp.model_params["weight"][rows].tolist()
    total = sum(w)
    t = 0.5 if abs(total) < 1e-6 else w[1] / total
    flat, row_wise = bool(inp.params["nuslerp_flatten"]), bool(inp.params["nuslerp_row_wise"])
    mode = mode_for(None if flat else 0 if row_wise else -1, inp)

    def vectors(x: MergeInputs) -> list[torch.Tensor]:
        return [x.models[r] for r in rows] if x.base is None else task_vectors(x)

    def apply(x: MergeInputs, cos: torch.Tensor) -> torch.Tensor:
        v0, v1 = vectors(x)
        res = sph.nuslerp_apply(t, broadcast(mode, cos, v0.shape), v0, v1)
        return res if x.base is None else x.base + res

    return Plan(mode, vectors, sph.nuslerp_cos, apply)


def _multislerp(inp: MergeInputs) -> Plan:
    rows = inp.non_base_rows()
    if not rows:
        raise ConfigError("multislerp needs at least one model besides the base")
    if len(rows) == 1:
        return Plan(None, lambda x: [], lambda g: None, lambda x, _: x.models[rows[0]].clone())
    weights = inp.model_params["weight"][rows].tolist()
    norm_w, eps = bool(inp.params["normalize_weights"]), float(inp.params["eps"])

    def vectors(x: MergeInputs) -> list[torch.Tensor]:
        return [x.models[r] for r in rows] if x.base is None else task_vectors(x)

    def finish(g: torch.Tensor) -> list[float]:
        try:
            return sph.multislerp_coeffs(g, weights, normalize_weights=norm_w, eps=eps)
        except ValueError as exc:
            raise MergeError(f"tensor '{inp.tensor_name}': {exc}") from None

    def apply(x: MergeInputs, c: list[float]) -> torch.Tensor:
        merged = sph.combine(c, vectors(x))
        return merged if x.base is None else merged + x.base

    return Plan("flat", vectors, finish, apply)


def _karcher(inp: MergeInputs) -> Plan:
    n = inp.models.shape[0]
    if n == 1:
        return Plan(None, lambda x: [], lambda g: None, lambda x, _: x.models[0].clone())
    max_iter, tol = int(inp.params["max_iter"]), float(inp.params["tol"])

    def apply(x: MergeInputs, c: list[float]) -> torch.Tensor:
        if not any(c):  # no input has a direction
            return torch.zeros_like(x.models[0])
        return sph.combine(c, list(x.models.unbind(0)))

    return Plan(
        "flat",
        lambda x: list(x.models.unbind(0)),
        lambda g: sph.karcher_coeffs(g, [1.0 / n] * n, max_iter=max_iter, tol=tol),
        apply,
    )


def _model_stock(inp: MergeInputs) -> Plan:
    rows = inp.non_base_rows()
    n = len(rows)
    mode = mode_for(-1 if inp.params["filter_wise"] else None, inp)

    def finish(g: torch.Tensor) -> torch.Tensor:
        cos = []
        for a in range(n):
            for b in range(a + 1, n):
                norm = (g[a, a].sqrt() * g[b, b].sqrt()).clamp(min=1e-6)
                cos.append((g[a, b] / norm).clamp(-1, 1))
        cos_theta = sum(cos[1:], cos[0]) / len(cos)
        denom = 1 + (n - 1) * cos_theta
        singular = denom.abs() < 1e-6  # no finite estimate: keep the base there
        safe = torch.where(singular, torch.ones_like(denom), denom)
        t = torch.where(singular, torch.zeros_like(cos_theta), (n * cos_theta) / safe)
        return t.to(torch.float32)

    def apply(x: MergeInputs, t: torch.Tensor) -> torch.Tensor:
        t = broadcast(mode, t, x.base.shape)
        average = sum(x.models[r] for r in rows) / n
        return t * average + (1 - t) * x.base

    return Plan(mode, task_vectors, finish, apply)


PLANS: dict[str, Callable[[MergeInputs], Plan]] = {
    "slerp": _slerp,
    "nuslerp": _nuslerp,
    "multislerp": _multislerp,
    "karcher": _karcher,
    "model_stock": _model_stock,
}
