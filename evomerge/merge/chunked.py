"""Disk merges of one tensor in row chunks of bounded size (memory: a few chunks).

Elementwise methods (linear, nearswap, passthrough) merge each chunk on its own. The
generalized task arithmetic family needs whole-tensor numbers first -- magnitude thresholds
(TIES, breadcrumbs), |x| bounds and L1 norms (rescale of DARE / DELLA) -- so it streams
over the chunks in earlier passes to get them, then applies the kernel chunk by chunk with
each chunk's flat offset. slerp, nuslerp, multislerp, karcher, model_stock and sce take
their dot products (and sce its variance cut) in a first streaming pass the same way
(twopass.py, sce.py). Every number is an integer count, an exact maximum, an exact
integer-unit sum or an order-free float64 dot product (gram.py), and the kernel is entry by
entry, so the result is bit-identical to the whole-tensor merge (tests/test_chunked.py
compares bytes for every streamed method).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from evomerge.common.device import torch_threads
from evomerge.merge import radix
from evomerge.merge import sparsify as sp
from evomerge.merge.buffers import Arena
from evomerge.merge.gta import EAGER, Setup, below, keep_numbers, setup
from evomerge.merge.memory import TWO_PASS

if TYPE_CHECKING:
    from evomerge.merge.contract import MergeInputs
    from evomerge.merge.kernel import Kernels

Read = Callable[[int, int], "tuple[torch.Tensor, torch.Tensor | None]"]  # rows -> models, base
Chunks = Callable[[], Iterator[tuple[int, "MergeInputs"]]]  # (first row, inputs of the chunk)
Write = Callable[[int, torch.Tensor], None]  # (first row, merged rows)


# Entries of a disk merge's task-arithmetic tensors from which its per-entry passes run
# compiled: inductor's fused loop takes ~1.6 ns per entry where eager chunks take ~10, but
# each kernel costs ~12 s to compile cold (~5 s from inductor's cache), and TIES needs one, sce and
# DARE / DELLA three (measured on 2 cores: results/bench/merge_memory_7b_compiled.md).
DISK_COMPILE_MIN_ENTRIES = 1 << 32  # ~4B parameters


def disk_kernels(method_name: str, entries: int) -> Kernels:
    """The kernels a disk merge of `entries` streamed entries runs: compiled for a large
    merge of the task-arithmetic family or sce where a C++ compiler is at hand, else eager."""
    from evomerge.merge.kernel import Kernels, compile_available
    from evomerge.merge.table import get_method

    m = get_method(method_name)
    kernel_run = m.name == "sce" or (not m.elementwise and m.function.endswith(":gta_method"))
    big = entries >= DISK_COMPILE_MIN_ENTRIES
    return Kernels(compiled=True) if kernel_run and big and compile_available("cpu") else EAGER


def chunkable(method_name: str, shape: tuple[int, ...]) -> bool:
    """Whether a tensor of this shape is merged in row chunks by this method."""
    from evomerge.merge.memory import STREAMED

    return method_name in STREAMED and len(shape) >= 2 and shape[0] > 1


def merge_chunked(
    stage, name: str, shape: tuple[int, ...], t: float, read: Read, write: Write, arena: Arena,
    step: int, kernels: Kernels = EAGER,
) -> None:  # fmt: skip
    """Merge tensor `name` in chunks of `step` rows: read(r0, r1) gives the listed models'
    rows (n, r1 - r0, ...) and the unlisted base's (or None); write(r0, merged) stores them.
    kernels: how the task-arithmetic family's per-entry passes run (eager or compiled)."""
    from evomerge.merge.resolve import build_inputs, merge_tensor
    from evomerge.merge.table import get_method

    def chunks() -> Iterator[tuple[int, MergeInputs]]:
        for r0 in range(0, shape[0], step):
            models, base = read(r0, min(r0 + step, shape[0]))
            yield r0, build_inputs(stage, name, models, base, t)

    method = get_method(stage.merge_method)
    if method.name in TWO_PASS:
        _two_pass(method.name, chunks, write, kernels)
        return
    if not method.elementwise and method.function.endswith(":gta_method"):
        opts = dict(method.options)

        def head() -> MergeInputs:  # the parameters need one row, not a chunk's read
            return build_inputs(stage, name, *read(0, 1), t)

        gta_chunked(opts["kind"], opts["consensus"], shape, chunks, write, arena, head, kernels)
        return
    for r0 in range(0, shape[0], step):
        models, base = read(r0, min(r0 + step, shape[0]))
        out = arena.get("out", tuple(models.shape[1:]), torch.float32)
        write(r0, merge_tensor(stage, name, models, base, t, out=out))


def _two_pass(method: str, chunks: Chunks, write: Write, kernels: Kernels) -> None:
    """Methods with whole-tensor dot products (twopass.py) and sce (sce.py)."""
    if method == "sce":
        from evomerge.merge.sce import sce_run

        sce_run(chunks, write, kernels)
        return
    from evomerge.merge.twopass import run

    run(method, chunks, write)


def gta_chunked(
    kind: str | None, consensus: str | None, shape: tuple[int, ...], chunks: Chunks,
    write: Write, arena: Arena, head: Callable[[], MergeInputs] | None = None,
    kernels: Kernels = EAGER,
) -> None:  # fmt: skip
    """gta() of methods.py over row chunks: the same bits, a few chunks of memory.
    head(): inputs of a few rows, for the parameters (default: the first chunk's)."""
    first = head() if head is not None else next(chunks())[1]
    su = setup(first, kind, consensus)
    idx, bi, prm, m = first.non_base_rows(), first.base_index, first.params, len(su.dens)
    if not idx:
        for r0, inp in chunks():
            write(r0, inp.base.to(torch.float32))
        return
    n, cols = math.prod(shape), shape[1]
    keep, firsts = _keep_all_rows(kind, su, idx, bi, n, cols, chunks, first.tensor_name, arena)
    p = torch.tensor(su.head + keep, dtype=torch.float32)
    masked = [kind is not None and d < 1 for d in su.dens]
    spec, given = su.spec, None
    if prm.get("rescale") and any(masked):
        # random masks (DARE, DELLA) are made in the rescale pass and kept as bits for the
        # last pass: draws and DELLA's per-row sorts once, not twice (1 bit per entry a row)
        given = [] if kind in ("random", "della") and first.models.is_cpu else None
        factors = _factors(su, idx, bi, masked, p, firsts, chunks, n, arena, kernels, given)
        p[m : 2 * m] = torch.tensor(factors)
        spec = su.spec if given is None else replace(su.spec, kind="given")
    for c, (r0, inp) in enumerate(chunks()):
        x = inp.models.reshape(inp.models.shape[0], -1)
        a = _offset(r0, inp)
        out = arena.get("out", tuple(inp.base.shape), torch.float32)
        if given is None:
            stats = _stats(kind, inp, idx, bi, x, a, n, arena)
        else:
            stats = [[_unpack(bits, x.shape[1])] for bits in given[c]]
        kernels.gta(spec, out.view(-1), x, stats, p, firsts, offset=a)
        write(r0, out)


def _unpack(bits, length: int) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.unpackbits(bits, count=length))


MAG_BLOCK = radix.BLOCK  # entries of |delta| made at a time: the selection's block


def _mags(inp: MergeInputs, idx: list[int], bi: int, arena: Arena) -> Iterator[tuple]:
    """|models[row] - base| of each merged row, flat float32 (as gta's _Row.mag), in
    consecutive blocks of MAG_BLOCK entries written into reused buffers: a block's
    arithmetic stays in cache and allocates nothing (each block is used up before the
    next is made)."""
    x = inp.models.reshape(inp.models.shape[0], -1)
    for a in range(0, x.shape[1], MAG_BLOCK):
        b = min(a + MAG_BLOCK, x.shape[1])
        base = arena.get("mag_base", (b - a,), torch.float32).copy_(x[bi, a:b])
        yield tuple(
            arena.get(f"mag{j}", (b - a,), torch.float32).copy_(x[i, a:b]).sub_(base).abs_()
            for j, i in enumerate(idx)
        )


def _keep_all_rows(
    kind, su: Setup, idx, bi: int, n, cols, chunks: Chunks, name, arena: Arena
) -> tuple[list, list]:
    """Keep arguments of every row: the positions keep_numbers asks for are collected first
    (they do not depend on the data), then every cut comes from one streaming selection."""
    if kind is None:
        return [], []
    asked: list[tuple[int, int]] = []

    def record(j: int):
        def cut(pos: int):
            asked.append((j, pos))
            return [0.0, 0.0], 0

        return cut

    for j in range(len(idx)):
        keep_numbers(kind, su.dens[j], su.extras[j], n, cols, record(j), (name, idx[j]))
    found = {}
    if asked:
        streams = lambda: (m for _, inp in chunks() for m in _mags(inp, idx, bi, arena))  # noqa: E731
        with torch_threads(1):  # ops on blocks: a parallel region each costs what it saves
            found = dict(zip(asked, radix.magnitude_cuts(streams, asked), strict=True))

    def lookup(j: int):
        def cut(pos: int):
            if pos >= n:
                return [math.inf, math.inf], n
            thr, first = found[j, pos]
            return [thr, below(thr)], first

        return cut

    keep, firsts = [], []
    for j in range(len(idx)):
        k, f = keep_numbers(kind, su.dens[j], su.extras[j], n, cols, lookup(j), (name, idx[j]))
        keep += k
        firsts += f
    return keep, firsts


def _stats(kind, inp: MergeInputs, idx, bi, x, a: int, n: int, arena: Arena) -> list:
    """The chunk's slice of each row's draws (and DELLA ranks, which are per row), made in
    reused buffers (valid until the next chunk's)."""
    if kind not in ("random", "della"):
        return [[] for _ in idx] if kind is not None else []
    out = []
    length = x.shape[1]
    shape = inp.models.shape[1:]
    for j, i in enumerate(idx):
        buf = arena.get(f"draws{j}", (2, length), torch.uint8) if x.is_cpu else None
        draws = sp.draws(inp.seed, inp.tensor_name, i, n, x.device, a, a + length, out=buf)
        if kind == "della":  # int32 ranks: the kernel reads them as they are
            ranks = sp.della_ranks(x[i].view(shape), base=x[bi].view(shape), packed=False)
            out.append([draws, ranks])
        else:
            out.append([draws])
    return out


def _factors(
    su: Setup, idx, bi, masked, p, firsts, chunks: Chunks, n: int, arena: Arena, kernels: Kernels,
    given: list | None = None,
) -> list[float]:  # fmt: skip
    """Rescale factors (1.0: none) from two streaming passes: the |x| bounds that fix each
    row's integer unit, then the exact integer-unit L1 norms before and after the mask.
    given: a list to append each chunk's keep-masks to, packed as bits (random kinds)."""
    import numpy as np

    bound = [0.0] * (len(idx) + 1)
    for _, inp in chunks():
        for j, i in enumerate([*idx, bi]):
            bound[j] = max(bound[j], sp.abs_bound(inp.models[i]))
    units = [sp.l1_unit(bound[j] + bound[-1]) for j in range(len(idx))]
    u = torch.tensor(units, dtype=torch.float32)
    before, after = [0.0] * len(idx), [0.0] * len(idx)
    kind = su.spec.kind
    spec = su.spec if given is None else replace(su.spec, kind="given")
    for r0, inp in chunks():
        x = inp.models.reshape(inp.models.shape[0], -1)
        a = _offset(r0, inp)
        stats = _stats(kind, inp, idx, bi, x, a, n, arena)
        if given is not None:
            masks = [arena.get(f"keep{j}", (x.shape[1],), torch.uint8) for j in range(len(idx))]
            kernels.keep_masks(su.spec, masks, stats, p)
            given.append([np.packbits(mask.numpy()) for mask in masks])
            stats = [[mask] for mask in masks]
        b, f = kernels.l1_before_after(spec, x, stats, p, firsts, u, offset=a)
        before = [s + v for s, v in zip(before, b, strict=True)]
        after = [s + v for s, v in zip(after, f, strict=True)]
    out = []
    for j in range(len(idx)):
        factor = sp.rescale_factor(before[j], after[j], units[j]) if masked[j] else None
        out.append(1.0 if factor is None else factor)
    return out


def _offset(r0: int, inp: MergeInputs) -> int:
    """Flat index of row r0 (rows of the whole tensor have the chunk's row size)."""
    return r0 * math.prod(inp.base.shape[1:])
