"""A cheap fingerprint of a tensor's values, to check a weight transfer end to end.

The sender fingerprints each merged tensor as it hands it over; the vLLM worker fingerprints
what it actually read. A transfer that reused a buffer too early (every tensor aliasing the
last one), dropped or reordered tensors shows up as a mismatch. It samples at most SAMPLES
entries on a fixed stride (plus the first and last), so it costs microseconds per tensor.
"""

from __future__ import annotations

import torch

SAMPLES = 1024


def fingerprint(t: torch.Tensor) -> float:
    """A float64 sum of strided samples of `t` weighted by position, and its size."""
    flat = t.detach().reshape(-1)
    n = flat.numel()
    if n == 0:
        return 0.0
    step = max(1, n // SAMPLES)
    idx = torch.arange(0, n, step, device=flat.device)
    idx = torch.cat([idx, idx.new_tensor([n - 1])])
    vals = flat[idx].to(torch.float64)
    weights = torch.arange(1, idx.numel() + 1, device=flat.device, dtype=torch.float64)
    return float((vals * weights).sum().item()) + n
