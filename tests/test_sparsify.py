"""Sparsification masks: hand-computed cases, cached == un-cached bit for bit, DARE/DELLA rates."""

from __future__ import annotations

import pytest
import torch

from evomerge.merge import sparsify as sp


def _delta(shape=(64, 48), seed=0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_ranks_are_stable_ascending_with_ties_by_index():
    ranks = sp.magnitude_ranks(torch.tensor([0.5, -0.5, 1.0, 0.0, -2.0]))
    # |x| = .5 .5 1 0 2 -> order 3, 0, 1, 2, 4; the tie 0.5/-0.5 goes to the lower index first
    assert ranks.tolist() == [1, 2, 3, 0, 4]


def test_magnitude_mask_keeps_top_k_and_at_least_one():
    x = torch.tensor([[3.0, -1.0, 0.5], [2.0, -4.0, 1.5]])
    ranks = sp.magnitude_ranks(x)
    assert sp.magnitude_mask(ranks, 0.5).tolist() == [[True, False, False], [True, True, False]]
    assert sp.magnitude_mask(ranks, 0.01).sum() == 1  # int(0.06) = 0 -> at least one
    assert sp.magnitude_mask(ranks, 1.0) is None
    assert not sp.magnitude_mask(ranks, 0.0).any()


def test_breadcrumbs_drops_outliers_then_smallest():
    x = torch.arange(1.0, 11.0)[torch.randperm(10, generator=torch.Generator().manual_seed(1))]
    mask = sp.breadcrumbs_mask(sp.magnitude_ranks(x), density=0.5, gamma=0.1)
    # n=10: keep 5, drop the 1 largest (10) and the 4 smallest (1..4) -> 5..9
    assert sorted(x[mask].tolist()) == [5.0, 6.0, 7.0, 8.0, 9.0]


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


def test_rescale_matches_l1_norm():
    x = torch.tensor([1.0, -2.0, 3.0, -4.0])
    mask = torch.tensor([False, True, False, True])
    out = sp.apply_mask(x, mask, rescale=True)
    assert torch.allclose(out, torch.tensor([0.0, -2.0, 0.0, -4.0]) * (10 / 6))
    assert torch.equal(sp.apply_mask(x, mask, rescale=False), x * mask)
    assert torch.equal(sp.apply_mask(x, None, rescale=True), x)  # density >= 1: untouched


def test_uniform_draws_keyed_by_seed_name_row_not_order():
    like = torch.empty(50)
    a1, b1 = sp.uniform_draws(3, "a", 0, like), sp.uniform_draws(3, "b", 0, like)
    b2, a2 = sp.uniform_draws(3, "b", 0, like), sp.uniform_draws(3, "a", 0, like)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert not torch.equal(a1, b1)
    assert not torch.equal(a1, sp.uniform_draws(4, "a", 0, like))
    assert not torch.equal(a1, sp.uniform_draws(3, "a", 1, like))


@pytest.mark.parametrize("density", [0.1, 0.3, 0.7])
def test_random_mask_keeps_density_within_noise(density):
    u = sp.uniform_draws(0, "w", 0, torch.empty(200_000))
    frac = sp.random_mask(u, density).float().mean().item()
    assert abs(frac - density) < 0.005  # binomial sd ~ 0.001


def test_della_keep_rate_and_rank_dependence():
    delta = _delta((200, 500))
    u = sp.uniform_draws(0, "w", 0, delta)
    rn = sp.della_rank_norm(delta)
    assert rn.min() == 0 and rn.max() == 1
    mask = sp.della_mask(rn, u, density=0.4, epsilon=0.2)
    assert abs(mask.float().mean().item() - 0.4) < 0.005
    small = mask[rn < 0.1].float().mean().item()  # keep prob ~ 0.2..0.24
    large = mask[rn > 0.9].float().mean().item()  # keep prob ~ 0.56..0.6
    assert small < 0.26 and large > 0.54


def test_cache_gives_bit_identical_masks():
    cache = sp.SparsifyCache()
    for row, seed in [(0, 1), (1, 1), (0, 2)]:
        delta = _delta(seed=row + 10)
        for d in (0.05, 0.3, 0.9):
            r_c, r_u = cache.ranks("w", row, delta), sp.magnitude_ranks(delta)
            assert torch.equal(sp.magnitude_mask(r_c, d), sp.magnitude_mask(r_u, d))
            assert torch.equal(sp.breadcrumbs_mask(r_c, d, 0.02), sp.breadcrumbs_mask(r_u, d, 0.02))
            u_c, u_u = cache.uniform(seed, "w", row, delta), sp.uniform_draws(seed, "w", row, delta)
            assert torch.equal(sp.random_mask(u_c, d), sp.random_mask(u_u, d))
            n_c, n_u = cache.rank_norm("w", row, delta), sp.della_rank_norm(delta)
            e = min(d, 1 - d) / 2
            assert torch.equal(sp.della_mask(n_c, u_c, d, e), sp.della_mask(n_u, u_u, d, e))
            assert torch.equal(cache.l1("w", row, delta), sp.l1_norm(delta))
    assert cache.nbytes() > 0


def test_magnitude_cut_matches_ranks_with_ties_cached_or_not():
    # many exact ties (as in task vectors of bf16 models), both signs and zeros
    x = torch.randint(-4, 5, (40, 30), generator=torch.Generator().manual_seed(3)).float()
    ranks, order = sp.magnitude_ranks(x).reshape(-1), sp.magnitude_order(x)
    idx = torch.arange(x.numel())
    for p in (0, 1, 150, 600, 1199, 1200):
        cut = sp.magnitude_cut(x, p)
        assert cut == sp.magnitude_cut(x, p, order)
        thr, first = cut
        mag = x.abs().reshape(-1)
        kept = (mag > thr) | ((mag == thr) & (idx >= first))
        assert torch.equal(kept, ranks >= p), p
