"""HFBackend: log-likelihoods and greedy generation against naive hand-rolled references,
live weights (in-place writes, load_weights), and error handling."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from test_eval_support import build_tiny_model

from evomerge.errors import CandidateError, ConfigError
from evomerge.eval.backends import load_backend
from evomerge.eval.hf.backend import HFBackend
from evomerge.eval.protocol import GenerationSpec


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture
def backend(model_dir):
    return HFBackend(model_dir, device="cpu", batch_size=3)


def naive_loglikelihood(be, ctx, cont):
    """One request, no batching: full forward, log-softmax, sum over continuation tokens."""
    ids_ctx, ids_cont = be._encode_pair(ctx, cont)
    ids = torch.tensor([ids_ctx + ids_cont])
    with torch.no_grad():
        logp = torch.log_softmax(be.model(ids).logits[0].float(), -1)
    n = len(ids_cont)
    rows = logp[-n - 1 : -1]
    target = torch.tensor(ids_cont)
    return float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())


def naive_generate(be, ctx, until, max_new):
    ids = be._encode(ctx)
    out = []
    with torch.no_grad():
        for _ in range(max_new):
            t = int(be.model(torch.tensor([ids + out])).logits[0, -1].argmax())
            if t in be.eos_ids:
                break
            out.append(t)
    text = be.tokenizer.decode(out, skip_special_tokens=True)
    for s in until:
        text = text.split(s)[0]
    return text


def test_tokenizer_encodes_characters(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok.encode("add 3+4=")
    assert ids[0] == tok.bos_token_id and len(ids) == 9  # BOS + one id per character
    assert tok.decode(ids, skip_special_tokens=True) == "add 3+4="


REQS = [
    ("add 3+4=", "7"),
    ("add 3+4= ", "7"),  # trailing space moves into the continuation
    ("rev abc=", "cba"),
    ("q1: pick?", " dog"),
    ("q1: pick?", " do"),
    ("q1: pick? d", "o"),  # same model input as the line above: one shared forward pass
    ("", "hello"),  # empty context: conditioned on BOS
]


def test_loglikelihood_matches_naive_reference(backend):
    got = backend.loglikelihood(REQS)
    for (ctx, cont), (ll, greedy) in zip(REQS, got, strict=True):
        ref_ll, ref_greedy = naive_loglikelihood(backend, ctx, cont)
        assert ll == pytest.approx(ref_ll, abs=1e-4)
        assert greedy == ref_greedy
    assert backend._encode_pair("add 3+4= ", "7")[1] == backend._encode(" 7")[1:]


def test_shared_context_choices_match_naive_reference(model_dir):
    """Multiple-choice shape: contexts of different lengths, each with several choices of
    1-4 tokens; batch_size 2 forces several context batches and continuation chunks that
    start from one cached context."""
    be = HFBackend(model_dir, batch_size=2)
    choices = ["7", " 7", "77", " no", "a b", "zz", "q"]
    reqs = [(ctx, c) for ctx in ["add 3+4=", "x", "rev hello world=", "x"] for c in choices]
    for (ctx, cont), (ll, greedy) in zip(reqs, be.loglikelihood(reqs), strict=True):
        ref_ll, ref_greedy = naive_loglikelihood(be, ctx, cont)
        assert ll == pytest.approx(ref_ll, abs=1e-4)
        assert greedy == ref_greedy


def test_continuations_sharing_a_stem_match_naive_reference(model_dir):
    """Choices that share leading tokens (a stem run with the context), duplicates, and tails
    that are prefixes of others (read from the longer tail's row); batch_size "auto" with a
    small token budget and a small logits budget force several batches of each kind."""
    be = HFBackend(model_dir, batch_size="auto")
    be.token_budget, be.logits_budget = 40, 6 * be.vocab_size
    shapes, run = [], be.forward
    be.forward = lambda ids, *a: shapes.append((tuple(ids.shape), a[-1])) or run(ids, *a)
    groups = {
        "add 5+8=": [" 13", " 11", " 14", " 23", " 1", " 134", " 13"],
        "q: which animal?": [" the cat", " the dog", " the cow"],
        "x": ["only one"],
        "rev abc=": ["cba", "c", "cb a"],
    }
    reqs = [(ctx, c) for ctx, conts in groups.items() for c in conts]
    for (ctx, cont), (ll, greedy) in zip(reqs, be.loglikelihood(reqs), strict=True):
        ref_ll, ref_greedy = naive_loglikelihood(be, ctx, cont)
        assert ll == pytest.approx(ref_ll, abs=1e-4), (ctx, cont)
        assert greedy == ref_greedy
    tails = [shape for shape, keep in shapes if keep == 0]  # rows run after the contexts
    # distinct tails after the stems: "13" (holds "1") and "2" after " "; "ca", "do", "co"
    # after " the "; none for "x" (its one continuation feeds only the stem); "cb " (holds
    # "cb"; "c" feeds nothing, so that context has no stem)
    assert sum(rows for rows, _ in tails) == 2 + 3 + 0 + 1
    assert all(rows * width <= 6 for rows, width in tails)  # within the logits budget


def test_split_batches():
    """split(): fixed row counts, the "auto" token budget (rows x widest row), the logits
    budget (rows x kept positions x vocab), and at least one item per batch."""
    be = HFBackend.__new__(HFBackend)
    be.batch_size, be.token_budget, be.logits_budget, be.vocab_size = 2, 10, 1000, 10
    items = [(5, 1), (4, 1), (3, 1), (2, 1), (9, 1)]
    assert [list(r) for r in be.split(items)] == [[0, 1], [2, 3], [4]]
    be.batch_size = None  # "auto": 2 x 5 <= 10, 3 x 5 > 10; then 3 x 3 <= 10; 9 alone
    assert [list(r) for r in be.split(items)] == [[0, 1], [2, 3], [4]]
    be.token_budget = 12
    assert [list(r) for r in be.split(items)] == [[0, 1], [2, 3], [4]]
    be.token_budget = 100
    assert [list(r) for r in be.split(items)] == [[0, 1, 2, 3, 4]]
    be.logits_budget = 40  # rows x keep x 10 <= 40: 4 rows of keep 1, or 1 row of keep 4
    assert [list(r) for r in be.split(items)] == [[0, 1, 2, 3], [4]]
    assert [list(r) for r in be.split([(3, 4), (3, 1), (3, 5)])] == [[0], [1], [2]]


def test_cli_eval_batch_size_auto_gives_the_same_table(model_dir, tmp_path, capsys, monkeypatch):
    """`evomerge eval --batch-size auto` prints what a fixed batch size prints; a bad value
    is bad input (exit code 2), and vllm is told to use an integer."""
    from test_eval_support import gen_records, mc_records, write_task

    from evomerge.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    specs = [str(write_task(tmp_path, "cg", "gen", gen_records(12))),
             str(write_task(tmp_path, "cm", "mc", mc_records(12)))]  # fmt: skip
    tables = []
    for bs in ("auto", "3"):
        args = ["eval", str(model_dir), "--tasks", ",".join(specs), "--batch-size", bs]
        assert main([*args, "--split", "all"]) == 0
        tables.append(capsys.readouterr().out)
    assert tables[0] == tables[1] and "cm" in tables[0]
    assert main(["eval", str(model_dir), "--tasks", specs[0], "--batch-size", "0"]) == 2
    assert "--batch-size must be an integer >= 1 or 'auto'" in capsys.readouterr().err
    if importlib.util.find_spec("vllm") is None:  # 'auto' passes; the package is what's missing
        with pytest.raises(ConfigError, match="needs the vllm package"):
            load_backend("vllm", model_dir, batch_size="auto")


@pytest.mark.parametrize("bad", [0, -1, "big", True, 2.5])
def test_bad_batch_size(model_dir, bad):
    with pytest.raises(ConfigError, match="batch size must be an integer >= 1 or 'auto'"):
        HFBackend(model_dir, batch_size=bad)


SHOT = "Q: add 3+4=7\nQ: rev ab=ba\nQ: "  # a prefix every prompt shares (few-shot style)


def test_shared_prompt_prefix_runs_once_with_same_results(model_dir):
    """Prompts sharing a long prefix: the prefix runs once and its cache is repeated, with the
    rows' own tokens left-padded after it ([shared | padding | own]); scores and generations
    equal the naive one-request references."""
    be = HFBackend(model_dir, batch_size=8)
    shapes, run = [], be.forward
    be.forward = lambda ids, *a: shapes.append(tuple(ids.shape)) or run(ids, *a)
    ctxs = [SHOT + q for q in ["add 1+2=", "rev hello=", "x", "cap Velmora is", "a"]]
    reqs = [(c, cont) for c in ctxs for cont in ["7", " ab", "no way"]]
    for (ctx, cont), (ll, greedy) in zip(reqs, be.loglikelihood(reqs), strict=True):
        ref_ll, ref_greedy = naive_loglikelihood(be, ctx, cont)
        assert ll == pytest.approx(ref_ll, abs=1e-4)
        assert greedy == ref_greedy
    spec = GenerationSpec(until=("\n",), max_gen_toks=6)
    got = be.generate([(c, spec) for c in ctxs])
    assert got == [naive_generate(be, c, spec.until, spec.max_gen_toks) for c in ctxs]
    n_shared = len(be._encode(SHOT))  # BOS + one id per character
    assert shapes[0] == (1, n_shared)  # the shared prefix ran alone, once per batch


def test_left_truncation_like_lm_eval(model_dir):
    """Inputs longer than max_length keep their last max_length tokens (lm-eval's rule);
    a continuation that cannot fit is a ConfigError."""
    be = HFBackend(model_dir, batch_size=4, max_length=8)
    ctx, cont = "abcdefghijkl", "mno"
    ids_ctx, ids_cont = be._encode_pair(ctx, cont)
    kept = (ids_ctx + ids_cont)[-9:-1]  # the model's 8 input tokens
    with torch.no_grad():
        logp = torch.log_softmax(be.model(torch.tensor([kept])).logits[0].float(), -1)
    ref = float(logp[-3:].gather(1, torch.tensor(ids_cont)[:, None]).sum())
    assert be.loglikelihood([(ctx, cont)])[0][0] == pytest.approx(ref, abs=1e-4)
    with pytest.raises(ConfigError, match="does not fit"):
        be.loglikelihood([("ab", "cdefghijklmn")])


def test_batch_size_does_not_change_results(model_dir):
    one = HFBackend(model_dir, batch_size=1)
    many = HFBackend(model_dir, batch_size=64)
    for a, b in zip(one.loglikelihood(REQS), many.loglikelihood(REQS), strict=True):
        assert a[0] == pytest.approx(b[0], abs=1e-4) and a[1] == b[1]
    spec = GenerationSpec(until=("\n", "="), max_gen_toks=7)
    prompts = [(p, spec) for p in ["add 1+2=", "rev hello=", "cap X=", "a"]]
    assert one.generate(prompts) == many.generate(prompts)


def test_generation_matches_naive_greedy(backend):
    specs = [
        GenerationSpec(until=("\n",), max_gen_toks=6),
        GenerationSpec(until=("a", "e"), max_gen_toks=9),
    ]
    reqs = [(p, s) for s in specs for p in ["add 12+30=", "rev abcdef=", "x", "cap Velmora="]]
    got = backend.generate(reqs)
    for (ctx, spec), text in zip(reqs, got, strict=True):
        assert text == naive_generate(backend, ctx, spec.until, spec.max_gen_toks)
    assert any(len(t) > 0 for t in got)


def test_live_tensors_tied_once_and_writes_take_effect(backend):
    live = backend.live_tensors()
    assert "model.embed_tokens.weight" in live and "lm_head.weight" not in live  # tied
    before = backend.loglikelihood(REQS[:1])[0][0]
    with torch.no_grad():
        live["model.norm.weight"].mul_(3.0)  # in-place write, no reload
    changed = backend.loglikelihood(REQS[:1])[0][0]
    assert changed != pytest.approx(before, abs=1e-6)
    backend.load_weights([("model.norm.weight", live["model.norm.weight"] / 3.0)])
    assert backend.loglikelihood(REQS[:1])[0][0] == pytest.approx(before, abs=1e-5)


def test_load_weights_errors(backend):
    with pytest.raises(ConfigError, match=r"Did you mean 'model\.norm\.weight'"):
        backend.load_weights([("model.norm.weigth", torch.ones(32))])
    with pytest.raises(ConfigError, match=r"expected shape \(32,\)"):
        backend.load_weights([("model.norm.weight", torch.ones(31))])


def test_nan_weights_raise_candidate_error(backend):
    backend.load_weights([("model.norm.weight", torch.full((32,), float("nan")))])
    with pytest.raises(CandidateError, match="NaN"):
        backend.loglikelihood(REQS[:1])
    with pytest.raises(CandidateError, match="NaN"):
        backend.generate([("abc", GenerationSpec(max_gen_toks=3))])


def test_load_backend_errors(model_dir, tmp_path):
    with pytest.raises(ConfigError, match="Did you mean 'hf'"):
        load_backend("hff", model_dir)
    with pytest.raises(ConfigError, match="unknown dtype"):
        load_backend("hf", model_dir, dtype="float33")
    with pytest.raises(ConfigError, match=r"config\.json"):
        load_backend("hf", tmp_path)
    with pytest.raises(ConfigError, match="max_gen_toks"):
        HFBackend(model_dir).generate([("a", GenerationSpec(max_gen_toks=500))])


def test_pack_live_lays_parameters_out_in_order_and_keeps_outputs(model_dir):
    be = HFBackend(model_dir, device="cpu", batch_size=3)
    before = be.loglikelihood(REQS)
    names = list(be.live_tensors())
    order = ["model.norm.weight", "no.such.tensor", *names[::-1]]
    be.pack_live(order)
    live = be.live_tensors()
    storages = {t.untyped_storage().data_ptr() for t in live.values()}
    assert len(storages) == 1  # one buffer
    laid = sorted(live, key=lambda n: live[n].storage_offset())
    assert laid == [n for n in dict.fromkeys(order) if n in live]
    offset = 0
    for name in laid:  # back to back, in order
        assert live[name].storage_offset() == offset
        offset += live[name].numel()
    emb = be.model.get_input_embeddings().weight
    assert emb.data_ptr() == be.model.get_output_embeddings().weight.data_ptr()  # still tied
    assert be.loglikelihood(REQS) == before
