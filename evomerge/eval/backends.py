"""Evaluation backends by name: one live model, loaded once, scored on lm-eval requests.

A backend answers the two request kinds lm-eval tasks produce (log-likelihood of a
continuation, greedy generation until a stop string) and lets the search write candidate
weights into the live model without reloading it (the protocol: evomerge.eval.protocol).
`HFBackend` (evomerge.eval.hf.backend) drives a transformers model on CPU or GPU;
`VllmBackend` (evomerge.eval.vllm.backend) pushes weights into a vLLM engine. Both are
imported here only when asked for: they pull in torch (and vllm), and neither imports this
module back.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import ConfigError, did_you_mean

if TYPE_CHECKING:
    from evomerge.eval.protocol import Backend

BACKENDS = ("hf", "vllm")


def load_backend(
    kind: str,
    model_dir: str | Path,
    *,
    device: str | None = None,
    dtype: str | None = None,
    batch_size: int | str = 64,
    **kw: Any,
) -> Backend:
    """Load `model_dir` once into a backend of the given kind ("hf" or "vllm")."""
    if kind == "hf":
        from evomerge.eval.hf.backend import HFBackend

        return HFBackend(model_dir, device=device, dtype=dtype, batch_size=batch_size, **kw)
    if kind == "vllm":
        if batch_size == "auto":  # a space written for hf: vLLM's scheduler batches
            batch_size = None
        try:
            from evomerge.eval.vllm.backend import VllmBackend
        except ModuleNotFoundError as exc:
            if exc.name != "evomerge.eval.vllm.backend":
                raise
            raise ConfigError(
                "backend 'vllm' is not available in this installation: use --backend hf"
            ) from None
        return VllmBackend(model_dir, device=device, dtype=dtype, batch_size=batch_size, **kw)
    raise ConfigError(did_you_mean(kind, BACKENDS, "backend"))
