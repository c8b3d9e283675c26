"""Runner: what the scoring and generation loops need from a loaded transformers model.

HFBackend is the one implementation. The loops (score, generate, prefill) take a Runner and
never import the backend module, so the backend can import them without an import cycle, and
a test can hand them a stand-in.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from evomerge.eval.hf.prefix import PrefixStore


class Runner(Protocol):
    device: torch.device
    tokenizer: Any
    pad_id: int  # any id: padded positions are masked or come after every scored one
    eos_ids: set[int]  # ids that end a generation
    vocab_size: int
    logits_budget: int  # logit elements one forward pass may return
    early_exit: bool  # a row may stop once it can no longer score (answers hint)
    prefix_store: PrefixStore | None  # KV of earlier rows, reusable while weights are fixed

    def forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        pos: torch.Tensor,
        cache: Any,
        logits_to_keep: int,
    ) -> Any:
        """One forward pass with a KV cache: ids, mask, pos (n, width); the output holds the
        logits of the last `logits_to_keep` positions (0: all) and the updated cache."""
        ...

    def split(self, items: Sequence[tuple[int, int]]) -> Iterator[range]:
        """Consecutive forward-pass batches over items given as (input width, logit positions
        kept)."""
        ...
