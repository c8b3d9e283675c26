"""Greedy generation for HFBackend: a KV-cache loop that drops rows as they finish.

Equivalent to lm-eval's HFLM.generate_until with greedy decoding: left-padded prompts,
positions counted from the first real token, a row ends at an end-of-sequence id, at
max_gen_toks tokens, or once its text holds a stop string; the text is cut before the first
stop string. transformers' generate() would keep finished rows in the batch until every row
is done; here they leave the batch, so one long answer does not make the others pay.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from evomerge.errors import CandidateError

if TYPE_CHECKING:
    from evomerge.eval.backends import GenerationSpec
    from evomerge.eval.hf_backend import HFBackend


_MIN_SHARED = 4  # shorter shared prefixes are not worth a forward pass of their own


def kv_cache(output: Any) -> Any:
    """The KV cache of a forward pass's output (`cache` since transformers 5.24)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def cut_at_stops(text: str, stops: list[str]) -> str:
    """Text before the first occurrence of any stop string (lm-eval's postprocessing)."""
    for stop in stops:
        if stop:
            text = text.split(stop)[0]
    return text


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


def prefill(backend: HFBackend, seqs: Sequence[Sequence[int]]) -> tuple[Any, Any, Any]:
    """Run a batch of prompts: (output with the last position's logits and the KV cache,
    attention mask (n, cached length), position of each row's last token (n,)).

    A prefix that every prompt shares (an instruction, fixed few-shot examples, the start of
    a question template) runs once and its cache is repeated for the rows; each row's own
    tokens follow it, left-padded, so the layout is [shared | padding | own].
    """
    device, n = backend.device, len(seqs)
    shared = min(_common_prefix_len(seqs), min(len(s) for s in seqs) - 1)
    cache = None
    if n > 1 and shared >= _MIN_SHARED:
        head = torch.tensor([list(seqs[0][:shared])], device=device)  # (1, shared)
        ones = torch.ones((1, shared), dtype=torch.long, device=device)
        cache = kv_cache(backend._run(head, ones, ones.cumsum(-1) - 1, None, 1))
        cache.batch_repeat_interleave(n)
        seqs = [s[shared:] for s in seqs]
    else:
        shared = 0
    ids, mask, pos = left_pad(seqs, backend.pad_id)  # (n, width) each
    mask = torch.cat([mask.new_ones((n, shared)), mask], 1).to(device)
    out = backend._run(ids.to(device), mask, (pos + shared).to(device), cache, 1)
    return out, mask, pos[:, -1].to(device) + shared


def _common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    first, n = seqs[0], min(len(s) for s in seqs)
    for k in range(n):
        if any(s[k] != first[k] for s in seqs):
            return k
    return n


def greedy_generate(
    backend: HFBackend, prompts: list[list[int]], spec: GenerationSpec
) -> list[str]:
    """Generate greedily for a batch of token-id prompts; return the cut texts."""
    tok, device = backend.tokenizer, backend.device
    stops = [s for s in spec.until if s]
    out, mask, last_pos = prefill(backend, prompts)

    n = len(prompts)
    active = list(range(n))  # batch row -> prompt index
    generated: list[list[int]] = [[] for _ in range(n)]
    for step in range(spec.max_gen_toks):
        logits = out.logits[:, -1, :]  # (n_active, vocab)
        if not torch.isfinite(logits).all():
            raise CandidateError("the model produced NaN/inf logits")
        nxt = logits.argmax(-1)  # (n_active,)
        still = []
        for j, (r, t) in enumerate(zip(active, nxt.tolist(), strict=True)):
            if t in backend.eos_ids:
                continue
            generated[r].append(t)
            if stops and _has_stop(tok.decode(generated[r], skip_special_tokens=True), stops):
                continue
            still.append(j)
        if not still or step == spec.max_gen_toks - 1:
            break
        cache = kv_cache(out)
        if len(still) < len(active):  # finished rows leave the batch (and the KV cache)
            keep = torch.tensor(still, device=device)
            cache.batch_select_indices(keep)
            mask, nxt, last_pos = mask[keep], nxt[keep], last_pos[keep]
            active = [active[j] for j in still]
        mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
        last_pos = last_pos + 1
        out = backend._run(nxt[:, None], mask, last_pos[:, None], cache, 1)
    return [cut_at_stops(tok.decode(g, skip_special_tokens=True), stops) for g in generated]


def _has_stop(text: str, stops: list[str]) -> bool:
    return any(s in text for s in stops)
