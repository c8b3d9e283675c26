"""Data-only statistics behind the sparsification masks (TIES, breadcrumbs, DARE, DELLA).

Semantics follow mergekit 0.1.5 (`mergekit/sparsify.py`); the masks themselves are applied
entry by entry in `kernel.py`. What makes the search fast: everything that depends only on
the data is computed once per (tensor, model row) and kept in a `SparsifyCache`:

- magnitude order: the stable ascending order of |delta|, so a TIES/breadcrumbs density is
  a threshold (`magnitude_cut`: two lookups) instead of a new sort per trial; un-cached
  (disk) merges find the same threshold by a radix selection, without sorting;
- DARE / DELLA draws: 16-bit uniform integers keyed by (seed, tensor name, row), so a mask
  for density d is `draw < d * 65536` -- common random numbers across trials, and the same
  bytes whatever order tensors are processed in;
- DELLA ranks: the rank of |delta| within its row (mergekit's dim 1);
- the rescale reference: the L1 norm of each task vector, in exact integer units.

16-bit values are stored as two uint8 planes (hi, lo): half the memory traffic of float32
draws, and inductor vectorizes uint8 loads (not int16 ones). The kept fraction for density
d is ceil(d * 65536) / 65536, within 2e-5 of d.

Ties in magnitude: ranks come from a *stable* ascending sort of |delta|, so among equal
magnitudes the entry with the lower flat index (DELLA: column) ranks lower. mergekit uses an
unstable sort, so it may break exact ties differently; ties among exact zeros (the common
case) make no numerical difference.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

RESCALE_EPS = 1e-7  # mergekit: below this L1 norm a masked tensor is returned unscaled
L1_BITS = 24  # rescale norms count |delta| in units below 2^-24 of its max (exact sums)
_RANK_BLOCK = 1 << 20  # entries per block of the DELLA rank sort (bounds its temporaries)


# ---- magnitude (TIES, breadcrumbs) -------------------------------------------------------------


def _bits(mag: torch.Tensor) -> torch.Tensor:
    """Magnitudes as int32 bit patterns: for non-negative floats, integer order = value order
    (and integer keys sort faster than floats)."""
    import torch

    return mag.reshape(-1).view(torch.int32)


def magnitude_order(mag: torch.Tensor) -> torch.Tensor:
    """Flat indices of mag = |delta| in a stable ascending sort (int32 when they fit), 1-D."""
    import torch

    order = torch.argsort(_bits(mag), stable=True)
    return order.to(torch.int32) if order.numel() < 2**31 else order


def magnitude_cut(mag: torch.Tensor, p: int) -> tuple[float, int]:
    """(thr, first): the entries at sorted positions >= p (stable ascending mag = |delta|)
    are exactly those with mag > thr, or mag == thr at flat index >= first.

    p == n keeps nothing: (inf, n). A radix selection on the float bits: a histogram of
    the high 16 bits finds the bucket of position p, one of the low 16 bits (over that
    bucket only) the value. O(n), no sort; with a cached `magnitude_order` the same answer
    is (mag[order[p]], order[p]). `magnitude_cuts` gives the same answer over chunks.
    """
    return magnitude_cuts(lambda: iter([(mag.reshape(-1),)]), [(0, p)])[0]


def magnitude_cuts(chunks, positions: list[tuple[int, int]]) -> list[tuple[float, int]]:
    """magnitude_cut for several (stream, position) requests over tensors given as
    consecutive flat chunks: chunks() yields, on each call (one per pass, at most three),
    a tuple with the next chunk of |delta| of every stream.

    The histograms are integer counts, so the answer does not depend on how the tensors
    are cut: bit-identical to magnitude_cut on each whole tensor.
    """
    import torch

    n, hist = 0, None
    for cs in chunks():  # pass 1: high 16 bits, per stream
        n += cs[0].numel()
        h = torch.stack([torch.bincount(_bits(c) >> 16, minlength=1 << 15).cpu() for c in cs])
        hist = h if hist is None else hist + h
    out: list[tuple[float, int]] = [(float("inf"), n)] * len(positions)
    todo = [i for i, (_, p) in enumerate(positions) if p < n]
    if not todo or hist is None:
        return out
    cum = hist.cumsum(1)
    where = {i: (positions[i][0], *_locate(cum[positions[i][0]], positions[i][1])) for i in todo}
    buckets = sorted({(s, b) for s, b, _ in where.values()})
    low = {sb: torch.zeros(1 << 16, dtype=torch.int64) for sb in buckets}
    dense = {sb: int(hist[sb]) * 16 > n for sb in buckets}  # a large share of all entries
    for cs in chunks():  # pass 2: low 16 bits inside the buckets asked for
        for s, b in buckets:
            low[s, b] += _low_hist(_bits(cs[s]), b, dense[s, b])
    value, rank = {}, {}
    for i in todo:
        s, b, r = where[i]
        v, r = _locate(low[s, b].cumsum(0), r)
        value[i], rank[i] = (b << 16) | v, r  # the rank-th entry (flat order) equal to value
    seen, a = dict.fromkeys(todo, 0), 0
    for cs in chunks():  # pass 3: the flat index of that entry
        for i in [i for i in todo if seen[i] >= 0]:
            eq = _bits(cs[where[i][0]]) == value[i]
            hits = int(torch.count_nonzero(eq))  # indices only in the chunk that holds it
            if seen[i] + hits > rank[i]:
                out[i], seen[i] = (_float_of(value[i]), a + _nth_true(eq, rank[i] - seen[i])), -1
            else:
                seen[i] += hits
        a += cs[0].numel()
        if all(v < 0 for v in seen.values()):
            break
    return out


def _nth_true(eq: torch.Tensor, k: int) -> int:
    """Flat index of the k-th (0-based) True of a 1-D bool tensor: per-block counts find
    its block, so the index list is built for one block only (a bucket of exact zeros may
    hold every entry of the chunk)."""
    import torch

    block = 1 << 16
    full = eq.numel() // block * block
    counts = torch.count_nonzero(eq[:full].view(-1, block), dim=1)
    if full < eq.numel():
        counts = torch.cat([counts, torch.count_nonzero(eq[full:]).view(1)])
    cum = counts.cumsum(0)
    b = int(torch.searchsorted(cum, torch.tensor(k, dtype=cum.dtype), right=True))
    before = int(cum[b - 1]) if b else 0
    hits = torch.nonzero(eq[b * block : (b + 1) * block]).view(-1)
    return b * block + int(hits[k - before])


def _low_hist(bits: torch.Tensor, b: int, dense: bool) -> torch.Tensor:
    """Histogram of the low 16 bits of the entries whose high bits are b (same counts
    either way): selecting them is faster for a small bucket, masking the others into an
    extra bin for a bucket holding most entries (e.g. the exact zeros of sparse deltas)."""
    import torch

    if not dense:
        return torch.bincount(bits[(bits >> 16) == b] & 0xFFFF, minlength=1 << 16).cpu()
    low = (bits & 0xFFFF).masked_fill_((bits >> 16) != b, 1 << 16)
    return torch.bincount(low, minlength=(1 << 16) + 1)[: 1 << 16].cpu()


def _locate(cum: torch.Tensor, p: int) -> tuple[int, int]:
    """(bucket, position within it) of sorted position p, from a cumulative histogram."""
    import torch

    b = int(torch.searchsorted(cum, torch.tensor(p, dtype=cum.dtype), right=True))
    return b, p - (int(cum[b - 1]) if b else 0)


def _float_of(bits: int) -> float:
    import torch

    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32)[0])


# ---- DARE / DELLA ------------------------------------------------------------------------------


def to_planes(v: torch.Tensor) -> torch.Tensor:
    """Contiguous integers (their low 16 bits) -> (2, n) uint8 [hi, lo]; overwrites v."""
    import torch

    flat = v.view(-1)
    out = torch.empty((2, flat.numel()), dtype=torch.uint8, device=v.device)
    out[1].copy_(flat)  # integer -> uint8 keeps the low 8 bits
    out[0].copy_(flat.bitwise_right_shift_(8))
    return out


def draws(
    seed: int, tensor_name: str, row: int, numel: int, device, start: int = 0,
    stop: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """16-bit uniform draws keyed by (seed, tensor name, row): (2, numel) uint8 [hi, lo].

    A PCG64 generator seeded from sha256 of the key makes the draws independent of the order
    in which tensors are processed, of anything drawn before and of the device (they are
    drawn on the CPU): every byte is uniform and independent, so the two planes are two
    uniform bytes per entry. numpy's full-range 64-bit draws cost ~0.75 ns per entry here,
    torch's CPU generator ~5 ns (measured on 2**25 entries).
    """
    import numpy as np
    import torch

    stop = numel if stop is None else stop
    if start == 0 and stop == numel:
        planes = _draw_bytes(seed, tensor_name, row, 0, 2 * numel).reshape(2, numel)
    else:  # entries start..stop of the hi plane (bytes 0..n) and of the lo plane (n..2n)
        hi = _draw_bytes(seed, tensor_name, row, start, stop)
        lo = _draw_bytes(seed, tensor_name, row, numel + start, numel + stop)
        planes = np.stack([hi, lo])
    return torch.from_numpy(planes).to(device)


def _draw_bytes(seed: int, tensor_name: str, row: int, a: int, b: int):
    """Bytes a..b of the key's stream of uniform 64-bit words (little endian): the
    generator skips the a // 8 words before them (PCG64.advance, exact)."""
    import numpy as np

    key = f"{seed}:{tensor_name}:{row}".encode()
    bit_gen = np.random.PCG64(int.from_bytes(hashlib.sha256(key).digest(), "little"))
    w0 = a // 8
    if w0:
        bit_gen.advance(w0)
    rng = np.random.Generator(bit_gen)
    words = rng.integers(0, 2**64, size=(b + 7) // 8 - w0, dtype=np.uint64)
    return words.astype("<u8", copy=False).view(np.uint8)[a - 8 * w0 : b - 8 * w0]


def della_ranks(mag: torch.Tensor) -> torch.Tensor:
    """Rank of mag = |delta| within its row (mergekit: along dim 1; 1-D tensors are one row) in
    a stable ascending sort, flat in mag's order: (2, n) uint8 planes, or (1, n) int32 for
    rows longer than 65536.

    Rows are sorted a block at a time (bounded temporaries); see _stable_order.
    """
    import torch

    work = mag.reshape(1, -1) if mag.dim() < 2 else mag.movedim(1, -1)
    n_cols = work.shape[-1]
    rows = work.reshape(-1, n_cols)  # (R, n_cols), contiguous copy only for >2-D tensors
    ranks = torch.empty(rows.shape, dtype=torch.int32, device=mag.device)
    pos = torch.arange(n_cols, dtype=torch.int32, device=mag.device)
    step = max(1, _RANK_BLOCK // n_cols)
    cols = torch.arange(n_cols, dtype=torch.int64, device=mag.device)
    for r0 in range(0, rows.shape[0], step):
        blk = rows[r0 : r0 + step]
        ranks[r0 : r0 + step].scatter_(1, _stable_order(blk, cols), pos.expand(blk.shape[0], -1))
    if mag.dim() > 2:  # back to mag's layout
        ranks = ranks.view(work.shape).movedim(-1, 1).contiguous()
    if n_cols > 1 << 16:
        return ranks.reshape(1, -1)
    return to_planes(ranks)


def _stable_order(blk: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Per row, the column order of a stable ascending sort of blk (float32 >= 0), int64.

    On the CPU: keys (bit pattern << 32 | column) are distinct and order like a stable sort,
    so an unstable sort of the keys is enough, and numpy sorts 64-bit integers with SIMD
    sorting networks: 11 ns per entry against torch's stable argsort's 36 (rows of 576, one
    thread, measured here).
    """
    import torch

    if blk.device.type != "cpu":
        return torch.argsort(blk.view(torch.int32), dim=1, stable=True)
    keys = (blk.view(torch.int32).to(torch.int64) << 32) | cols
    keys.numpy().sort(axis=1)  # in place, shared memory
    return keys.bitwise_and_(0xFFFFFFFF)


# ---- rescale -------------------------------------------------------------------------------------


def l1_unit(bound: float) -> float:
    """2^(24 - e) with bound < 2^e, for a bound on |delta| (0.0: all zero). Every
    round(|x| * unit) is then an integer of at most 2^24, so float64 sums of them are
    exact in any order (up to 2^29 entries): chunked, compiled and cached norms agree.
    """
    import math

    if bound == 0.0:
        return 0.0
    return math.ldexp(1.0, L1_BITS - math.frexp(bound)[1])


def abs_bound(x: torch.Tensor) -> float:
    """max |x| without a temporary (one aminmax pass)."""
    if x.numel() == 0:
        return 0.0
    lo, hi = x.aminmax()
    return max(-float(lo), float(hi))


def rescale_factor(before: float, after: float, unit: float) -> float | None:
    """mergekit's before / after (None: no rescale), from exact integer-unit norms."""
    if unit == 0.0 or before / unit < RESCALE_EPS or after / unit < RESCALE_EPS:
        return None
    import torch

    return float(torch.tensor(before / after, dtype=torch.float32))


# ---- SCE ----------------------------------------------------------------------------------------


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


class SparsifyCache:
    """Per (tensor name, model row) data-only statistics, computed on first use.

    Valid for one set of task vectors: build a new cache (or `clear()`) when the inputs
    change. Draws are also keyed by seed, so one cache serves several seeds.
    """

    def __init__(self) -> None:
        self._store: dict[tuple, object] = {}
        # (tensor, row, mask kind, density, extra, seed) -> rescale factor (float or None)
        self.factors: dict[tuple, float | None] = {}

    def get(self, key: tuple, make):
        """The value stored under key, made by make() on first use."""
        value = self._store.get(key)
        if value is None:
            value = self._store[key] = make()
        return value

    def clear(self) -> None:
        self._store.clear()
        self.factors.clear()

    def nbytes(self) -> int:
        import torch

        tensors = [t for t in self._store.values() if isinstance(t, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)
