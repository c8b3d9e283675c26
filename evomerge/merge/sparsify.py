"""Sparsification masks (TIES magnitude, DARE random, DELLA rank, breadcrumbs) and sign consensus.

Semantics follow mergekit 0.1.5 (`mergekit/sparsify.py`, `get_mask`). What makes the search
fast: everything that depends only on the data is computed once per (tensor, model row) and
kept in a `SparsifyCache`:

- magnitude order: the stable ascending order of |delta|, so a density becomes a magnitude
  threshold (`magnitude_cut`: two lookups) instead of a new sort per trial; un-cached (disk)
  merges find the same threshold by selection, without sorting;
- DARE / DELLA draws: uniform numbers keyed by (seed, tensor name, row), so a mask for
  density d is `u < d` (DELLA: `u < p(rank)`) -- common random numbers across trials, and
  the same bytes whatever order tensors are processed in;
- the L1 norm of each task vector (the `rescale` reference).

The un-cached path (disk merges) calls the very same functions, so masks are bit-identical.

Ties in magnitude: ranks come from a *stable* ascending sort of |delta|, so among equal
magnitudes the entry with the lower flat index ranks lower (is dropped first by
magnitude/TIES; DELLA gives it the lower keep probability). mergekit uses an unstable sort,
so it may break exact ties differently; ties among exact zeros (the common case) make no
numerical difference.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_RESCALE_EPS = 1e-7  # mergekit: below this norm a masked tensor is returned unscaled


# ---- data-only statistics (what the cache stores) -------------------------------------------


def magnitude_ranks(delta: torch.Tensor) -> torch.Tensor:
    """Rank of every entry of |delta| in a stable ascending sort (0 = smallest), same shape."""
    import torch

    flat = delta.abs().reshape(-1)
    order = torch.argsort(flat, stable=True)
    dtype = torch.int32 if flat.numel() < 2**31 else torch.int64  # half the memory of int64
    ranks = torch.empty(flat.numel(), dtype=dtype, device=delta.device)
    ranks[order] = torch.arange(flat.numel(), dtype=dtype, device=delta.device)
    return ranks.reshape(delta.shape)


def magnitude_order(delta: torch.Tensor) -> torch.Tensor:
    """Flat indices of |delta| in a stable ascending sort (int32 when they fit), 1-D."""
    import torch

    order = torch.argsort(delta.abs().reshape(-1), stable=True)
    return order.to(torch.int32) if order.numel() < 2**31 else order


def magnitude_cut(delta: torch.Tensor, p: int, order: torch.Tensor | None = None):
    """(thr, first): the entries at sorted positions >= p (stable ascending |delta|, as in
    `magnitude_ranks`) are exactly those with |x| > thr, or |x| == thr at flat index >= first.

    p == n keeps nothing: (inf, n). With the cached `order` this is two lookups; without,
    a selection (kthvalue) and two compares: O(n), no sort, the same (thr, first).
    """
    import torch

    flat = delta.reshape(-1)
    n = flat.numel()
    if p >= n:
        return float("inf"), n
    if order is not None:
        first = int(order[p])
        return float(flat[first].abs()), first
    mag = flat.abs()
    thr = mag.kthvalue(p + 1).values
    below = int(torch.lt(mag, thr).sum())
    ties = torch.eq(mag, thr).nonzero().view(-1)
    return float(thr), int(ties[p - below])


def della_rank_norm(delta: torch.Tensor) -> torch.Tensor:
    """DELLA's normalised rank in [0, 1] of |delta| along dim 1 (1-D tensors as one row).

    mergekit ranks each row (dim=1) and maps ranks 1..n to (r - 1) / (n - 1); a row of one
    element (n = 1) would be 0/0 there, here it is 0.
    """
    import torch

    work = delta.unsqueeze(0) if delta.dim() < 2 else delta
    n = work.shape[1]
    if n <= 1:
        return torch.zeros(delta.shape, dtype=torch.float32, device=delta.device)
    order = torch.argsort(work.abs(), dim=1, stable=True)
    ranks = torch.empty(order.shape, dtype=torch.int32, device=delta.device)
    idx = torch.arange(n, dtype=torch.int32, device=delta.device)
    ranks.scatter_(1, order, idx.view(1, -1, *([1] * (work.dim() - 2))).expand_as(order))
    del order
    # mergekit: ranks r + 1 in 1..n, ((r + 1) - 1) / (n - 1); r + 1 - 1 == r exactly in float32
    rank_norm = ranks.to(torch.float32).div_(n - 1).clamp_(0, 1)
    return rank_norm.reshape(delta.shape)


def uniform_draws(seed: int, tensor_name: str, row: int, like: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) float32 draws keyed by (seed, tensor name, row), shaped like `like`.

    A generator seeded from sha256 of the key makes the draws independent of the order in
    which tensors are processed and of anything drawn before.
    """
    import torch

    key = f"{seed}:{tensor_name}:{row}".encode()
    g_seed = int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & (2**63 - 1)
    gen = torch.Generator(device=like.device)
    gen.manual_seed(g_seed)
    return torch.rand(like.shape, generator=gen, dtype=torch.float32, device=like.device)


def l1_norm(delta: torch.Tensor) -> torch.Tensor:
    """Sum of |delta| as a 0-dim float32 tensor (the `rescale` reference, mergekit's l1)."""
    import torch

    return torch.linalg.vector_norm(delta, ord=1)


class SparsifyCache:
    """Per (tensor name, model row) data-only statistics, computed on first use.

    Valid for one set of task vectors: build a new cache (or `clear()`) when the inputs
    change. Draws are also keyed by seed, so one cache serves several seeds.
    """

    def __init__(self) -> None:
        self._store: dict[tuple, torch.Tensor] = {}
        # (tensor, row, mask kind, density, extra, seed) -> rescale factor (float or None)
        self.factors: dict[tuple, float | None] = {}

    def _get(self, key: tuple, make) -> torch.Tensor:
        value = self._store.get(key)
        if value is None:
            value = make()
            self._store[key] = value
        return value

    def ranks(self, name: str, row: int, delta: torch.Tensor) -> torch.Tensor:
        return self._get(("rank", name, row), lambda: magnitude_ranks(delta))

    def order(self, name: str, row: int, delta: torch.Tensor) -> torch.Tensor:
        return self._get(("order", name, row), lambda: magnitude_order(delta))

    def rank_norm(self, name: str, row: int, delta: torch.Tensor) -> torch.Tensor:
        return self._get(("della", name, row), lambda: della_rank_norm(delta))

    def uniform(self, seed: int, name: str, row: int, delta: torch.Tensor) -> torch.Tensor:
        return self._get(("u", seed, name, row), lambda: uniform_draws(seed, name, row, delta))

    def l1(self, name: str, row: int, delta: torch.Tensor) -> torch.Tensor:
        return self._get(("l1", name, row), lambda: l1_norm(delta))

    def clear(self) -> None:
        self._store.clear()
        self.factors.clear()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._store.values())


# ---- masks: all return a bool mask shaped like delta, or None for "keep everything" --------


def magnitude_mask(ranks: torch.Tensor, density: float) -> torch.Tensor | None:
    """TIES: keep the k = max(1, int(density * n)) largest |delta| (density <= 0: none)."""
    import torch

    n = ranks.numel()
    if density >= 1:
        return None
    if density <= 0 or n == 0:
        return torch.zeros(ranks.shape, dtype=torch.bool, device=ranks.device)
    k = max(1, int(density * n))
    return ranks >= n - k


def breadcrumbs_mask(ranks: torch.Tensor, density: float, gamma: float) -> torch.Tensor | None:
    """Breadcrumbs: drop the int(gamma * n) largest, then the smallest, so int(density * n)
    remain (the outlier cut shrinks when both cannot hold)."""
    n = ranks.numel()
    if density >= 1:
        return None
    target_n = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target_n - n_top)
    return (ranks >= n_bot) & (ranks < n_bot + target_n)


def random_mask(uniform: torch.Tensor, density: float) -> torch.Tensor | None:
    """DARE: keep each entry with probability density (common random numbers: u < d)."""
    if density >= 1:
        return None
    return uniform < density


def della_mask(
    rank_norm: torch.Tensor, uniform: torch.Tensor, density: float, epsilon: float
) -> torch.Tensor | None:
    """DELLA (magprune): keep probability grows linearly with the rank of |delta| in its row,
    from density - epsilon (smallest) to density + epsilon (largest)."""
    import torch

    if density >= 1:
        return None
    if density <= 0:
        return torch.zeros(rank_norm.shape, dtype=torch.bool, device=rank_norm.device)
    probs = (density - epsilon) + rank_norm * (2 * epsilon)
    return uniform < probs


def apply_mask(
    delta: torch.Tensor,
    mask: torch.Tensor | None,
    rescale: bool,
    l1_before: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """delta * mask, rescaled (rescale=True) so its L1 norm matches delta's (mergekit's l1).

    mask None keeps everything and skips the rescale, as mergekit does for density >= 1.
    l1_before may come from the cache (same function, same value).
    """
    import torch

    if mask is None:
        return delta.clone() if out is None else out.copy_(delta)
    masked = torch.mul(delta, mask, out=out) if out is not None else delta * mask
    if not rescale:
        return masked
    before = l1_norm(delta) if l1_before is None else l1_before
    after = l1_norm(masked)
    if before < _RESCALE_EPS or after < _RESCALE_EPS:
        return masked
    return masked.mul_(before / after)


def sign_consensus(deltas: torch.Tensor, method: str = "sum") -> torch.Tensor:
    """TIES sign election over the stacked (weighted) deltas  # (n, *shape) -> bool (n, *shape)

    "sum": the elected sign is that of the summed deltas (mass); "count": of the summed
    signs. Zero sums elect +. An entry survives if its sign equals the elected one, so
    exact zeros never count (they also drop out of the normalising divisor).
    """
    sign = deltas.sign()
    if method == "sum":
        elected = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    elif method == "count":
        elected = (sign.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    else:
        raise ValueError(f"consensus method must be 'sum' or 'count', but got {method!r}")
    return sign == elected
