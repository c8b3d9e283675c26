"""Greedy generation for HFBackend: a KV-cache loop that drops rows as they finish, verifying
a draft of each answer first when one is known.

Equivalent to lm-eval's HFLM.generate_until with greedy decoding: left-padded prompts,
positions counted from the first real token, a row ends at an end-of-sequence id, at
max_gen_toks tokens, or once its text holds a stop string; the text is cut before the first
stop string. transformers' generate() would keep finished rows in the batch until every row
is done; here they leave the batch, so one long answer does not make the others pay.

Drafts (lossless speculative decoding): in a search, consecutive candidates are similar
models and mostly give the same greedy answers. Given a draft of a row's answer (the token
ids the previous candidate generated), the prompt and the draft run in one forward pass;
the draft's longest prefix that equals the model's own argmax at every position is what
greedy decoding would have produced, and the model's prediction after that prefix is the
next greedy token. A row whose accepted tokens end its generation needs no decode step; the
others continue the loop from the first mismatch, with the rejected draft positions masked
out of the attention. Whatever a draft holds, the output is plain greedy decoding's.
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


def prefill(
    backend: HFBackend, seqs: Sequence[Sequence[int]], keep: int = 1
) -> tuple[Any, Any, Any]:
    """Run a batch of sequences: (output with the last `keep` positions' logits and the KV
    cache, attention mask (n, cached length), position of each row's last token (n,)).

    A prefix that every sequence shares (an instruction, fixed few-shot examples, the start
    of a question template) runs once and its cache is repeated for the rows; each row's own
    tokens follow it, left-padded, so the layout is [shared | padding | own]. The shared part
    stops `keep` tokens before the shortest sequence ends, so every kept position is a row's
    own token.
    """
    device, n = backend.device, len(seqs)
    shared = min(common_prefix_len(seqs), min(len(s) for s in seqs) - keep)
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
    out = backend._run(ids.to(device), mask, (pos + shared).to(device), cache, keep)
    return out, mask, pos[:, -1].to(device) + shared


def common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    first, n = seqs[0], min(len(s) for s in seqs)
    for k in range(n):
        if any(s[k] != first[k] for s in seqs):
            return k
    return n


class _Ending:
    """Greedy decoding's end rules, applied one token at a time to a row's trace (its
    generated ids, plus the end-of-sequence id when one ended it)."""

    def __init__(self, backend: HFBackend, spec: GenerationSpec) -> None:
        self.decode = backend.tokenizer.decode
        self.eos_ids = backend.eos_ids
        self.stops = [s for s in spec.until if s]
        self.max_gen_toks = spec.max_gen_toks

    def take(self, trace: list[int], tokens: Sequence[int]) -> bool:
        """Append tokens to the trace until the generation ends; True if it has ended."""
        for t in tokens:
            trace.append(t)
            if t in self.eos_ids or len(trace) >= self.max_gen_toks:
                return True
            # a stop string can span tokens, so the check is on the decoded text so far
            if self.stops and _has_stop(self.decode(trace, skip_special_tokens=True), self.stops):
                return True
        return False


def trace_text(backend: HFBackend, trace: Sequence[int], spec: GenerationSpec) -> str:
    """The answer a trace stands for: decoded without its end-of-sequence id, cut at stops."""
    if trace and trace[-1] in backend.eos_ids:
        trace = trace[:-1]
    text = backend.tokenizer.decode(list(trace), skip_special_tokens=True)
    return cut_at_stops(text, [s for s in spec.until if s])


def greedy_generate(
    backend: HFBackend,
    prompts: Sequence[Sequence[int]],
    spec: GenerationSpec,
    drafts: Sequence[Sequence[int]] | None = None,
) -> list[list[int]]:
    """Generate greedily for a batch of token-id prompts; return each row's trace (the
    generated ids, ending with the end-of-sequence id if one ended the row). `drafts`
    (one per prompt, any length, possibly empty) only change how fast the result comes."""
    n = len(prompts)
    traces: list[list[int]] = [[] for _ in range(n)]
    if spec.max_gen_toks < 1:
        return traces
    # A draft's last token is only checked, never fed: the model's prediction after it is
    # needed only if the whole draft is accepted and the row has not ended (a previous trace
    # accepted whole always ends where it did), and then the decode loop feeds it anyway.
    drafts = [list(d[: spec.max_gen_toks]) for d in drafts] if drafts else [[]] * n
    # the verification logits (n, longest fed + 1, vocab) stay within the backend's budget
    most = max(backend.logits_budget // (n * backend.vocab_size) - 1, 0)
    fed = [d[:-1][:most] for d in drafts]
    seqs = [[*p, *f] for p, f in zip(prompts, fed, strict=True)]
    out, mask, last_pos = prefill(backend, seqs, max(len(f) for f in fed) + 1)
    preds = _row_predictions(out.logits, [len(f) for f in fed])
    ending = _Ending(backend, spec)
    active, nxt, rejected = [], [], []
    for r in range(n):
        # greedy decoding makes the accepted draft tokens, then the model's own next one
        taken = preds[r][: _accepted(drafts[r], preds[r]) + 1]
        if not ending.take(traces[r], taken):
            active.append(r)
            nxt.append(taken[-1])
            rejected.append(len(fed[r]) - (len(taken) - 1))
    if not active:
        return traces
    # rejected draft tokens leave the attention; each row goes on after its last accepted one
    keep = torch.tensor(active, device=mask.device)
    rej = torch.tensor(rejected, device=mask.device)  # (n_active,)
    width = mask.shape[1]
    mask = mask[keep] * (torch.arange(width, device=mask.device) < width - rej[:, None])
    cache = _keep_rows(kv_cache(out), keep, n)
    nxt_t = torch.tensor(nxt, device=mask.device)
    _decode(backend, ending, traces, active, (cache, mask, last_pos[keep] - rej, nxt_t))
    return traces


def _decode(
    backend: HFBackend,
    ending: _Ending,
    traces: list[list[int]],
    active: list[int],
    state: tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor],
) -> None:
    """The greedy KV-cache loop: feed each active row's last token, append the argmax to its
    trace, drop the rows that ended. `state` is (cache, attention mask (n_active, cached),
    position of each row's last cached token (n_active,), next input token (n_active,))."""
    cache, mask, last_pos, nxt = state
    while active:
        mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
        last_pos = last_pos + 1
        out = backend._run(nxt[:, None], mask, last_pos[:, None], cache, 1)
        logits = out.logits[:, -1, :]  # (n_active, vocab)
        if not torch.isfinite(logits).all():
            raise CandidateError("the model produced NaN/inf logits")
        nxt = logits.argmax(-1)  # (n_active,)
        still = [
            j
            for j, (r, t) in enumerate(zip(active, nxt.tolist(), strict=True))
            if not ending.take(traces[r], [t])
        ]
        if not still:
            return
        keep = torch.tensor(still, device=mask.device)
        cache = _keep_rows(kv_cache(out), keep, len(active))
        mask, nxt, last_pos = mask[keep], nxt[keep], last_pos[keep]
        active = [active[j] for j in still]


def _keep_rows(cache: Any, keep: torch.Tensor, n: int) -> Any:
    """The cache restricted to the given rows (finished rows leave the batch)."""
    if len(keep) < n:
        cache.batch_select_indices(keep)
    return cache


def own_positions(logits: torch.Tensor, lens: Sequence[int]) -> torch.Tensor:
    """(n, width) bool: row r's last lens[r] + 1 kept positions (logits (n, width, vocab)).
    Rows are right-aligned, so a shorter row's first kept positions are padding."""
    width = logits.shape[1]
    start = width - 1 - torch.tensor(list(lens), device=logits.device)  # (n,)
    return torch.arange(width, device=logits.device) >= start[:, None]


def _row_predictions(logits: torch.Tensor, lens: list[int]) -> list[list[int]]:
    """Row r's argmax at its last lens[r] + 1 positions (logits: (n, max(lens) + 1, vocab))."""
    if not torch.isfinite(logits).all(-1)[own_positions(logits, lens)].all():
        raise CandidateError("the model produced NaN/inf logits")
    width = logits.shape[1]
    best = logits.argmax(-1).tolist()  # (n, width)
    return [row[width - 1 - k :] for row, k in zip(best, lens, strict=True)]


def _accepted(draft: Sequence[int], preds: Sequence[int]) -> int:
    """How many leading draft tokens equal the model's own greedy choice."""
    k = 0
    while k < min(len(draft), len(preds)) and draft[k] == preds[k]:
        k += 1
    return k


def _has_stop(text: str, stops: list[str]) -> bool:
    return any(s in text for s in stops)
