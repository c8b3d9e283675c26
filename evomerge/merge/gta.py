"""Generalized task arithmetic (task_arithmetic, ties, dare_*, breadcrumbs*, della*), chunked.

mergekit materializes every intermediate at full size (masks, weighted deltas, signs,
elected sign, agreement, products): a dozen passes over (n, *shape) memory, most of them
allocating. Here the flat tensor is walked in chunks of CHUNK entries; every intermediate
lives in a small reused buffer that stays in cache, so main memory sees little more than
one read of the task vectors, their mask statistics and the base, and one write of the
output. The numbers follow mergekit's formulas (max difference ~1 ulp, see
scripts/compare_mergekit.py); the disk path and the in-place candidate path both run
this function, so they agree bit for bit.

Per chunk, with wd = weighted masked task vectors  # (m, L):
  s = sum_j wd_j; e = copysign(1, s) (the elected sign: mergekit's `sum >= 0` gives +, and
  s = -0 only happens when every wd_j is zero, where no row agrees either way);
  q_j = max(wd_j * e, 0) = |wd_j| where row j agrees with the elected sign, else 0, so the
  disjoint sum is e * sum_j q_j exactly (negation commutes with rounding) and the
  normalising divisor is sum_j w_j [q_j > 0].
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from evomerge.errors import ConfigError
from evomerge.merge import sparsify as sp

if TYPE_CHECKING:
    from evomerge.merge.registry import MergeInputs

CHUNK = 1 << 18  # entries per chunk: big enough that per-op overhead is small, in L3


def _f32(x: float) -> float:
    """x rounded to float32 (the value a float32 weight tensor would hold)."""
    return float(torch.tensor(x, dtype=torch.float32))


def _below(thr: float) -> float:
    """The largest float32 below thr: |x| > _below(thr) <=> |x| >= thr for float32 x."""
    t = torch.tensor(thr, dtype=torch.float32)
    return float(torch.nextafter(t, torch.tensor(-float("inf"))))


class _Cut:
    """Keep the entries at sorted positions >= p of |tv| (see sparsify.magnitude_cut)."""

    def __init__(self, tv: torch.Tensor, p: int, order: torch.Tensor | None):
        self.thr, self.first = sp.magnitude_cut(tv, p, order)
        self.ge = _below(self.thr)

    def shrink(self, x: torch.Tensor, a: int, out: torch.Tensor) -> torch.Tensor:
        """out = x (entries a.. of the flat tensor) with the cut-off entries set to 0."""
        k = min(max(self.first - a, 0), x.numel())  # entries before `first`: strict compare
        if k:
            torch.ops.aten.hardshrink.out(x[:k], self.thr, out=out[:k])
        if k < x.numel():
            torch.ops.aten.hardshrink.out(x[k:], self.ge, out=out[k:])
        return out


class _RowMask:
    """Drop mask of one task vector, applied chunk by chunk from cached statistics."""

    def __init__(self, inputs: MergeInputs, kind: str | None, row: int, tv, d: float, extra):
        self.kind, self.d, self.extra, self.stats = kind, d, extra, ()
        if kind is None or d >= 1:
            self.kind = None  # keep everything (mergekit: no mask and no rescale)
            return
        cache, name, seed = inputs.cache, inputs.tensor_name, inputs.seed
        n = tv.numel()
        if kind in ("magnitude", "breadcrumbs"):
            order = cache.order(name, row, tv) if cache else None
            if kind == "magnitude":  # keep the k largest: sorted position >= n - k
                lo, hi = (n if d <= 0 else n - max(1, int(d * n))), n
            else:
                target, n_top = int(d * n), int(extra * n)
                lo = max(0, n - target - n_top)
                hi = lo + target
            self.cuts = (_Cut(tv, lo, order), _Cut(tv, hi, order) if hi < n else None)
            return
        u = cache.uniform(seed, name, row, tv) if cache else sp.uniform_draws(seed, name, row, tv)
        if kind == "random":
            self.stats = (u.reshape(-1),)
            return
        if d > 0 and (d + extra >= 1 or d - extra <= 0):
            raise ConfigError(
                f"tensor '{name}', model row {row}: della needs density ± epsilon inside (0, 1), "
                f"but density={d:g}, epsilon={extra:g}"
            )
        rank_norm = cache.rank_norm(name, row, tv) if cache else sp.della_rank_norm(tv)
        self.stats = (rank_norm.reshape(-1), u.reshape(-1))

    def apply(self, x: torch.Tensor, a: int, out: torch.Tensor, fbuf: torch.Tensor) -> None:
        """out = x (entries a.. of the flat row; out may be x) with the dropped entries 0."""
        if self.kind in ("magnitude", "breadcrumbs"):
            lo, hi = self.cuts
            lo.shrink(x, a, out)
            if hi is not None:  # breadcrumbs: out - (entries at or above the top cut) = 0 there
                out.sub_(hi.shrink(out, a, fbuf[: x.numel()]))
            return
        b = a + x.numel()
        keep = fbuf[: x.numel()]  # float 1/0: float-only ops are several times faster here
        if self.kind == "random":
            torch.lt(self.stats[0][a:b], self.d, out=keep)
        elif self.d <= 0:
            keep.zero_()
        else:  # della: keep with probability (d - eps) + rank_norm * 2 eps, as u < p
            rn, u = self.stats[0][a:b], self.stats[1][a:b]
            probs = torch.mul(rn, 2 * self.extra, out=keep).add_(self.d - self.extra)
            torch.lt(u, probs, out=keep)
        torch.mul(x, keep, out=out)


def _masked_l1(tvf: torch.Tensor, mask: _RowMask, bufs) -> torch.Tensor:
    """L1 norm of the kept entries (0-dim float32), summed chunk by chunk in a fixed order."""
    c = bufs["f"].shape[0]
    total = torch.zeros((), dtype=torch.float32, device=tvf.device)
    for a in range(0, tvf.numel(), c):
        b = min(a + c, tvf.numel())
        x = torch.abs(tvf[a:b], out=bufs["f"][: b - a])
        mask.apply(x, a, x, bufs["g"])
        total += x.sum()
    return total


def _rescale_factor(inputs: MergeInputs, row: int, tvf, mask: _RowMask, bufs) -> float | None:
    """before / after of mergekit's `rescale` (None: no rescale), memoized per density."""
    if mask.kind is None:
        return None
    cache, name = inputs.cache, inputs.tensor_name
    key = (name, row, mask.kind, mask.d, mask.extra, inputs.seed)
    if cache is not None and key in cache.factors:
        return cache.factors[key]
    before = cache.l1(name, row, tvf) if cache else sp.l1_norm(tvf)
    after = _masked_l1(tvf, mask, bufs)
    factor = None
    if not (before < sp._RESCALE_EPS or after < sp._RESCALE_EPS):
        factor = float(before / after)  # float32 division, held exactly by a Python float
    if cache is not None:
        cache.factors[key] = factor
    return factor


def gta(inputs: MergeInputs, kind: str | None, consensus: str | None, empty) -> torch.Tensor:
    """The merged tensor (float32; in a scratch buffer when inputs.scratch is set).

    empty(key, shape, like) returns a (possibly reused) buffer.
    """
    from evomerge.merge.methods import non_base_rows, task_vectors

    base = inputs.base
    assert base is not None  # resolve guarantees a base for needs_base methods
    rows = non_base_rows(inputs)
    if not rows:
        return base.clone()
    if consensus not in (None, "sum"):
        raise ValueError(f"consensus method must be 'sum', but got {consensus!r}")
    p, m, n = inputs.params, len(rows), base.numel()
    tv = task_vectors(inputs).reshape(m, -1)  # (m, n)
    dens = inputs.model_params["density"][rows].tolist() if kind else [1.0] * m  # no mask
    extra_name = {"breadcrumbs": "gamma", "della": "epsilon"}.get(kind or "")
    extras = inputs.model_params[extra_name][rows].tolist() if extra_name else [None] * m
    w = [_f32(x) for x in inputs.model_params["weight"][rows].tolist()]
    c = max(1, min(CHUNK, n))
    dev = dict(device=base.device)
    f32 = torch.empty(0, dtype=torch.float32, **dev)
    bufs = {
        "wd": empty("gta.wd", (m, c), f32), "q": empty("gta.q", (m, c), f32),
        "f": empty("gta.f", (c,), f32), "g": empty("gta.g", (c,), f32),
        "s": empty("gta.s", (c,), f32), "e": empty("gta.e", (c,), f32),
        "one": empty("gta.one", (c,), f32).fill_(1.0),
    }  # fmt: skip
    masks = [_RowMask(inputs, kind, rows[j], tv[j], dens[j], extras[j]) for j in range(m)]
    scale = [_rescale_factor(inputs, rows[j], tv[j], masks[j], bufs) if p.get("rescale") else None
             for j in range(m)]  # fmt: skip
    w_col = torch.tensor(w, dtype=torch.float32, **dev).view(m, 1)  # (m, 1)
    out = empty("out", tuple(base.shape), base)
    flat_out, flat_base = out.view(-1), base.reshape(-1)
    lam, normalize = p["lambda"], bool(p["normalize"])
    w_total = w_col.sum(dim=0)  # (1,) as mergekit's weights.sum(dim=0); divides as a tensor
    if w_total.abs() < 1e-8:
        w_total.fill_(1)
    for a in range(0, n, c):
        b = min(a + c, n)
        ln = b - a
        wd = bufs["wd"][:, :ln]  # (m, L)
        for j in range(m):  # wd_j = masked task vector, rescaled, weighted
            x = tv[j, a:b]
            if masks[j].kind is not None:
                masks[j].apply(x, a, wd[j], bufs["g"])
                x = wd[j]
            if scale[j] is not None:  # mergekit: (delta * mask * before/after) * weight
                torch.mul(x, scale[j], out=wd[j]).mul_(w[j])
            else:
                torch.mul(x, w[j], out=wd[j])
        mixed = torch.sum(wd, dim=0, out=bufs["s"][:ln])  # (L,)
        if consensus:
            e = torch.copysign(bufs["one"][:ln], mixed, out=bufs["e"][:ln])
            q = torch.mul(wd, e, out=bufs["q"][:, :ln]).clamp_min_(0)  # (m, L)
            torch.sum(q, dim=0, out=mixed).mul_(e)
            if normalize:  # float 1/0 masks: float-only ops are several times faster here
                agree = torch.gt(q, 0, out=wd).mul_(w_col)  # (m, L): w_j where row j agrees
                div = torch.sum(agree, dim=0, out=bufs["f"][:ln])
                div.add_(torch.eq(div, 0, out=bufs["g"][:ln]))  # 0 -> 1 (no row agrees)
                mixed.div_(div)
        elif normalize:
            mixed.div_(w_total)
        if lam != 1:
            mixed.mul_(lam)
        torch.add(flat_base[a:b], mixed, out=flat_out[a:b])
    return out
