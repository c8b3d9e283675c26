"""Prefix reuse across the forward passes of one evaluation: what vLLM's automatic prefix
caching does, for HFBackend.

Within one candidate's evaluation the weights are fixed, so the KV of a token sequence is
the same whichever request computed it. Every row a prefill runs is kept (its keys and
values at its own positions) under its token ids, in a trie; a later row looks up the
longest stored sequence that shares its beginning and runs only the rest. This reaches
what a batch's shared prefix (prefill.prefill) does not: fixed few-shot examples that
every batch and every fidelity chunk would run again, and the same questions asked by a
multiple-choice and a generative task (the log-likelihood requests run first, then the
generations find their prompts stored).

The store lives for one `HFBackend.reusing_prefixes()` block (the Evaluator opens one per
evaluation) and is dropped when it ends or weights are loaded; it stops taking rows at its
byte budget. Only plain KV caches (every layer a transformers DynamicLayer: no sliding
window, no recurrent state) are stored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class PrefixStore:
    """Rows' KV by token ids: a token trie whose nodes point into stored rows."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.nbytes = 0
        self._next: dict[tuple[int, int], int] = {}  # (node, token) -> child node; root 0
        self._at: list[int] = [-1]  # node -> the first stored row through it; the root: none
        self._rows: list[tuple[int, int]] = []  # row -> (pass, offset of its first position)
        self._passes: list[tuple[tuple[torch.Tensor, torch.Tensor], ...]] = []  # per layer
        self.enabled = True

    def match(self, seq: Sequence[int], limit: int) -> tuple[int, int]:
        """(stored row, length) of the longest stored beginning of seq, at most limit tokens
        ((-1, 0): none)."""
        node, depth = 0, 0
        nxt, limit = self._next, min(limit, len(seq))
        while depth < limit:
            child = nxt.get((node, seq[depth]))
            if child is None:
                break
            node, depth = child, depth + 1
        return self._at[node], depth

    def add(self, seqs: Sequence[Sequence[int]], kv: tuple) -> None:
        """Store rows: kv holds per layer (keys, values), each  # (total, heads, dim): the
        rows' positions one row after the other, in the order of seqs."""
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
        if not self.enabled or self.nbytes + size > self.budget:
            return
        self.nbytes += size
        self._passes.append(kv)
        nxt, at, a = self._next, self._at, 0
        for seq in seqs:
            row = len(self._rows)
            self._rows.append((len(self._passes) - 1, a))
            a += len(seq)
            node = 0
            for token in seq:
                child = nxt.get((node, token))
                if child is None:
                    child = nxt[(node, token)] = len(at)
                    at.append(row)
                node = child

    def add_batch(self, seqs: Sequence[Sequence[int]], cache: Any, mask: torch.Tensor) -> None:
        """Store every row of a prefill: row r's positions are where mask[r] is 1, in order."""
        from transformers.cache_utils import DynamicLayer

        layers = getattr(cache, "layers", None)
        if not layers or any(type(x) is not DynamicLayer for x in layers):
            self.enabled = False  # sliding windows, recurrent states: not a plain KV
        if not self.enabled:
            return
        valid = mask.bool()  # (n, length)
        self.add(  # (n, h, length, d) -> every row's valid positions  # (total, h, d)
            seqs,
            tuple(
                (layer.keys.transpose(1, 2)[valid], layer.values.transpose(1, 2)[valid])
                for layer in layers
            ),
        )

    def cache_for(self, hits: Sequence[tuple[int, int]], device) -> tuple[Any, torch.Tensor]:
        """A DynamicCache holding each row's matched beginning, left-padded to the longest,
        and its attention mask (n, longest): hits are (stored row, length) per row."""
        from transformers import DynamicCache

        n, width = len(hits), max(length for _, length in hits)
        mask = torch.zeros((n, width), dtype=torch.long)
        slots, pieces = [], []  # flat (row, position) slots and where their KV is stored
        for r, (row, length) in enumerate(hits):
            if length:
                mask[r, width - length :] = 1
                slots.append(torch.arange(r * width + width - length, (r + 1) * width))
                pieces.append((*self._rows[row], length))
        index = torch.cat(slots).to(device)
        data = []
        for layer in range(len(self._passes[0])):
            pair = []
            for kind in (0, 1):
                src = torch.cat([self._passes[p][layer][kind][a : a + m] for p, a, m in pieces])
                _, h, d = src.shape
                flat = src.new_zeros((n * width, h, d))
                flat.index_copy_(0, index, src.to(device))
                pair.append(flat.view(n, width, h, d).transpose(1, 2))  # (n, h, width, d)
            data.append(tuple(pair))
        return DynamicCache(ddp_cache_data=data), mask.to(device)
