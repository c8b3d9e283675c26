"""The prefill that scoring and generation start with: a batch of token sequences run once,
with whatever KV they can reuse instead of running it again.

What runs before each row's own tokens is either the beginnings of rows stored earlier in
this evaluation (prefix.PrefixStore, inside `HFBackend.reusing_prefixes()`), or else a
prefix that every sequence of the batch shares (an instruction, fixed few-shot examples, the
start of a question template), run once and repeated for the rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from evomerge.eval.hf.runner import Runner

_MIN_SHARED = 4  # shorter shared prefixes are not worth a forward pass of their own


def kv_cache(output: Any) -> Any:
    """The KV cache of a forward pass's output (`cache` since transformers 5.24)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int):
    """(ids, attention mask, position ids), each (n, width): left padding, positions counted
    from each row's first real token, so a padded row computes what it would alone."""
    n, width = len(seqs), max(len(s) for s in seqs)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[r, width - len(s) :] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def prefill(backend: Runner, seqs: Sequence[Sequence[int]], keep: int = 1) -> tuple[Any, Any, Any]:
    """Run a batch of sequences: (output with the last `keep` positions' logits and the KV
    cache, attention mask (n, cached length), position of each row's last token (n,)).

    What runs before each row's own tokens, whose KV is reused, is either the beginnings of
    the rows stored earlier in this evaluation (prefix.PrefixStore, inside
    `backend.reusing_prefixes()`), or else a prefix that every sequence shares (an
    instruction, fixed few-shot examples, the start of a question template), run once and
    repeated for the rows. Each row's own tokens follow, left-padded, so the layout is
    [reused | padding | own] (reused rows are left-padded too). The reused part stops `keep`
    tokens before each sequence ends, so every kept position is a row's own token.
    """
    device, n = backend.device, len(seqs)
    shared = min(common_prefix_len(seqs), min(len(s) for s in seqs) - keep)
    shared = shared if n > 1 and shared >= _MIN_SHARED else 0
    store = backend.prefix_store
    hits = [store.match(s, len(s) - keep) for s in seqs] if store is not None else []
    own = max(len(s) - h for s, (_, h) in zip(seqs, hits, strict=True)) if hits else 0
    if hits and own < max(len(s) for s in seqs) - shared:  # less to run than after `shared`
        cache, before = store.cache_for(hits, device)  # type: ignore[union-attr]
        reused = [length for _, length in hits]
    elif shared:
        head = torch.tensor([list(seqs[0][:shared])], device=device)  # (1, shared)
        ones = torch.ones((1, shared), dtype=torch.long, device=device)
        cache = kv_cache(backend.forward(head, ones, ones.cumsum(-1) - 1, None, 1))
        cache.batch_repeat_interleave(n)
        before, reused = ones.expand(n, shared), [shared] * n
    else:
        cache, before, reused = None, torch.ones((n, 0), dtype=torch.long), [0] * n
    ids, mask, pos = left_pad([s[k:] for s, k in zip(seqs, reused, strict=True)], backend.pad_id)
    pos = pos + torch.tensor(reused)[:, None]  # each row's own tokens follow what it reuses
    mask = torch.cat([before.to(device), mask.to(device)], 1)
    out = backend.forward(ids.to(device), mask, pos.to(device), cache, keep)
    if store is not None:
        store.add_batch(seqs, kv_cache(out), mask)
    return out, mask, pos[:, -1].to(device)


def common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    first, n = seqs[0], min(len(s) for s in seqs)
    for k in range(n):
        if any(s[k] != first[k] for s in seqs):
            return k
    return n


def own_positions(logits: torch.Tensor, lens: Sequence[int]) -> torch.Tensor:
    """(n, width) bool: row r's last lens[r] + 1 kept positions (logits (n, width, vocab)).
    Rows are right-aligned, so a shorter row's first kept positions are padding."""
    width = logits.shape[1]
    start = width - 1 - torch.tensor(list(lens), device=logits.device)  # (n,)
    return torch.arange(width, device=logits.device) >= start[:, None]
