"""Fused kernels: compiled == eager bit for bit (the in-place == disk guarantee rests on it).

Compiling costs seconds per kernel, so the default suite compiles the kernels the search
uses most (ties on bfloat16 and float32 rows, della with its rescale norms, linear); the
full matrix of mask kinds is marked slow.
"""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import needs_compiler

from evomerge.merge import radix
from evomerge.merge import sparsify as sp
from evomerge.merge.kernel import Kernels, Spec

needs_compile = needs_compiler()  # skipped without a compiler, failed under CI
N = 100_003  # not a multiple of any vector width or chunk


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(N, generator=g)
    x = torch.stack([base, base + 0.01 * torch.randn(N, generator=g), base.clone()])
    x[2] += torch.randint(-3, 4, (N,), generator=g) * 2.0**-9  # many exact ties
    x[1, :500] = base[:500]  # exact zeros in a task vector
    return x.to(dtype)


def _args(kind: str | None, x: torch.Tensor):
    """(stats, keep floats, firsts) for rows 1, 2 as gta.py would build them."""
    if kind is None:
        return [[], []], [], []
    d = [(x[r].float() - x[0].float()).abs() for r in (1, 2)]
    if kind in ("magnitude", "breadcrumbs"):
        floats, firsts = [], []
        for j, pos in enumerate((N // 2, N // 3)):
            cuts = [pos, N - 100] if kind == "breadcrumbs" else [pos]
            for c in cuts:
                thr, first = radix.magnitude_cut(d[j], c)
                below = float(torch.nextafter(torch.tensor(thr), torch.tensor(-1.0)))
                floats += [thr, below]
                firsts.append(first)
        return [[], []], floats, firsts
    draws = [sp.draws(5, "t", r, N, "cpu") for r in (1, 2)]
    if kind == "random":
        return [[draws[0]], [draws[1]]], [20000.0, 45000.0], []
    ranks = [sp.della_ranks(dj.view(1, -1)) for dj in d]
    floats = [0.2 / (N - 1), 0.3, 0.1 / (N - 1), 0.55]
    return [[draws[0], ranks[0]], [draws[1], ranks[1]]], floats, []


def _check(spec: Spec, dtype=torch.float32, l1: bool = False) -> None:
    x = _inputs(dtype)
    stats, floats, firsts = _args(spec.kind, x)
    head = [0.6, 0.9, 1.25, 0.75, 1.1, 1.5]  # weights, rescales, lambda, summed weights
    p = torch.tensor(head + floats, dtype=torch.float32)
    eager, compiled = Kernels(compiled=False), Kernels(compiled=True)
    out_e, out_c = torch.empty(N), torch.full((N,), float("nan"))
    eager.gta(spec, out_e, x, stats, p, firsts)
    compiled.gta(spec, out_c, x, stats, p, firsts)
    assert torch.equal(out_e.view(torch.int32), out_c.view(torch.int32)), spec  # same bytes
    if l1:
        units = torch.tensor([2.0**30, 2.0**31])
        sums = eager.masked_l1(spec, x, stats, p, firsts, units)
        assert sums == compiled.masked_l1(spec, x, stats, p, firsts, units)
        assert all(s == int(s) and s > 0 for s in sums)


@needs_compile
def test_compiled_ties_equals_eager_on_float32_and_bfloat16_rows():
    for dtype in (torch.float32, torch.bfloat16):
        _check(Spec("magnitude", True, True, (1, 2), 0), dtype)


@needs_compile
def test_compiled_della_and_its_norms_equal_eager():
    _check(Spec("della", True, True, (1, 2), 0), l1=True)


@needs_compile
def test_compiled_linear_equals_eager():
    x = _inputs(torch.bfloat16)
    p = torch.tensor([0.3, 0.5, 0.25, 1.05])
    for normalize in (True, False):
        spec = Spec(None, False, normalize, (0, 1, 2))
        out_e, out_c = torch.empty(N), torch.empty(N)
        Kernels(compiled=False).linear(spec, out_e, x, p)
        Kernels(compiled=True).linear(spec, out_c, x, p)
        assert torch.equal(out_e.view(torch.int32), out_c.view(torch.int32))


@needs_compile
@pytest.mark.slow
@pytest.mark.parametrize("kind", [None, "magnitude", "breadcrumbs", "random", "della"])
@pytest.mark.parametrize(("consensus", "normalize"), [(False, False), (False, True), (True, False)])
def test_compiled_equals_eager_every_kind(kind, consensus, normalize):
    _check(Spec(kind, consensus, normalize, (1, 2), 0), l1=kind is not None)


def test_eager_chunks_equal_one_whole_pass(monkeypatch):
    """Chunk boundaries (and cut indices inside a chunk) change nothing."""
    import evomerge.merge.kernel as kernel

    x = _inputs()
    stats, floats, firsts = _args("breadcrumbs", x)
    p = torch.tensor([0.6, 0.9, 1.0, 1.0, 1.0, 1.5, *floats])
    spec = Spec("breadcrumbs", True, True, (1, 2), 0)
    outs = []
    for chunk in (1 << 12, 1 << 20):
        monkeypatch.setattr(kernel, "CHUNK", chunk)
        out = torch.empty(N)
        Kernels().gta(spec, out, x, stats, p, firsts)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])


@needs_compile
def test_della_masks_made_once_give_the_same_bits_and_norms():
    """The disk path makes DARE / DELLA keep-masks once (keep_masks) and applies them as a
    "given" mask in the norm pass and the last pass: the same bits as the draws and ranks,
    compiled or eager, and one fused norm pass gives masked_l1's unmasked and masked sums."""
    from dataclasses import replace

    spec = Spec("della", True, True, (1, 2), 0)
    x = _inputs()
    stats, floats, firsts = _args("della", x)
    p = torch.tensor([0.6, 0.9, 1.25, 0.75, 1.1, 1.5, *floats], dtype=torch.float32)
    eager, compiled = Kernels(compiled=False), Kernels(compiled=True)
    masks = {k: [torch.empty(N, dtype=torch.uint8) for _ in range(2)] for k in ("e", "c")}
    eager.keep_masks(spec, masks["e"], stats, p)
    compiled.keep_masks(spec, masks["c"], stats, p)
    assert all(torch.equal(a, b) for a, b in zip(masks["e"], masks["c"], strict=True))
    assert 0.2 < float(masks["e"][0].float().mean()) < 0.5  # density 0.3 +- eps: a real mask
    given, kept = replace(spec, kind="given"), [[m] for m in masks["e"]]
    units = torch.tensor([2.0**30, 2.0**31])
    norms = eager.l1_before_after(spec, x, stats, p, firsts, units)
    assert eager.l1_before_after(given, x, kept, p, firsts, units) == norms
    assert compiled.l1_before_after(given, x, kept, p, firsts, units) == norms
    unmasked = eager.masked_l1(replace(spec, kind=None), x, stats, p, firsts, units)
    assert norms == (unmasked, eager.masked_l1(spec, x, stats, p, firsts, units))
    out_e, out_c = torch.empty(N), torch.full((N,), float("nan"))
    eager.gta(spec, out_e, x, stats, p, firsts)
    compiled.gta(given, out_c, x, kept, p, firsts)
    assert torch.equal(out_e.view(torch.int32), out_c.view(torch.int32))


def test_a_compile_under_way_in_another_thread_runs_eagerly_meanwhile():
    """A disk merge's second worker does not wait ~10 s for the first one's compile: it
    runs that call eagerly (same bits) and compiles nothing itself."""
    import evomerge.merge.kernel as kernel

    x = _inputs(torch.bfloat16)
    p = torch.tensor([0.3, 0.5, 0.25, 1.05])
    spec = Spec(None, False, True, (2, 0, 1), None)  # a kernel no other test compiled
    out_e, out_c = torch.empty(N), torch.full((N,), float("nan"))
    Kernels(compiled=False).linear(spec, out_e, x, p)
    worker = threading.Thread(target=Kernels(compiled=True).linear, args=(spec, out_c, x, p))
    with kernel._FIRST_CALL:  # another thread is compiling
        worker.start()
        worker.join(timeout=120)
        assert not worker.is_alive()  # it did not wait for the lock
    assert torch.equal(out_e.view(torch.int32), out_c.view(torch.int32))
    assert not [k for k in kernel._WARM if k[1] == spec]
