"""What the evaluator and a live model agree on: the Backend protocol and the request types.

Shared by the evaluator, the task layer and every backend (evomerge.eval.hf, evomerge.eval.vllm);
it imports none of them, so a backend can use these types without an import cycle.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from evomerge.eval.early_exit import ExactAnswers


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
        the old weights. A tensor may be a buffer the producer reuses for the next pair, so
        each must be consumed (copied) before the next is drawn: never collect the pairs."""
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
