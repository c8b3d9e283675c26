"""Log-likelihood scoring for HFBackend (any Runner): each context runs once, and so does
what its continuations share.

lm-eval runs context + continuation once per request, so the choices of a multiple-choice
question run their shared context once per choice. Here a batch of distinct contexts runs
once, each followed by its stem: the leading tokens that every continuation of that context
feeds (" " before " 13", " 11", " 14"; a shared "The answer is"). Its logits are kept at the
context's last position and at the stem. Then each distinct tail (what a continuation feeds
after the stem) runs once on a copy of its context's KV cache; a tail that is a prefix of
another reads that one's positions. Causal attention makes every scored position see
exactly the tokens it sees in lm-eval's one-sequence-per-request run.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from evomerge.errors import CandidateError
from evomerge.eval.hf.prefill import common_prefix_len, kv_cache, own_positions, prefill

if TYPE_CHECKING:
    from evomerge.eval.hf.runner import Runner

Request = tuple[int, list[int]]  # (request index, continuation ids)
Score = tuple[float, bool]  # (sum of the continuation's log-probs, every token is the argmax)


@dataclass
class _Plan:
    """What one context's continuations need: the stem fed after the context, the distinct
    tails fed after the stem (none a prefix of another), and for each request the tail it
    reads (None when the stem's logits hold all of it)."""

    stem: list[int]
    tails: list[tuple[int, ...]]
    uses: list[tuple[int, list[int], int | None]]  # (request index, cont ids, tail index)


def plan(requests: Sequence[Request]) -> _Plan:
    """The plan of one context's requests (each continuation at least one token)."""
    fed = [cont[:-1] for _, cont in requests]  # a continuation's last token is only scored
    stem = fed[0][: common_prefix_len(fed)]
    rests = {tuple(f[len(stem) :]) for f in fed} - {()}
    tails: list[tuple[int, ...]] = []
    for rest in sorted(rests, key=lambda t: (-len(t), t)):
        if not any(t[: len(rest)] == rest for t in tails):
            tails.append(rest)
    uses = []
    for i, cont in requests:
        rest = tuple(cont[len(stem) : -1])
        k = next(j for j, t in enumerate(tails) if t[: len(rest)] == rest) if rest else None
        uses.append((i, cont, k))
    return _Plan(stem, tails, uses)


def score_contexts(
    backend: Runner, contexts: Sequence[Sequence[int]], plans: Sequence[_Plan]
) -> list[tuple[int, Score]]:
    """(request index, score) for a batch of distinct contexts and their plans."""
    stems = [p.stem for p in plans]
    seqs = [[*c, *s] for c, s in zip(contexts, stems, strict=True)]
    res, mask, last_pos = prefill(backend, seqs, 1 + max(len(s) for s in stems))
    uses = [(r, i, cont, k) for r, p in enumerate(plans) for i, cont, k in p.uses]
    scores = _Scores([cont for _, _, cont, _ in uses])
    # the context's last position and the stem predict a continuation's first tokens
    keep, picks = res.logits.shape[1], []
    for q, (r, _, cont, _) in enumerate(uses):
        first = keep - 1 - len(stems[r])  # rows are right-aligned
        picks += [(q, j, r, first + j, cont[j]) for j in range(min(len(cont), keep - first))]
    scores.take(_log_softmax_own(res.logits, [len(s) for s in stems]), picks)
    # then each tail's positions predict the rest of the continuations that read it
    readers: dict[tuple[int, int], list[int]] = defaultdict(list)
    for q, (r, _, _, k) in enumerate(uses):
        if k is not None:
            readers[(r, k)].append(q)
    rows = list(readers)
    for chunk in backend.split([(len(plans[r].tails[k]),) * 2 for r, k in rows]):
        picked = [rows[j] for j in chunk]
        lp = _run_tails(backend, res, mask, last_pos, [(r, plans[r].tails[k]) for r, k in picked])
        picks = []
        for m, (r, k) in enumerate(picked):
            for q in readers[(r, k)]:
                cont, done = uses[q][2], 1 + len(stems[r])
                picks += [(q, j, m, j - done, cont[j]) for j in range(done, len(cont))]
        scores.take(lp, picks)
    return list(zip([i for _, i, _, _ in uses], scores.result(), strict=True))


class _Scores:
    """Each request's per-token log-probs and argmax checks, gathered from the forward
    passes' log-probs with one indexing op per pass, summed at the end."""

    def __init__(self, conts: Sequence[Sequence[int]]) -> None:
        width = max(len(c) for c in conts)
        self.logp = torch.zeros((len(conts), width))  # (n_requests, longest continuation)
        self.greedy = torch.ones((len(conts), width), dtype=torch.bool)

    def take(self, lp: torch.Tensor, picks: list[tuple[int, int, int, int, int]]) -> None:
        """Read (request, token index, row, position, token id) picks from lp (n, width, vocab)."""
        if not picks:
            return
        q, j, row, pos, tok = torch.tensor(picks).T  # (5, n_picks) -> five (n_picks,)
        at = (row.to(lp.device), pos.to(lp.device))
        self.logp[q, j] = lp[(*at, tok.to(lp.device))].cpu()
        self.greedy[q, j] = lp.argmax(-1)[at].cpu() == tok

    def result(self) -> list[Score]:
        """(sum of the continuation's log-probs, every token is the argmax): lm-eval's pair."""
        return list(zip(self.logp.sum(-1).tolist(), self.greedy.all(-1).tolist(), strict=True))


def _run_tails(
    backend: Runner, res: Any, mask: torch.Tensor, last_pos: torch.Tensor, chunk
) -> torch.Tensor:
    """Log-probs (n, longest tail, vocab) of (context row, tail) pairs, run on a copy of the
    contexts' KV cache (several tails may start from one context)."""
    device = backend.device
    rows = torch.tensor([r for r, _ in chunk], device=device)
    width = max(len(t) for _, t in chunk)
    ids = torch.full((len(chunk), width), backend.pad_id, dtype=torch.long)
    for k, (_, tail) in enumerate(chunk):
        ids[k, : len(tail)] = torch.tensor(tail, dtype=torch.long)
    # right padding: a padded position comes after every scored one (causal)
    tail_mask = torch.cat([mask[rows], mask.new_ones((len(chunk), width))], 1)
    pos = last_pos[rows, None] + 1 + torch.arange(width, device=device)
    cache = _select_cache(kv_cache(res), rows)
    logits = backend.forward(ids.to(device), tail_mask, pos, cache, 0).logits  # (n, width, vocab)
    lp = torch.log_softmax(logits.float(), dim=-1)
    if not torch.isfinite(lp).all():
        raise CandidateError("the model produced NaN/inf logits")
    return lp


def _log_softmax_own(logits: torch.Tensor, lens: list[int]) -> torch.Tensor:
    """Log-probs (n, width, vocab), checked at row r's last lens[r] + 1 positions (rows are
    right-aligned, so a shorter row's first kept positions are padding, which may hold
    anything)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    if not torch.isfinite(lp[own_positions(logits, lens)]).all():
        raise CandidateError("the model produced NaN/inf logits")
    return lp


def _select_cache(cache: Any, rows: torch.Tensor) -> Any:
    """A copy of a KV cache holding the given batch rows (repeats allowed); the original
    is left as it is, so several continuation chunks can start from it."""
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    new.batch_select_indices(rows)  # each layer indexes into new tensors
    return new
