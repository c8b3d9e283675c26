"""Exact streaming selection of a sorted position of |delta| (TIES / breadcrumbs magnitude
cuts, sce's variance cut) by a radix selection over float bits: no sort, a few passes over
consecutive chunks, integer counts only (so the answer does not depend on the chunking)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def mag_bits(mag: torch.Tensor) -> torch.Tensor:
    """Magnitudes as int32 bit patterns: for non-negative floats, integer order = value order
    (and integer keys sort faster than floats)."""
    import torch

    return mag.reshape(-1).view(torch.int32)


def magnitude_cut(mag: torch.Tensor, p: int) -> tuple[float, int]:
    """(thr, first): the entries at sorted positions >= p (stable ascending mag = |delta|)
    are exactly those with mag > thr, or mag == thr at flat index >= first.

    p == n keeps nothing: (inf, n). A radix selection on the float bits: a histogram of
    the high 16 bits finds the bucket of position p, one of the low 16 bits (over that
    bucket only) the value. O(n), no sort; with a cached `magnitude_order` the same answer
    is (mag[order[p]], order[p]). `magnitude_cuts` gives the same answer over chunks.
    """
    return magnitude_cuts(lambda: iter([(mag.reshape(-1),)]), [(0, p)])[0]


def magnitude_cuts(chunks, positions) -> list[tuple[float, int]]:
    """magnitude_cut for several (stream, position) requests over tensors given as
    consecutive flat chunks: chunks() yields, on each call (one per pass, at most three),
    a tuple with the next chunk of |delta| of every stream. positions: the requests, or a
    function of the entry count giving them after the first pass (a position that depends
    on a count the caller takes during that pass, as sce's nonzero count).

    The histograms are integer counts, so the answer does not depend on how the tensors
    are cut: bit-identical to magnitude_cut on each whole tensor. Chunks are taken in
    blocks of BLOCK entries, so the temporaries stay in cache (a fresh temporary the size
    of a disk chunk costs more in page faults than its arithmetic). A bucket asked for that
    holds at most _COLLECT entries has its entries' (low bits, flat index) kept in pass 2,
    so the third pass runs only for larger buckets (e.g. the exact zeros of sparse deltas).
    """
    import torch

    n, hist, zero = 0, None, None
    for cs in chunks():  # pass 1: high 16 bits, per stream
        n += cs[0].numel()
        h = torch.stack([_high_hist(c) for c in cs])
        hist = h if hist is None else hist + h
        # all-zero streams (a tensor a model left as is) need no pass 2: checked only while a
        # stream's entries all fall in the lowest bucket (exact zeros and denormals)
        z = [bool(zero is None or zero[k]) and int(h[k, 0]) == c.numel() for k, c in enumerate(cs)]
        zero = [zk and not bool(mag_bits(c).any()) for zk, c in zip(z, cs, strict=True)]
    if callable(positions):
        positions = positions(n)
    out: list[tuple[float, int]] = [(float("inf"), n)] * len(positions)
    todo = [i for i, (_, p) in enumerate(positions) if p < n]
    if not todo or hist is None:
        return out
    cum = hist.cumsum(1)
    where = {i: (positions[i][0], *_locate(cum[positions[i][0]], positions[i][1])) for i in todo}
    buckets = sorted({(s, b) for s, b, _ in where.values()})
    low = {sb: torch.zeros(1 << 16, dtype=torch.int64) for sb in buckets}
    for s, b in buckets:
        if zero is not None and zero[s]:
            low[s, b][0] = n
    scan = [sb for sb in buckets if zero is None or not zero[sb[0]]]
    kept: dict[tuple[int, int], list] = {sb: [] for sb in scan if int(hist[sb]) <= _COLLECT}
    dense = {sb: int(hist[sb]) * 16 > n for sb in scan}  # a large share of all entries
    a = 0
    for cs in chunks() if scan else ():  # pass 2: low 16 bits inside the buckets asked for
        for s, b in scan:
            for o, blk in _blocks(cs[s]):
                if (s, b) in kept:
                    kept[s, b].append(_bucket_entries(blk, b, a + o, n))
                else:
                    low[s, b] += _low_hist(mag_bits(blk), b, dense[s, b])
        a += cs[0].numel()
    found = {sb: _gather(v) for sb, v in kept.items()}
    for sb, (vals, _) in found.items():
        low[sb] = torch.bincount(vals, minlength=1 << 16)
    value, rank = {}, {}
    for i in todo:
        s, b, r = where[i]
        v, r = _locate(low[s, b].cumsum(0), r)
        value[i], rank[i] = (b << 16) | v, r  # the rank-th entry (flat order) equal to value
        if (s, b) in found:  # collected in flat order: its index is at hand
            vals, idx = found[s, b]
            out[i] = (_float_of(value[i]), int(idx[_nth_true(vals == v, r)]))
        elif int(low[s, b][v]) == n:  # every entry equals it (a tensor a model left as is)
            out[i] = (_float_of(value[i]), r)
    seen, a = {i: 0 for i in todo if out[i][1] == n}, 0  # those pass 3 still has to place
    if not seen:
        return out
    for cs in chunks():  # pass 3: the flat index of that entry
        for i in [i for i in seen if seen[i] >= 0]:
            eq = mag_bits(cs[where[i][0]]) == value[i]
            hits = int(torch.count_nonzero(eq))  # indices only in the chunk that holds it
            if seen[i] + hits > rank[i]:
                out[i], seen[i] = (_float_of(value[i]), a + _nth_true(eq, rank[i] - seen[i])), -1
            else:
                seen[i] += hits
        a += cs[0].numel()
        if all(v < 0 for v in seen.values()):
            break
    return out


BLOCK = 1 << 18  # entries per block of the histogram passes (a few hundred KB of temporaries)
_COLLECT = 1 << 22  # a target bucket this small is collected in pass 2 (8 bytes per entry)
_LITTLE = sys.byteorder == "little"


def _blocks(c: torch.Tensor):
    """(offset, block) over a flat tensor, BLOCK entries at a time."""
    for o in range(0, c.numel(), BLOCK):
        yield o, c[o : o + BLOCK]


def _high16(blk: torch.Tensor) -> torch.Tensor:
    """The high 16 bits of the float32 bits of blk (>= 0, so they fit int16 unsigned-free):
    int16 read straight from the upper halves on little-endian machines (no int32 shift)."""
    import torch

    if _LITTLE:
        return blk.contiguous().view(torch.int16)[1::2]
    return (mag_bits(blk) >> 16).to(torch.int16)


def _high_hist(c: torch.Tensor) -> torch.Tensor:
    """Histogram (1 << 15 bins, int64) of the high 16 bits of a flat |delta| chunk."""
    import torch

    h = torch.zeros(1 << 15, dtype=torch.int64, device=c.device)
    for _, blk in _blocks(c):
        h += torch.bincount(_high16(blk).contiguous(), minlength=1 << 15)
    return h.cpu()  # the cut's bookkeeping is on the CPU whatever the chunks' device


def _bucket_entries(blk: torch.Tensor, b: int, a: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(low 16 bits, flat index) of blk's entries whose high bits are b; blk starts at a,
    the tensor has n entries (indices are int32 when they fit)."""
    # on the CPU through numpy: its flatnonzero is several times faster than torch.nonzero
    # on a sparse mask (0.2 against 1 ns per entry, measured here)
    import torch

    bits = mag_bits(blk)
    if bits.device.type != "cpu":
        at = torch.nonzero((bits >> 16) == b).view(-1)
        return (bits[at] & 0xFFFF).cpu(), at.add_(a).cpu()
    import numpy as np

    v = bits.numpy()
    at = np.flatnonzero((v >= b << 16) & (v < (b + 1) << 16))
    idx = (at + a).astype(np.int32 if n < 2**31 else np.int64)
    return torch.from_numpy(v[at] & 0xFFFF), torch.from_numpy(idx)


def _gather(parts: list) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    if not parts:
        return torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.int64)
    return torch.cat([v for v, _ in parts]), torch.cat([i for _, i in parts])


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
    cum = counts.cumsum(0).cpu()
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
