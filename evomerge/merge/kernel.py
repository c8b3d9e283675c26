"""The per-entry arithmetic of linear and generalized task arithmetic, written once.

Each `*_entries` function maps a chunk of the stacked flat inputs to the same chunk of the
output, entry by entry. The same function runs two ways:

- eager, chunk by chunk, so every intermediate stays in cache: the disk path (and any
  device but the CPU), where reading and casting dominate and compiling would cost more
  than it saves;
- compiled by torch.compile over whole tensors: inductor generates one fused C++ loop, so
  every input is read once and the output written once, near memory bandwidth. This is for
  in-place candidates, which run the same arithmetic hundreds of times.

Both give the same bits: every rounding operation (float32 sub, mul, add, div) is the same
IEEE operation on the same operands in the same order, and inductor is pinned to
-ffp-contract=off (no fused multiply-add) and no unsafe math. Comparisons, selections and
sign flips are exact however they are evaluated. Sums over entries (rescale norms) add
integers in float64, exact in any order. tests/test_kernel.py checks compiled == eager.

Layout: x is the stacked inputs  # (n_in, L); p is float32: weight_j..., rescale_j... (1 =
none), lambda, summed weights, then the keep arguments of each row (NKEEP[kind] each);
firsts are the `first` indices of magnitude cuts (ints eagerly, an int64 tensor compiled).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

NKEEP = {None: 0, "magnitude": 2, "breadcrumbs": 4, "random": 1, "della": 2, "given": 0}
DRAW_SCALE = 1.0 / 65536  # a 16-bit draw r stands for the uniform number r / 65536
CHUNK = 1 << 17  # entries per eager chunk on the CPU: intermediates stay in L2
_COMPILE_OPTIONS = {  # what the bit-for-bit agreement with eager relies on
    "cpp.enable_floating_point_contract_flag": "off",
    "cpp.enable_unsafe_math_opt_flag": False,
}


@dataclass(frozen=True)
class Spec:
    """The static part of a merge kernel (a compiled kernel is specialized on it).

    kind: the keep-mask: None, "magnitude", "breadcrumbs", "random" (DARE), "della", or
        "given" (each row's stats are its mask, uint8 1/0: a random mask made once, keep_mask)
        ("select": sce's variance cut, sce.py)
    consensus: TIES sign election (mergekit's consensus "sum")
    normalize: divide by the summed weights (with consensus: of the rows that agree)
    rows: rows of x holding the merged models; base: the base row (None for linear)
    """

    kind: str | None
    consensus: bool
    normalize: bool
    rows: tuple[int, ...]
    base: int | None = None


# ---- the arithmetic of one chunk -------------------------------------------------------------


def _u16(planes):
    """(2, L) uint8 [hi, lo] -> hi * 256 + lo as float32 (exact); int32 (1, L) as is."""
    import torch

    if planes.dtype == torch.uint8:
        return planes[0].to(torch.float32) * 256.0 + planes[1].to(torch.float32)
    return planes[0].to(torch.float32)


def threshold(thr, ge, first, a: int, length: int, device):
    """The magnitude threshold for entries a..a+length of a cut: entries before `first`
    need |d| > thr, the others |d| >= thr, i.e. |d| > ge (the float32 just below thr).
    Eagerly usually one scalar per chunk; compiled, a select that inductor fuses."""
    import torch

    if isinstance(first, int):
        if first <= a:
            return ge
        if first >= a + length:
            return thr
    return torch.where(torch.arange(a, a + length, device=device) >= first, ge, thr)


def _flag(op, a, b):
    """op(a, b) as float32 1/0. Masks stay float: eagerly a comparison into a float tensor
    and products with it run several times faster than anything on bool tensors."""
    import torch

    if torch.compiler.is_compiling():
        return op(a, b).to(torch.float32)
    return op(a, b, out=torch.empty_like(a, dtype=torch.float32))  # b: a scalar or like a


def _keep(kind: str, d, st: Sequence, p, o: int, firsts, j: int, a: int):
    """Float 1/0 keep-mask of row j's task-vector chunk d; its arguments start at p[o]."""
    import torch

    if kind == "magnitude":
        t = threshold(p[o], p[o + 1], firsts[j], a, d.shape[0], d.device)
        return _flag(torch.gt, d.abs(), t)
    if kind == "breadcrumbs":  # drop the smallest and the outliers: t_lo < |d| <= t_hi
        mag = d.abs()
        lo = threshold(p[o], p[o + 1], firsts[2 * j], a, d.shape[0], d.device)
        hi = threshold(p[o + 2], p[o + 3], firsts[2 * j + 1], a, d.shape[0], d.device)
        return _flag(torch.gt, mag, lo) * _flag(torch.le, mag, hi)
    if kind == "random":  # DARE: keep draw < k, k = ceil(density * 65536)
        return _flag(torch.lt, _u16(st[0]), p[o])
    if kind == "della":  # keep u < rank * c1 + c0 (c1 = 2 eps / (n - 1), c0 = density - eps)
        return _flag(torch.lt, _u16(st[0]) * DRAW_SCALE, _u16(st[1]) * p[o] + p[o + 1])
    if kind == "given":
        return st[0].to(torch.float32)
    raise ValueError(f"unknown mask kind {kind!r}")


def _keep_offset(spec: Spec, j: int) -> int:
    """Where row j's keep arguments start in p (see the layout above)."""
    return 2 * len(spec.rows) + 2 + j * NKEEP[spec.kind]


def _masked_delta(spec: Spec, x, j: int, stats, p, firsts, a: int):
    """Task vector j (float32), times its keep-mask: dropped entries become +-0 (IEEE)."""
    import torch

    d = x[spec.rows[j]].to(torch.float32) - x[spec.base].to(torch.float32)
    if spec.kind is None:
        return d
    o = _keep_offset(spec, j)
    return d * _keep(spec.kind, d, stats[j], p, o, firsts, j, a)


def gta_entries(spec: Spec, x, stats: Sequence, p, firsts, a: int):
    """base + lambda * (merged task vectors) for entries a..a+L (x: (n_in, L)).

    Only IEEE arithmetic and selections, so zeros get the same sign compiled or not.
    """
    import torch

    m = len(spec.rows)
    wds = []
    for j in range(m):  # mergekit: (delta * mask * rescale) * weight
        wds.append(_masked_delta(spec, x, j, stats, p, firsts, a) * p[m + j] * p[j])
    s = wds[0]
    for wd in wds[1:]:
        s = s + wd
    if spec.consensus:
        e = _flag(torch.ge, s, 0.0) * 2.0 - 1.0  # elected sign: + where sum >= 0
        q, agree = [], []
        for wd in wds:  # q_j = |wd_j| where row j agrees with the elected sign, else 0
            signed = wd * e
            agree.append(_flag(torch.gt, signed, 0.0))
            q.append(signed * agree[-1])
        mixed = q[0]
        for qj in q[1:]:
            mixed = mixed + qj
        mixed = mixed * e
        if spec.normalize:  # by the summed weights of the agreeing rows (none agrees: 1)
            div = agree[0] * p[0]
            for j in range(1, m):
                div = div + agree[j] * p[j]
            mixed = mixed / (div + _flag(torch.eq, div, 0.0))
    else:
        mixed = s / p[2 * m + 1] if spec.normalize else s
    return x[spec.base].to(torch.float32) + mixed * p[2 * m]


def l1_entries(spec: Spec, x, j: int, stats, p, firsts, a: int, unit):
    """round(|masked task vector j| * unit) as float64: integers, so sums are exact."""
    import torch

    d = _masked_delta(spec, x, j, stats, p, firsts, a)
    return torch.round(d.abs() * unit).to(torch.float64)


def linear_entries(spec: Spec, x, p):
    """sum_j x_j * w_j, divided by the summed weights p[m] when normalizing."""
    import torch

    m = len(spec.rows)
    acc = x[spec.rows[0]].to(torch.float32) * p[0]
    for j in range(1, m):
        acc = acc + x[spec.rows[j]].to(torch.float32) * p[j]
    return acc / p[m] if spec.normalize else acc


# ---- whole-tensor forms (compiled) ---------------------------------------------------------------
# Each `*_into(spec, outs, x, stats, p, firsts, a)` writes its entry function's results into
# outs: Kernels.run_into calls it on slices eagerly, or compiled once on whole tensors.


def _gta_into(spec: Spec, outs, x, stats, p, firsts, a) -> None:
    outs[0].copy_(gta_entries(spec, x, stats, p, firsts, a))


def _masks_into(spec: Spec, outs, x, stats, p, firsts, a) -> None:
    """Each row's keep-mask of a random kind (DARE, DELLA) as uint8 1/0 into outs[j]: what
    gta_entries applies, for a Spec of kind "given" to apply later (the draws and ranks
    are then made once, not once per pass). x: None (not read)."""
    for j, out in enumerate(outs):
        out.copy_(_keep(spec.kind, None, stats[j], p, _keep_offset(spec, j), [], j, 0))


def _linear_into(spec: Spec, outs, x, stats, p, firsts, a) -> None:
    outs[0].copy_(linear_entries(spec, x, p))


def _l1_whole(spec: Spec, x, stats, p, firsts, units):
    return [l1_entries(spec, x, j, stats, p, firsts, 0, units[j]).sum() for j in range(len(units))]


def _l1_pair_whole(spec: Spec, x, stats, p, firsts, units):
    """(unmasked, masked) L1 sums of every row in one fused pass."""
    return _l1_whole(replace(spec, kind=None), x, stats, p, firsts, units), _l1_whole(
        spec, x, stats, p, firsts, units
    )


_COMPILED: dict[tuple, Callable[..., Any]] = {}  # (entry function, Spec) -> compiled, per process
_WARM: set[tuple] = set()  # (entry function, Spec, argument dtypes) called once already
_FIRST_CALL = threading.Lock()
BUSY = object()  # what Kernels._call answers while another thread compiles


class Kernels:
    """Runs the entry functions over whole flat tensors: compiled (one torch.compile'd
    function per Spec, built on first use) or eagerly chunk by chunk.

    x: the stacked inputs  # (n_in, n); out: (n,) float32, written in place.
    """

    def __init__(self, compiled: bool = False) -> None:
        self.compiled = compiled

    def _compiled(self, fn: Callable[..., Any], spec: Spec) -> Callable[..., Any]:
        key = (fn.__name__, spec)
        f = _COMPILED.get(key)
        if f is None:
            import torch

            def bound(*args: Any) -> Any:
                return fn(spec, *args)

            # dynamo keeps compiled graphs per code object, up to a recompile limit: one
            # code object per kernel keeps different specs from evicting each other
            bound.__code__ = bound.__code__.replace(co_name=f"{fn.__name__}_{len(_COMPILED)}")
            f = torch.compile(bound, dynamic=True, fullgraph=True, options=_COMPILE_OPTIONS)
            _COMPILED[key] = f
        return f

    def _chunks(self, n: int, device):
        """Chunk bounds; on the CPU, ops run on one thread meanwhile: each op takes tens of
        microseconds, so a parallel region per op costs about what it saves, and on a busy
        machine a preempted worker stalls every op at its barrier (measured: 3x slower)."""
        import torch

        from evomerge.common.device import torch_threads

        cpu = str(device) == "cpu"
        step = CHUNK if cpu else max(CHUNK, 1 << 24)
        with torch_threads(1 if cpu else torch.get_num_threads()):
            for a in range(0, n, step):
                yield a, min(a + step, n)

    def _call(self, fn: Callable[..., Any], spec: Spec, *args: Any) -> Any:
        """The compiled fn for spec on args, or BUSY: the caller then runs it eagerly (the
        same bits). A first call (it compiles) holds a lock, as disk merges call from
        several worker threads and dynamo does not promise two compiles at once; a thread
        that finds the lock taken does its work eagerly meanwhile instead of waiting (a
        compile takes ~10 s here)."""
        key = (fn.__name__, spec, *((a.dtype, a.dim()) for a in args if hasattr(a, "dtype")))
        f = self._compiled(fn, spec)
        if key in _WARM:
            return f(*args)
        if not _FIRST_CALL.acquire(blocking=False):
            return BUSY
        try:
            out = f(*args)
            _WARM.add(key)
        finally:
            _FIRST_CALL.release()
        return out

    def run_into(
        self, fn: Callable[..., None], spec: Spec, outs: Sequence, x, stats: Sequence, p,
        firsts: Sequence[int] = (), offset: int = 0,
    ) -> None:  # fmt: skip
        """fn(spec, outs, x, stats, p, firsts, a) (a `*_into` function) over whole flat
        tensors: outs (each (..., n)) are written in place. offset: the flat index of x's
        first entry in its tensor (a row chunk's place)."""
        if self.compiled:  # cut positions relative to this chunk (see threshold)
            ft = _int_tensor([f - offset for f in firsts], outs[0].device)
            if self._call(fn, spec, list(outs), x, stats, p, ft, 0) is not BUSY:
                return
        for a, b in self._chunks(outs[0].shape[-1], outs[0].device):
            sub = [o[..., a:b] for o in outs]
            xs = None if x is None else x[..., a:b]
            fn(spec, sub, xs, _sl(stats, a, b), p, firsts, a + offset)

    def gta(self, spec: Spec, out, x, stats, p, firsts: Sequence[int], offset: int = 0) -> None:
        self.run_into(_gta_into, spec, [out], x, stats, p, firsts, offset)

    def keep_masks(self, spec: Spec, outs: Sequence, stats, p) -> None:
        """Each row's keep-mask (uint8 1/0, random kinds) into outs[j], see _masks_into."""
        self.run_into(_masks_into, spec, outs, None, stats, p)

    def linear(self, spec: Spec, out, x, p) -> None:
        self.run_into(_linear_into, spec, [out], x, [], p)

    def l1_before_after(self, spec: Spec, x, stats, p, firsts: Sequence[int], units,
                        offset: int = 0):  # fmt: skip
        """Per row j: (sum over all entries, sum over kept entries) of round(|task vector j|
        * units[j]), in one pass (eager chunks, or one compiled kernel): what masked_l1 gives
        without and with the mask (the mask multiplies by 1 or 0, so rounding then masking
        equals masking then rounding)."""
        import torch

        if self.compiled:
            ft = _int_tensor([f - offset for f in firsts], x.device)
            sums = self._call(_l1_pair_whole, spec, x, stats, p, ft, units)
            if sums is not BUSY:
                return [float(v) for v in sums[0]], [float(v) for v in sums[1]]
        m = len(spec.rows)
        before, after = [0.0] * m, [0.0] * m
        for a, b in self._chunks(x.shape[1], x.device):
            xs, st = x[:, a:b], _sl(stats, a, b)
            base = xs[spec.base].to(torch.float32)
            for j in range(m):
                mag = (xs[spec.rows[j]].to(torch.float32) - base).abs_()
                q = torch.round(mag * units[j])
                before[j] += float(q.sum(dtype=torch.float64))
                o = _keep_offset(spec, j)  # the mask reads |d| only, if anything
                keep = _keep(spec.kind, mag, st[j], p, o, firsts, j, a + offset)
                after[j] += float(q.mul_(keep).sum(dtype=torch.float64))
        return before, after

    def masked_l1(self, spec: Spec, x, stats, p, firsts: Sequence[int], units,
                  offset: int = 0) -> list[float]:  # fmt: skip
        """Per row j: sum of round(|kept entries of task vector j| * units[j]) (exact)."""
        if self.compiled:
            ft = _int_tensor([f - offset for f in firsts], x.device)
            sums = self._call(_l1_whole, spec, x, stats, p, ft, units)
            if sums is not BUSY:
                return [float(s) for s in sums]
        totals = [0.0] * len(spec.rows)
        for a, b in self._chunks(x.shape[1], x.device):
            xs, st = x[:, a:b], _sl(stats, a, b)
            for j in range(len(spec.rows)):
                totals[j] += float(
                    l1_entries(spec, xs, j, st, p, firsts, a + offset, units[j]).sum()
                )
        return totals


def _sl(stats: Sequence, a: int, b: int) -> list:
    return [[s[..., a:b] for s in st] for st in stats]


def _int_tensor(values: Sequence[int], device):
    import torch

    return torch.tensor(list(values) or [0], dtype=torch.int64, device=device)


def compile_available(device) -> bool:
    """Whether compiled kernels may run: CPU tensors (inductor's C++ backend, whose flags
    are pinned above), a C++ compiler on PATH, and EVOMERGE_COMPILE not set to 0."""
    if str(device) != "cpu" or os.environ.get("EVOMERGE_COMPILE", "1") == "0":
        return False
    import shutil

    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))
