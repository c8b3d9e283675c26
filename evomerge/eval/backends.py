"""Evaluation backends: one live model, loaded once, scored on lm-eval requests.

A backend answers the two request kinds lm-eval tasks produce (log-likelihood of a
continuation, greedy generation until a stop string) and lets the search write candidate
weights into the live model without reloading it. `HFBackend` drives a transformers model
(CPU or GPU); `VllmBackend` (evomerge.eval.vllm_backend) pushes weights into a vLLM engine.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from evomerge.errors import ConfigError, did_you_mean

if TYPE_CHECKING:
    import torch

    from evomerge.eval.early_exit import ExactAnswers

BACKENDS = ("hf", "vllm")


@dataclass(frozen=True)
class GenerationSpec:
    """How to generate for one request: greedy until a stop string or max_gen_toks tokens.

    `until` holds the task's stop strings; backends add the model's end-of-sequence token.
    `extra` keeps any other generation kwargs of the task (sorted pairs, so specs hash).
    """

    until: tuple[str, ...] = ()
    max_gen_toks: int = 256
    do_sample: bool = False
    temperature: float = 0.0
    extra: tuple[tuple[str, Any], ...] = ()


@runtime_checkable
class Backend(Protocol):
    """What the evaluator needs from a live model.

    Optional, looked up by name (HFBackend has both): `pack_live(order)` lays the parameters
    out consecutively in that tensor order, so in-place merges write runs of tensors at once;
    `reusing_prefixes()` is a context manager the Evaluator holds open for one evaluation,
    within which the weights do not change (HFBackend reuses prompt KV there).
    """

    def live_tensors(self) -> dict[str, torch.Tensor] | None:
        """Writable parameters keyed by checkpoint tensor names (tied weights appear once),
        or None when weights must be pushed with `load_weights`."""
        ...

    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy (name, tensor) pairs into the live model and drop any state computed from
        the old weights."""
        ...

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """(context, continuation) -> (sum of continuation log-probs, continuation is greedy)."""
        ...

    def generate(
        self,
        requests: Sequence[tuple[str, GenerationSpec]],
        answers: Sequence[ExactAnswers | None] | None = None,
    ) -> list[str]:
        """(context, spec) -> generated text, cut before the first stop string.

        `answers` (one per request, or None) is a hint: a request's only final texts that
        score. A backend may stop a generation once `answers[i].could_match(text so far)` is
        False and return the text so far (its score is 0 either way), or ignore the hint."""
        ...


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
        from evomerge.eval.hf_backend import HFBackend

        return HFBackend(model_dir, device=device, dtype=dtype, batch_size=batch_size, **kw)
    if kind == "vllm":
        if batch_size == "auto":
            raise ConfigError("batch size 'auto' is for the hf backend; give vllm an integer")
        try:
            from evomerge.eval.vllm_backend import VllmBackend
        except ModuleNotFoundError as exc:
            if exc.name != "evomerge.eval.vllm_backend":
                raise
            raise ConfigError(
                "backend 'vllm' is not available in this installation: use --backend hf"
            ) from None
        return VllmBackend(model_dir, device=device, dtype=dtype, batch_size=batch_size, **kw)
    raise ConfigError(did_you_mean(kind, BACKENDS, "backend"))


def __getattr__(name: str) -> Any:
    # HFBackend lives in its own module (it imports torch); keep `backends.HFBackend` working.
    if name == "HFBackend":
        from evomerge.eval.hf_backend import HFBackend

        return HFBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
