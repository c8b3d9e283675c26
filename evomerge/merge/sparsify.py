"""Data-only statistics behind the sparsification masks (TIES, breadcrumbs, DARE, DELLA).

Semantics follow mergekit 0.1.5 (`mergekit/sparsify.py`); the masks themselves are applied
entry by entry in `kernel.py`. What makes the search fast: everything that depends only on
the data is computed once per (tensor, model row) and kept in a `SparsifyCache`:

- magnitude order: the stable ascending order of |delta|, so a TIES/breadcrumbs density is
  a threshold (`radix.magnitude_cut`: two lookups) instead of a new sort per trial; un-cached
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

from evomerge.merge.radix import mag_bits

if TYPE_CHECKING:
    import torch

RESCALE_EPS = 1e-7  # mergekit: below this L1 norm a masked tensor is returned unscaled
L1_BITS = 24  # rescale norms count |delta| in units below 2^-24 of its max (exact sums)
_RANK_BLOCK = 1 << 16  # entries per block of the DELLA rank sort: its int64 keys stay in L2
# (1 << 20 spilled them: 9.7 against 8.5 ns per entry for rows of 3584, one thread)


# ---- magnitude (TIES, breadcrumbs) -------------------------------------------------------------


def magnitude_order(mag: torch.Tensor) -> torch.Tensor:
    """Flat indices of mag = |delta| in a stable ascending sort (int32 when they fit), 1-D."""
    import torch

    order = torch.argsort(mag_bits(mag), stable=True)
    return order.to(torch.int32) if order.numel() < 2**31 else order


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
    stop: int | None = None, out: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """16-bit uniform draws keyed by (seed, tensor name, row): (2, numel) uint8 [hi, lo].

    A PCG64 generator seeded from sha256 of the key makes the draws independent of the order
    in which tensors are processed, of anything drawn before and of the device (they are
    drawn on the CPU): every byte is uniform and independent, so the two planes are two
    uniform bytes per entry. numpy's full-range 64-bit draws cost ~0.75 ns per entry here,
    torch's CPU generator ~5 ns (measured on 2**25 entries). start, stop: entries of a
    chunk; out: a CPU (2, stop - start) uint8 buffer to draw into (a chunk's planes, made
    a piece at a time: a fresh chunk-sized array costs more in page faults than drawing).
    """
    import numpy as np
    import torch

    stop = numel if stop is None else stop
    if out is not None:
        planes = out.numpy()
        _draw_into(planes[0], seed, tensor_name, row, start)
        _draw_into(planes[1], seed, tensor_name, row, numel + start)
        return out
    if start == 0 and stop == numel:
        planes = _draw_bytes(seed, tensor_name, row, 0, 2 * numel).reshape(2, numel)
    else:  # entries start..stop of the hi plane (bytes 0..n) and of the lo plane (n..2n)
        hi = _draw_bytes(seed, tensor_name, row, start, stop)
        lo = _draw_bytes(seed, tensor_name, row, numel + start, numel + stop)
        planes = np.stack([hi, lo])
    return torch.from_numpy(planes).to(device)


def _generator(seed: int, tensor_name: str, row: int, w0: int):
    """The key's generator, advanced past its first w0 words (PCG64.advance, exact)."""
    import numpy as np

    key = f"{seed}:{tensor_name}:{row}".encode()
    bit_gen = np.random.PCG64(int.from_bytes(hashlib.sha256(key).digest(), "little"))
    if w0:
        bit_gen.advance(w0)
    return np.random.Generator(bit_gen)


def _draw_bytes(seed: int, tensor_name: str, row: int, a: int, b: int):
    """Bytes a..b of the key's stream of uniform 64-bit words (little endian)."""
    import numpy as np

    w0 = a // 8
    rng = _generator(seed, tensor_name, row, w0)
    words = rng.integers(0, 2**64, size=(b + 7) // 8 - w0, dtype=np.uint64)
    return words.astype("<u8", copy=False).view(np.uint8)[a - 8 * w0 : b - 8 * w0]


_DRAW_PIECE = 1 << 17  # words drawn at a time into a buffer (1 MiB)


def _draw_into(dst, seed: int, tensor_name: str, row: int, a: int) -> None:
    """dst[:] = bytes a..a + len(dst) of the key's stream (as _draw_bytes), drawn in pieces
    of _DRAW_PIECE words: successive draws of one generator continue its stream."""
    import numpy as np

    b, w0 = a + dst.shape[0], a // 8
    rng, skip, at = _generator(seed, tensor_name, row, w0), a - 8 * w0, 0
    for w in range(w0, (b + 7) // 8, _DRAW_PIECE):
        size = min(_DRAW_PIECE, (b + 7) // 8 - w)
        words = rng.integers(0, 2**64, size=size, dtype=np.uint64)
        got = words.astype("<u8", copy=False).view(np.uint8)[skip : skip + dst.shape[0] - at]
        dst[at : at + got.shape[0]] = got
        at, skip = at + got.shape[0], 0


def della_ranks(
    mag: torch.Tensor, base: torch.Tensor | None = None, packed: bool = True
) -> torch.Tensor:
    """Rank of mag = |delta| within its row (mergekit: along dim 1; 1-D tensors are one row) in
    a stable ascending sort, flat in mag's order: (2, n) uint8 planes, or (1, n) int32 for
    rows longer than 65536 or when not `packed`.

    base: given, `mag` holds a model's values and |delta| = |float32(mag) - float32(base)|
    is made a block at a time (a chunk-sized float32 |delta| would leave the cache between
    its three passes and the sort's). Rows are sorted a block at a time (bounded
    temporaries); see _stable_order.
    """
    import torch

    if base is not None and mag.dim() > 2:  # rows are not slices: make |delta| whole
        mag, base = (mag.to(torch.float32) - base.to(torch.float32)).abs_(), None
    work = mag.reshape(1, -1) if mag.dim() < 2 else mag.movedim(1, -1)
    n_cols = work.shape[-1]
    rows = work.reshape(-1, n_cols)  # (R, n_cols), contiguous copy only for >2-D tensors
    base_rows = None if base is None else base.reshape(rows.shape)
    ranks = torch.empty(rows.shape, dtype=torch.int32, device=mag.device)
    pos = torch.arange(n_cols, dtype=torch.int32, device=mag.device)
    step = max(1, _RANK_BLOCK // n_cols)
    cols = torch.arange(n_cols, dtype=torch.int64, device=mag.device)
    mags = keys = None
    for r0 in range(0, rows.shape[0], step):
        blk = rows[r0 : r0 + step]
        if keys is None or keys.shape != blk.shape:  # reused: a fresh block costs page faults
            keys = torch.empty(blk.shape, dtype=torch.int64, device=mag.device)
            if base_rows is not None:
                mags = torch.empty(blk.shape, dtype=torch.float32, device=mag.device)
        if mags is not None:
            blk = mags.copy_(blk).sub_(base_rows[r0 : r0 + step]).abs_()
        order = _stable_order(blk, cols, keys)
        ranks[r0 : r0 + step].scatter_(1, order, pos.expand(blk.shape[0], -1))
    if mag.dim() > 2:  # back to mag's layout
        ranks = ranks.view(work.shape).movedim(-1, 1).contiguous()
    if n_cols > 1 << 16 or not packed:
        return ranks.reshape(1, -1)
    return to_planes(ranks)


def _stable_order(blk: torch.Tensor, cols: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Per row, the column order of a stable ascending sort of blk (float32 >= 0), int64, in
    `keys` (int64, blk's shape; the CPU's work space).

    On the CPU: keys (bit pattern << 32 | column) are distinct and order like a stable sort,
    so an unstable sort of the keys is enough, and numpy sorts 64-bit integers with SIMD
    sorting networks: 11 ns per entry against torch's stable argsort's 36 (rows of 576, one
    thread, measured here).
    """
    import torch

    if blk.device.type != "cpu":
        return torch.argsort(blk.view(torch.int32), dim=1, stable=True)
    keys.copy_(blk.view(torch.int32)).bitwise_left_shift_(32).bitwise_or_(cols)
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
