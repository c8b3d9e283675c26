"""Reusable tensors: allocating a fresh tensor per merged tensor is slow (page faults on every
first touch), so disk merges and in-place candidates keep one buffer per job and shape
(Buffers), or one flat buffer per role shared by every shape (Arena: row chunks)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class Buffers:
    """Buffers keyed by (role, shape, dtype, device), made on first request and then reused.

    A tensor returned here stays valid only until the next request for the same key: a result
    that lives in one must be consumed first. Two jobs that may hold results at the same time
    (e.g. the reader's inputs and a method's intermediates) use two instances or two roles.
    """

    def __init__(self, device: Any = None) -> None:
        self.device = device  # the default device of get()
        self._bufs: dict[tuple, torch.Tensor] = {}

    def get(self, role: str, shape: tuple[int, ...], dtype: Any = None, device: Any = None):
        """An uninitialized tensor of `shape` (dtype default float32) for `role`."""
        import torch

        dtype = dtype or torch.float32
        device = self.device if device is None else device
        key = (role, tuple(shape), dtype, device)
        buf = self._bufs.get(key)
        if buf is None:
            buf = self._bufs[key] = torch.empty(shape, dtype=dtype, device=device)
        return buf


class Arena:
    """Reused flat buffers, one per (role, dtype), grown to the largest request: chunks of
    every tensor shape share them (Buffers would keep one per shape); on `device` (the
    CPU for disk merges, the compute device for in-place candidates)."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self._flat: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        self.device = device

    def get(self, role: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        import torch

        n = math.prod(shape)
        buf = self._flat.get((role, dtype))
        if buf is None or buf.numel() < n:
            buf = self._flat[role, dtype] = torch.empty(n, dtype=dtype, device=self.device)
        return buf[:n].view(shape)
