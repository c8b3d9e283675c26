"""Greedy generation for HFBackend: a KV-cache loop that drops rows as they finish.

Equivalent to lm-eval's HFLM.generate_until with greedy decoding: left-padded prompts,
positions counted from the first real token, a row ends at an end-of-sequence id, at
max_gen_toks tokens, or once its text holds a stop string; the text is cut before the first
stop string. transformers' generate() would keep finished rows in the batch until every row
is done; here they leave the batch, so one long answer does not make the others pay.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from evomerge.errors import CandidateError

if TYPE_CHECKING:
    from evomerge.eval.backends import GenerationSpec
    from evomerge.eval.hf_backend import HFBackend


def cut_at_stops(text: str, stops: list[str]) -> str:
    """Text before the first occurrence of any stop string (lm-eval's postprocessing)."""
    for stop in stops:
        if stop:
            text = text.split(stop)[0]
    return text


def greedy_generate(
    backend: HFBackend, prompts: list[list[int]], spec: GenerationSpec
) -> list[str]:
    """Generate greedily for a batch of token-id prompts; return the cut texts."""
    tok, device = backend.tokenizer, backend.device
    stops = [s for s in spec.until if s]
    n, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((n, width), backend.pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[r, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (n, width): left padding must not shift positions
    out = _step(backend, ids, mask, pos, None)
    last_pos = pos[:, -1]  # (n,)

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
        cache = out.past_key_values
        if len(still) < len(active):  # finished rows leave the batch (and the KV cache)
            keep = torch.tensor(still, device=device)
            cache.batch_select_indices(keep)
            mask, nxt, last_pos = mask[keep], nxt[keep], last_pos[keep]
            active = [active[j] for j in still]
        mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
        last_pos = last_pos + 1
        out = _step(backend, nxt[:, None], mask, last_pos[:, None], cache)
    return [cut_at_stops(tok.decode(g, skip_special_tokens=True), stops) for g in generated]


def _has_stop(text: str, stops: list[str]) -> bool:
    return any(s in text for s in stops)


def _step(backend: HFBackend, ids, mask, pos, cache) -> Any:
    try:
        return backend.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
            **({"logits_to_keep": 1} if backend.logits_to_keep_ok else {}),
        )
    except torch.OutOfMemoryError as exc:
        raise CandidateError(f"out of memory generating for a batch of {tuple(ids.shape)}") from exc
