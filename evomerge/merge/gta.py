"""Generalized task arithmetic (task_arithmetic, ties, dare_*, breadcrumbs*, della*).

mergekit materializes every intermediate at full size (masks, weighted deltas, signs,
elected sign, agreement, products): a dozen passes over (n, *shape) memory, most of them
allocating. Here this module only turns the recipe's parameters and the cached data-only
statistics (sparsify.py) into a few numbers per row -- thresholds, draw cut-offs, rescale
factors -- and `kernel.gta_entries` does the arithmetic entry by entry, compiled for
in-place candidates or chunk by chunk on disk, with the same bits either way. The numbers
follow mergekit's formulas (0.0 max difference on the deterministic methods, see
scripts/compare_mergekit.py).

Per entry, with wd_j = weighted masked task vectors:
  s = sum_j wd_j; e = +1 where s >= 0 else -1 (the elected sign, as mergekit);
  q_j = max(wd_j * e, 0) = |wd_j| where row j agrees with the elected sign, else 0, so the
  disjoint sum is e * sum_j q_j exactly (negation commutes with rounding) and the
  normalising divisor is sum_j w_j [q_j > 0].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from evomerge.errors import ConfigError
from evomerge.merge import radix
from evomerge.merge import sparsify as sp
from evomerge.merge.kernel import Kernels, Spec

if TYPE_CHECKING:
    from evomerge.merge.contract import MergeInputs

EAGER = Kernels(compiled=False)
_KEEP_ALL = {  # keep arguments that keep every entry (density >= 1: no mask, no rescale)
    "magnitude": ([-1.0, -1.0], [0]),
    "breadcrumbs": ([-1.0, -1.0, math.inf, math.inf], [0, None]),
    "random": ([65536.0], []),
    "della": ([0.0, 2.0], []),
}


def _f32(x: float) -> float:
    """x rounded to float32 (the value a float32 weight tensor would hold)."""
    return float(torch.tensor(x, dtype=torch.float32))


def below(thr: float) -> float:
    """The largest float32 below thr: |x| > below(thr) <=> |x| >= thr for float32 x."""
    t = torch.tensor(thr, dtype=torch.float32)
    return float(torch.nextafter(t, torch.tensor(-float("inf"))))


class _Row:
    """One task vector's view of the data: its row, lazily |delta|, cached statistics.

    Every statistic depends on |delta| only; it is made once per row and dropped by
    release() as soon as the row's statistics are known (peak memory: one at a time).
    """

    def __init__(self, inputs: MergeInputs, x: torch.Tensor, row: int):
        self.inputs, self.x, self.row = inputs, x, row
        self._mag: torch.Tensor | None = None
        self._unit: float | None = None

    def mag(self) -> torch.Tensor:
        """|models[row] - base| in float32, shaped like the base (computed once)."""
        if self._mag is None:
            bi = self.inputs.base_index
            d = self.x[self.row].to(torch.float32) - self.x[bi].to(torch.float32)
            self._mag = d.abs_().view(self.inputs.base.shape)
        return self._mag

    def unit(self) -> float:
        """The rescale norms' unit (sparsify.l1_unit), from |x| + |base| >= |delta|: no
        delta needed (DARE never makes one)."""
        if self._unit is None:
            x, bi = self.x, self.inputs.base_index
            bound = lambda: sp.abs_bound(x[self.row]) + sp.abs_bound(x[bi])  # noqa: E731
            self._unit = self.stat("unit", lambda: sp.l1_unit(bound()))
        return self._unit

    def release(self) -> None:
        self._mag = None

    def stat(self, what: str, make, *key):
        cache, name = self.inputs.cache, self.inputs.tensor_name
        if cache is None:
            return make()
        return cache.get((what, name, self.row, *key), make)

    def cut(self, pos: int) -> tuple[list[float], int]:
        """Keep arguments of "sorted position >= pos" (see radix.magnitude_cut)."""
        n = self.x.shape[1]
        if pos >= n:
            return [math.inf, math.inf], n
        if self.inputs.cache is None:
            thr, first = radix.magnitude_cut(self.mag(), pos)
        else:  # two lookups in the cached order
            first = int(self.stat("order", lambda: sp.magnitude_order(self.mag()))[pos])
            col = self.x[:, first].to(torch.float32)  # |delta| at `first`, from the rows
            thr = float((col[self.row] - col[self.inputs.base_index]).abs())
        return [thr, below(thr)], first


def _keep_args(r: _Row, kind: str, d: float, extra) -> tuple[list[float], list, list]:
    """(floats, firsts, stats) of one row's keep-mask for the kernel (see kernel._keep)."""
    inputs, n = r.inputs, r.x.shape[1]
    if kind in ("random", "della"):
        seed, name = inputs.seed, inputs.tensor_name
        make = lambda: sp.draws(seed, name, r.row, n, r.x.device)  # noqa: E731
        stats = [r.stat("draws", make, seed)]
    else:
        stats = []
    cols = inputs.base.shape[1] if inputs.base.dim() > 1 else n
    floats, firsts = keep_numbers(kind, d, extra, n, cols, r.cut, (inputs.tensor_name, r.row))
    return floats, firsts, _della(r, kind, stats)


def keep_numbers(kind: str, d: float, extra, n: int, cols: int, cut, where) -> tuple[list, list]:
    """(floats, firsts) of one row's keep-mask: n entries, rows of `cols` (DELLA's rank
    scale); cut(pos) gives the keep arguments of "sorted position >= pos"; where:
    (tensor name, row) for errors. Shared by whole-tensor and chunked (chunked.py) merges."""
    if d >= 1:
        floats, firsts = _KEEP_ALL[kind]
        return list(floats), [n if f is None else f for f in firsts]
    if kind == "magnitude":  # keep the k largest: sorted position >= n - k
        floats, first = cut(n if d <= 0 else n - max(1, int(d * n)))
        return floats, [first]
    if kind == "breadcrumbs":  # keep target entries below the n_top largest
        target, n_top = int(d * n), int(extra * n)
        lo = max(0, n - target - n_top)
        f_lo, first_lo = cut(lo)
        f_hi, first_hi = cut(lo + target)
        return f_lo + f_hi, [first_lo, first_hi]
    if kind == "random":  # u < d  <=>  draw < ceil(d * 65536)
        return [float(math.ceil(max(d, 0.0) * 65536))], []
    if d > 0 and (d + extra >= 1 or d - extra <= 0):
        raise ConfigError(
            f"tensor '{where[0]}', model row {where[1]}: della needs density ± epsilon "
            f"inside (0, 1), but density={d:g}, epsilon={extra:g}"
        )
    if d <= 0:
        return [0.0, 0.0], []
    c1 = 2 * extra / (cols - 1) if cols > 1 else 0.0  # keep p from d - eps to d + eps by rank
    return [_f32(c1), _f32(d - extra)], []


def _della(r: _Row, kind: str, stats: list) -> list:
    if kind != "della":
        return stats
    return [*stats, r.stat("ranks", lambda: sp.della_ranks(r.mag()))]


DARE_HISTOGRAM_MIN = 1 << 19  # entries: above, a 512 KB histogram is < 1 byte per entry


def _dare_kept_l1(r: _Row, k: int, unit: float, draws: torch.Tensor) -> float:
    """The kept norm of DARE at draw cut-off k, read from a cached cumulative histogram of
    round(|delta| * unit) over the 65536 draw values: no pass over the data per trial.
    Integer sums, so it equals the kernel's masked_l1 exactly."""

    def make() -> torch.Tensor:
        q = torch.round(r.mag().reshape(-1) * unit).to(torch.float64)
        v = draws[0].to(torch.int64) * 256 + draws[1]
        return torch.bincount(v, weights=q, minlength=1 << 16).cumsum(0)

    cum = r.stat("dare_l1", make, r.inputs.seed)
    r.release()
    return float(cum[k - 1]) if k > 0 else 0.0


def _rescale(inputs, spec, rows, masked, x, stats, p, firsts, kernels) -> list[float]:
    """mergekit's rescale factor before / after per row (1.0: none), memoized per density.

    Norms are counted in exact integer units (sparsify.l1_unit), so the compiled and the
    eager kernels give the same factor; only the kept norm depends on the parameters.
    """
    cache = inputs.cache
    keys = [
        (inputs.tensor_name, r.row, spec.kind, *mk, inputs.seed) if mk else None
        for r, mk in zip(rows, masked, strict=True)
    ]
    known = cache.factors if cache is not None else {}
    factors = {j: known[k] for j, k in enumerate(keys) if k in known}
    todo = [j for j, k in enumerate(keys) if k is not None and j not in factors]
    if todo:
        units = [r.unit() for r in rows]
        u = torch.tensor(units, dtype=torch.float32, device=x.device)
        plain = Spec(None, False, False, spec.rows, spec.base)
        if cache is None and not kernels.compiled:  # a disk merge: both norms in one pass
            before, after = kernels.l1_before_after(spec, x, stats, p, firsts, u)
        else:
            before = rows[0].stat(
                "before", lambda: kernels.masked_l1(plain, x, [], p, [], u), spec.rows, spec.base
            )
            if cache is not None and spec.kind == "random" and x.shape[1] >= DARE_HISTOGRAM_MIN:
                o = 2 * len(rows) + 2  # DARE's keep argument k of row j is p[o + j]
                ks = [int(v) for v in p[o : o + len(rows)].tolist()]
                after = [_dare_kept_l1(r, ks[j], units[j], stats[j][0]) for j, r in enumerate(rows)]
            else:
                after = kernels.masked_l1(spec, x, stats, p, firsts, u)
        for j in todo:
            factors[j] = sp.rescale_factor(before[j], after[j], units[j])
            if cache is not None:
                cache.factors[keys[j]] = factors[j]
    return [1.0 if factors.get(j) is None else factors[j] for j in range(len(rows))]


@dataclass(frozen=True)
class Setup:
    """The per-tensor numbers of a GTA merge that do not depend on the data."""

    spec: Spec
    dens: list[float]
    extras: list
    head: list[float]  # weights, rescale factors (1.0), lambda, summed weights


def setup(inputs: MergeInputs, kind: str | None, consensus: str | None) -> Setup:
    """The kernel Spec and the parameters of each merged row (inputs: any rows, or a chunk)."""
    if consensus not in (None, "sum"):
        raise ValueError(f"consensus method must be 'sum', but got {consensus!r}")
    idx = inputs.non_base_rows()
    prm, m = inputs.params, len(idx)
    spec = Spec(kind, consensus is not None, bool(prm["normalize"]), tuple(idx), inputs.base_index)
    dens = inputs.model_params["density"][idx].tolist() if kind else [1.0] * m  # no mask
    extra_name = {"breadcrumbs": "gamma", "della": "epsilon"}.get(kind or "")
    extras = inputs.model_params[extra_name][idx].tolist() if extra_name else [None] * m
    w = [_f32(v) for v in inputs.model_params["weight"][idx].tolist()]
    w_total = float(torch.tensor(w, dtype=torch.float32).sum())  # mergekit: weights.sum(0)
    if abs(w_total) < 1e-8:
        w_total = 1.0
    return Setup(spec, dens, extras, [*w, *([1.0] * m), _f32(prm["lambda"]), w_total])


def gta(inputs: MergeInputs, kind: str | None, consensus: str | None, empty) -> torch.Tensor:
    """The merged tensor (float32; in a scratch buffer when inputs.scratch is set).

    empty(key, shape, like) returns a (possibly reused) buffer.
    """
    base = inputs.base
    assert base is not None  # resolve guarantees a base for needs_base methods
    idx = inputs.non_base_rows()
    f32 = torch.empty(0, dtype=torch.float32, device=base.device)
    if not idx:
        return empty("out", tuple(base.shape), f32).copy_(base)
    su = setup(inputs, kind, consensus)
    spec, dens, extras, prm, m = su.spec, su.dens, su.extras, inputs.params, len(idx)
    x = inputs.models.reshape(inputs.models.shape[0], -1)  # (n_in, n)
    rows = [_Row(inputs, x, i) for i in idx]
    keep, firsts, stats, masked = [], [], [], []
    for j, r in enumerate(rows):
        if kind is None:
            masked.append(None)
            continue
        k, f, s = _keep_args(r, kind, dens[j], extras[j])
        keep += k
        firsts += f
        stats.append(s)
        masked.append((dens[j], extras[j]) if dens[j] < 1 else None)
        if prm.get("rescale") and masked[-1]:
            r.unit()
        r.release()
    kernels = inputs.kernels or EAGER
    p = torch.tensor(su.head + keep, dtype=torch.float32, device=x.device)
    if prm.get("rescale") and any(masked):
        p[m : 2 * m] = torch.tensor(
            _rescale(inputs, spec, rows, masked, x, stats, p, firsts, kernels)
        )
    out = empty("out", tuple(base.shape), f32)
    kernels.gta(spec, out.view(-1), x, stats, p, firsts)
    return out
