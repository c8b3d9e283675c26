"""Mask statistics: hand-computed cases, radix selection == sorted order, draws and ranks."""

from __future__ import annotations

import math

import pytest
import torch

from evomerge.merge import radix
from evomerge.merge import sparsify as sp


def _delta(shape=(64, 48), seed=0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _stable_ranks(x: torch.Tensor) -> torch.Tensor:
    """Reference: rank of every |x| in a stable ascending sort of the flat tensor."""
    order = torch.argsort(x.abs().reshape(-1), stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel())
    return ranks


def _planes_value(planes: torch.Tensor) -> torch.Tensor:
    if planes.dtype == torch.uint8:
        return planes[0].long() * 256 + planes[1].long()
    return planes[0].long()


def test_magnitude_order_is_stable_ascending_with_ties_by_index():
    order = sp.magnitude_order(torch.tensor([0.5, -0.5, 1.0, 0.0, -2.0]).abs())
    # |x| = .5 .5 1 0 2 -> 3, 0, 1, 2, 4: the tie 0.5/-0.5 keeps index order
    assert order.tolist() == [3, 0, 1, 2, 4] and order.dtype == torch.int32


def test_magnitude_cut_by_hand():
    x = torch.tensor([0.5, -0.5, 1.0, 0.0, -2.0, 0.5]).abs()
    # stable order of |x|: 3 (0), 0 (.5), 1 (.5), 5 (.5), 2 (1), 4 (2)
    assert radix.magnitude_cut(x, 0) == (0.0, 3)
    assert radix.magnitude_cut(x, 2) == (0.5, 1)  # keep index >= 1 among the 0.5s, and above
    assert radix.magnitude_cut(x, 5) == (2.0, 4)
    assert radix.magnitude_cut(x, 6) == (math.inf, 6)  # keep nothing


@pytest.mark.parametrize("seed", [0, 3])
def test_radix_cut_matches_the_sorted_order_with_many_ties(seed):
    # many exact ties (as in task vectors of bf16 models), both signs, zeros and subnormals
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-4, 5, (40, 30), generator=g).float() * 0.125
    x[0, :5] = torch.tensor([1e-40, -1e-40, 3e38, 0.0, -0.0])
    ranks, order = _stable_ranks(x), sp.magnitude_order(x.abs())
    idx = torch.arange(x.numel())
    mag = x.abs().reshape(-1)
    for p in (0, 1, 150, 600, 1199, 1200):
        thr, first = radix.magnitude_cut(x.abs(), p)
        if p < x.numel():
            assert first == int(order[p]) and thr == float(mag[first])
        kept = (mag > thr) | ((mag == thr) & (idx >= first))
        assert torch.equal(kept, ranks >= p), p


def test_draws_keyed_by_seed_name_row_not_order():
    a1, b1 = sp.draws(3, "a", 0, 50, "cpu"), sp.draws(3, "b", 0, 50, "cpu")
    b2, a2 = sp.draws(3, "b", 0, 50, "cpu"), sp.draws(3, "a", 0, 50, "cpu")
    assert a1.shape == (2, 50) and a1.dtype == torch.uint8
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert not torch.equal(a1, b1)
    assert not torch.equal(a1, sp.draws(4, "a", 0, 50, "cpu"))
    assert not torch.equal(a1, sp.draws(3, "a", 1, 50, "cpu"))


def test_draws_are_uniform_16_bit():
    v = _planes_value(sp.draws(0, "w", 0, 400_000, "cpu"))
    assert int(v.min()) == 0 and int(v.max()) == 65535
    for d in (0.1, 0.3, 0.7):  # DARE keeps draw < ceil(d * 65536)
        frac = (v < math.ceil(d * 65536)).float().mean().item()
        assert abs(frac - d) < 0.004  # binomial sd < 0.001


def test_to_planes_round_trip():
    v = torch.tensor([0, 1, 255, 256, 32767, 32768, 65535], dtype=torch.int32)
    planes = sp.to_planes(v.clone())  # overwrites its argument
    assert planes[0].tolist() == [0, 0, 0, 1, 127, 128, 255]
    assert torch.equal(_planes_value(planes), v.long())


SHAPES = [(37, 53), (300,), (4, 6, 5), (2000, 600)]  # last: several sort blocks, a ragged one


def _want_ranks(x: torch.Tensor) -> torch.Tensor:
    work = x.reshape(1, -1) if x.dim() < 2 else x.movedim(1, -1)
    rows = work.reshape(-1, work.shape[-1])
    want = torch.stack([_stable_ranks(r) for r in rows]).view(work.shape)
    return (want.movedim(-1, 1) if x.dim() > 2 else want).reshape(-1)


@pytest.mark.parametrize("shape", SHAPES)
def test_della_ranks_are_stable_ranks_along_dim_1(shape):
    x = torch.randint(-3, 4, shape, generator=torch.Generator().manual_seed(1)).float()
    assert torch.equal(_planes_value(sp.della_ranks(x.abs())), _want_ranks(x))


@pytest.mark.parametrize("shape", SHAPES)
def test_della_ranks_of_model_and_base_make_delta_per_block(shape):
    """The disk path passes the model's and the base's bf16 rows: |delta| is taken in float32
    a block at a time, ranks come back int32 -- the ranks of the whole float32 |delta|."""
    g = torch.Generator().manual_seed(2)
    base = (torch.randn(shape, generator=g) * 0.02).bfloat16()
    model = (base.float() + torch.randn(shape, generator=g) * 0.002).bfloat16()
    got = sp.della_ranks(model, base=base, packed=False)
    assert got.dtype == torch.int32 and got.shape == (1, base.numel())
    assert torch.equal(got[0].long(), _want_ranks(model.float() - base.float()))


def test_della_ranks_of_long_rows_are_int32():
    x = _delta((1, 70_000))
    ranks = sp.della_ranks(x.abs())
    assert ranks.shape == (1, 70_000) and ranks.dtype == torch.int32
    assert torch.equal(ranks[0].long(), _stable_ranks(x))


def test_l1_unit_and_rescale_factor():
    x = torch.tensor([0.75, -3.0, 0.0])  # max 3 < 2^2: unit 2^22
    unit = sp.l1_unit(sp.abs_bound(x))
    assert sp.abs_bound(x) == 3.0 and unit == 2.0**22 and sp.l1_unit(0.0) == 0.0
    assert sp.rescale_factor(3.75 * unit, 0.75 * unit, unit) == 5.0
    assert sp.rescale_factor(3.75 * unit, 0.0, unit) is None  # nothing kept: unscaled
    assert sp.rescale_factor(0.0, 0.0, 0.0) is None


def test_sign_consensus_sum_and_count():
    d = torch.tensor([[3.0, -1.0, 0.0], [-1.0, -1.0, 2.0], [-1.0, 5.0, -1.0]])
    # column sums 1, 3, 1 -> elected + + +; sign counts -1, -1(+1-2=-1), 0 -> - - +
    assert sp.sign_consensus(d, "sum").tolist() == [
        [True, False, False],
        [False, False, True],
        [False, True, False],
    ]
    assert sp.sign_consensus(d, "count").tolist() == [
        [False, True, False],
        [True, True, True],
        [True, False, False],
    ]


def test_cache_makes_each_statistic_once():
    cache, calls = sp.SparsifyCache(), []

    def make():
        calls.append(1)
        return torch.ones(4)

    assert torch.equal(cache.get(("k", 1), make), cache.get(("k", 1), make))
    assert len(calls) == 1 and cache.nbytes() == 16
    cache.clear()
    assert cache.nbytes() == 0
