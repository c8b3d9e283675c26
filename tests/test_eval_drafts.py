"""Greedy generation with drafts (lossless speculative decoding) equals plain greedy decoding.

The reference is an independent, naive greedy decoder: one prompt at a time, a full forward
pass per token, no KV cache, no padding; it applies the same end rules (end-of-sequence id,
max_gen_toks, a stop string in the decoded text). Drafts of every kind (right, partly right,
wrong, too long, empty, mixed in one left-padded batch) must give its traces exactly.
"""

from __future__ import annotations

import pytest
import torch
from test_eval_support import build_tiny_model

from evomerge.eval.hf.backend import HFBackend
from evomerge.eval.hf.generate import greedy_generate, trace_text
from evomerge.eval.protocol import GenerationSpec

PROMPTS = ["add 12+30=", "rev abcdef=", "x", "cap Velmora=", "q: why?", "add 7+1="]
SHOT = "Q: add 3+4=7\nQ: rev ab=ba\nQ: "  # a prefix every prompt shares (few-shot style)


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    torch.set_num_threads(1)
    model_dir = build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=3)
    return HFBackend(model_dir, device="cpu", batch_size=4)


def naive_trace(be: HFBackend, prompt: list[int], spec: GenerationSpec) -> list[int]:
    """Greedy decoding the slow, obvious way; the trace ends with the id that ended it."""
    trace: list[int] = []
    with torch.no_grad():
        while len(trace) < spec.max_gen_toks:
            t = int(be.model(torch.tensor([prompt + trace])).logits[0, -1].argmax())
            trace.append(t)
            if t in be.eos_ids:
                break
            text = be.tokenizer.decode(trace, skip_special_tokens=True)
            if any(s and s in text for s in spec.until):
                break
    return trace


def encode(be: HFBackend, texts: list[str]) -> list[list[int]]:
    return [be._encode(t) for t in texts]


def draft_kinds(ref: list[int], vocab: int, max_gen_toks: int) -> dict[str, list[int]]:
    """Drafts of one reference trace: right, partly right, wrong, too long, empty."""
    wrong = [(t + 1) % vocab for t in ref]
    half = len(ref) // 2
    return {
        "right": list(ref),
        "partly": ref[:half] + wrong[half:],
        "wrong": wrong,
        "right_then_more": [*ref, 5, 6, 7],
        "longer_than_max": (ref + wrong * (max_gen_toks + 1))[: max_gen_toks + 5],
        "empty": [],
        "one_wrong": wrong[:1],
    }


def check_all_drafts(be: HFBackend, prompts: list[list[int]], spec: GenerationSpec) -> None:
    refs = [naive_trace(be, p, spec) for p in prompts]
    vocab = be.model.config.vocab_size
    kinds = [draft_kinds(r, vocab, spec.max_gen_toks) for r in refs]
    for kind in kinds[0]:  # every row with the same kind of draft
        assert greedy_generate(be, prompts, spec, [k[kind] for k in kinds]) == refs, kind
    names = list(kinds[0])  # then every row with a different kind, in one batch
    for shift in range(len(names)):
        drafts = [k[names[(r + shift) % len(names)]] for r, k in enumerate(kinds)]
        assert greedy_generate(be, prompts, spec, drafts) == refs, shift
    assert greedy_generate(be, prompts, spec) == refs


@pytest.mark.parametrize(
    "spec",
    [
        GenerationSpec(until=(), max_gen_toks=7),  # every row ends at max_gen_toks
        GenerationSpec(until=("\n",), max_gen_toks=12),
        GenerationSpec(until=(), max_gen_toks=1),
    ],
)
def test_drafts_give_plain_greedy_output(backend, spec):
    """Left-padded prompts of mixed lengths, each with drafts of every kind."""
    check_all_drafts(backend, encode(backend, PROMPTS), spec)


def test_drafts_with_end_of_sequence_id(backend, monkeypatch):
    """A row ends at an end-of-sequence id: take an id the model does generate mid-answer
    and make it an EOS id; the trace keeps it, the text drops it."""
    spec = GenerationSpec(until=(), max_gen_toks=8)
    prompts = encode(backend, PROMPTS)
    plain = [naive_trace(backend, p, spec) for p in prompts]
    eos = plain[0][2]
    monkeypatch.setattr(backend, "eos_ids", {eos})
    refs = [naive_trace(backend, p, spec) for p in prompts]
    assert refs[0][-1] == eos and len(refs[0]) == 3  # the rule takes effect
    check_all_drafts(backend, prompts, spec)
    text = trace_text(backend, refs[0], spec)
    assert text == backend.tokenizer.decode(refs[0][:-1], skip_special_tokens=True)


def test_drafts_with_multi_token_stop_string(backend):
    """A two-character stop string (two tokens here) that the model's text does contain."""
    prompts = encode(backend, PROMPTS)
    free = naive_trace(backend, prompts[1], GenerationSpec(until=(), max_gen_toks=10))
    text = backend.tokenizer.decode(free, skip_special_tokens=True)
    stop = text[3:5]
    spec = GenerationSpec(until=(stop,), max_gen_toks=10)
    refs = [naive_trace(backend, p, spec) for p in prompts]
    assert len(refs[1]) == 5  # ends on the token that completes the stop string
    assert trace_text(backend, refs[1], spec) == text[: text.index(stop)]
    check_all_drafts(backend, prompts, spec)


def test_drafts_through_the_shared_prefix_prefill(backend):
    """Prompts sharing a long prefix: the prefix runs alone, once, and the drafts follow
    each row's own tokens; results are still plain greedy decoding's. Identical prompts with
    identical drafts share more than their prompt: the shared part must stop before the
    positions whose predictions check the drafts."""
    spec = GenerationSpec(until=("\n",), max_gen_toks=6)
    prompts = encode(backend, [SHOT + p for p in ["x", "add 12+30=", "rev abc=", "x"]])
    shapes, run = [], backend.forward
    backend.forward = lambda ids, *a: shapes.append(tuple(ids.shape)) or run(ids, *a)
    try:
        check_all_drafts(backend, prompts, spec)
        check_all_drafts(backend, prompts[:1] * 3, spec)
    finally:
        del backend.forward
    assert shapes[0] == (1, len(backend._encode(SHOT)))  # the shared prefix ran alone


def test_drafts_cut_to_the_logits_budget(backend, monkeypatch):
    """A logits budget too small for whole drafts: only their first tokens are checked in
    the prefill, the rest is decoded; the output does not change."""
    spec = GenerationSpec(until=(), max_gen_toks=9)
    prompts = encode(backend, PROMPTS[:4])
    monkeypatch.setattr(backend, "logits_budget", 4 * 3 * backend.vocab_size)  # 2 fed each
    calls, run = [], backend.forward
    backend.forward = lambda ids, *a: calls.append(a[-1]) or run(ids, *a)
    try:
        check_all_drafts(backend, prompts, spec)
    finally:
        del backend.forward
    assert max(calls) == 3  # logits kept: the prompt's last position and two draft tokens


def test_right_drafts_need_no_decode_step(backend):
    """With the previous answers as drafts and unchanged weights, a batch is one forward
    pass: every row's answer is verified and ended in it."""
    spec = GenerationSpec(until=("\n",), max_gen_toks=9)
    prompts = encode(backend, PROMPTS[:4])
    refs = [naive_trace(backend, p, spec) for p in prompts]
    calls, run = [], backend.forward
    backend.forward = lambda ids, *a: calls.append(tuple(ids.shape)) or run(ids, *a)
    try:
        assert greedy_generate(backend, prompts, spec, refs) == refs
    finally:
        del backend.forward
    assert len(calls) == 1


def test_backend_reuses_answers_as_drafts_across_candidates(backend):
    """HFBackend.generate keeps each answer as the next call's draft; after the weights
    change, its answers still equal a backend that uses no drafts."""
    plain = HFBackend.from_model(backend.model, backend.tokenizer, batch_size=4, drafts=False)
    reqs = [(p, GenerationSpec(until=("\n",), max_gen_toks=8)) for p in PROMPTS]
    first = backend.generate(reqs)
    assert first == plain.generate(reqs)
    assert len(backend._drafts) == len(PROMPTS) and not plain._drafts
    norm = backend.live_tensors()["model.norm.weight"]
    saved = norm.clone()
    try:
        with torch.no_grad():
            norm.mul_(torch.linspace(0.5, 1.5, norm.numel()))  # a different candidate
        second = backend.generate(reqs)
        assert second == plain.generate(reqs)
        assert second != first  # the drafts were (at least partly) wrong
    finally:
        with torch.no_grad():
            norm.copy_(saved)
