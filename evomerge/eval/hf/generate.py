"""Greedy generation for HFBackend (any Runner): a KV-cache loop that drops rows as they
finish, verifying a draft of each answer first when one is known.

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

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from evomerge.errors import CandidateError
from evomerge.eval.hf.prefill import kv_cache, own_positions, prefill
from evomerge.eval.protocol import GenerationSpec

if TYPE_CHECKING:
    from evomerge.eval.early_exit import ExactAnswers
    from evomerge.eval.hf.runner import Runner


def cut_at_stops(text: str, stops: list[str]) -> str:
    """Text before the first occurrence of any stop string (lm-eval's postprocessing)."""
    for stop in stops:
        if stop:
            text = text.split(stop)[0]
    return text


class _Ending:
    """One row's end rules, applied one token at a time to its trace (its generated ids,
    plus the end-of-sequence id when one ended it): greedy decoding's, and early exit once
    the text can no longer become one of `answers` (then the row's score is 0 anyway)."""

    def __init__(
        self, backend: Runner, spec: GenerationSpec, answers: ExactAnswers | None = None
    ) -> None:
        self.decode = backend.tokenizer.decode
        self.eos_ids = backend.eos_ids
        self.stops = [s for s in spec.until if s]
        self.max_gen_toks = spec.max_gen_toks
        self.answers = answers if backend.early_exit else None

    def take(self, trace: list[int], tokens: Sequence[int]) -> bool:
        """Append tokens to the trace until the generation ends; True if it has ended."""
        for t in tokens:
            trace.append(t)
            if t in self.eos_ids or len(trace) >= self.max_gen_toks:
                return True
            if not (self.stops or self.answers):
                continue
            # a stop string can span tokens, so the checks are on the decoded text so far
            text = self.decode(trace, skip_special_tokens=True)
            if self.stops and _has_stop(text, self.stops):
                return True
            if self.answers and not self.answers.could_match(settled_text(text), self.stops):
                return True
        return False


def settled_text(text: str) -> str:
    """The part of a decoded trace that no later token can change, for a tokenizer that
    `prefix_stable_decoding` accepts: all but trailing U+FFFD, which an incomplete UTF-8
    sequence of byte tokens decodes to until its last byte arrives."""
    return text.rstrip("\ufffd")


# decoders (tokenizers library) that map a trace to text token by token, each token's text
# fixed once the next token exists: longer traces only add text, apart from settled_text's
_STABLE_DECODERS = ("ByteLevel", "ByteFallback", "Fuse", "Metaspace", "BPEDecoder")


def prefix_stable_decoding(tokenizer: Any) -> bool:
    """Whether decoding a longer trace keeps the settled text of a shorter one as a prefix,
    which early exit relies on: a fast tokenizer, no clean-up of tokenization spaces (it
    rewrites " ." as "." once the "." arrives) and a decoder known to only append."""
    if getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return False
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    return _stable_decoder(json.loads(backend.to_str()).get("decoder"))


def _stable_decoder(cfg: dict | None) -> bool:
    if cfg is None:  # no decoder: tokens joined with spaces
        return True
    kind = cfg.get("type")
    if kind == "Sequence":
        return all(_stable_decoder(d) for d in cfg.get("decoders", []))
    if kind == "Replace":  # a one-character pattern cannot span two tokens
        pattern = cfg.get("pattern", {})
        return isinstance(pattern.get("String"), str) and len(pattern["String"]) == 1
    if kind == "Strip":  # trailing characters of the whole text would come and go
        return not cfg.get("stop")
    if kind in ("WordPiece", "CTC"):
        return not cfg.get("cleanup")
    return kind in _STABLE_DECODERS


def trace_text(backend: Runner, trace: Sequence[int], spec: GenerationSpec) -> str:
    """The answer a trace stands for: decoded without its end-of-sequence id, cut at stops."""
    if trace and trace[-1] in backend.eos_ids:
        trace = trace[:-1]
    text = backend.tokenizer.decode(list(trace), skip_special_tokens=True)
    return cut_at_stops(text, [s for s in spec.until if s])


def greedy_generate(
    backend: Runner,
    prompts: Sequence[Sequence[int]],
    spec: GenerationSpec | Sequence[GenerationSpec],
    drafts: Sequence[Sequence[int]] | None = None,
    answers: Sequence[ExactAnswers | None] | None = None,
) -> list[list[int]]:
    """Generate greedily for a batch of token-id prompts; return each row's trace (the
    generated ids, ending with the end-of-sequence id if one ended the row). `spec` is one
    for all rows or one per row (rows end by their own max_gen_toks and stop strings).
    `drafts` (one per prompt, any length, possibly empty) only change how fast the result
    comes; `answers` (one per prompt, or None) let a row that can no longer score stop."""
    n = len(prompts)
    specs = [spec] * n if isinstance(spec, GenerationSpec) else list(spec)
    endings = [_Ending(backend, s, a) for s, a in zip(specs, answers or [None] * n, strict=True)]
    traces: list[list[int]] = [[] for _ in range(n)]
    if any(e.max_gen_toks < 1 for e in endings):
        raise ValueError("every row needs max_gen_toks >= 1")
    # A draft's last token is only checked, never fed: the model's prediction after it is
    # needed only if the whole draft is accepted and the row has not ended (a previous trace
    # accepted whole mostly ends where it did), and then the decode loop feeds it anyway.
    drafts = (
        [list(d[: e.max_gen_toks]) for d, e in zip(drafts, endings, strict=True)]
        if drafts
        else [[]] * n
    )
    # the verification logits (n, longest fed + 1, vocab) stay within the backend's budget
    most = max(backend.logits_budget // (n * backend.vocab_size) - 1, 0)
    fed = [d[:-1][:most] for d in drafts]
    seqs = [[*p, *f] for p, f in zip(prompts, fed, strict=True)]
    out, mask, last_pos = prefill(backend, seqs, max(len(f) for f in fed) + 1)
    preds = _row_predictions(out.logits, [len(f) for f in fed])
    active, nxt, rejected = [], [], []
    for r in range(n):
        # greedy decoding makes the accepted draft tokens, then the model's own next one
        taken = preds[r][: _accepted(drafts[r], preds[r]) + 1]
        if not endings[r].take(traces[r], taken):
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
    _decode(backend, endings, traces, active, (cache, mask, last_pos[keep] - rej, nxt_t))
    return traces


def _decode(
    backend: Runner,
    endings: list[_Ending],
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
        out = backend.forward(nxt[:, None], mask, last_pos[:, None], cache, 1)
        logits = out.logits[:, -1, :]  # (n_active, vocab)
        if not torch.isfinite(logits).all():
            raise CandidateError("the model produced NaN/inf logits")
        nxt = logits.argmax(-1)  # (n_active,)
        still = [
            j
            for j, (r, t) in enumerate(zip(active, nxt.tolist(), strict=True))
            if not endings[r].take(traces[r], [t])
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
