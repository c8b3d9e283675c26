"""Where tensors go by default, and torch's thread count set for one block."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


def default_device() -> str:
    """'cuda' when a CUDA device is visible, else 'cpu' (what every command defaults to)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[int]:
    """torch's intra-op thread count set to n for the block; yields the previous count."""
    import torch

    before = torch.get_num_threads()
    if before != n:
        torch.set_num_threads(n)
    try:
        yield before
    finally:
        if before != n:
            torch.set_num_threads(before)
